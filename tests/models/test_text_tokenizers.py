import os
from pathlib import Path
import subprocess
import sys

import pytest

from datamodules.synthetic_bios import generate_biographies
from models.tokenizers import BPETokenizer, ByteTokenizer, TextTokenizer, build_tokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[2]

UNICODE_SAMPLES = [
    "",
    "plain ascii",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "accents: héllo wörld ñandú",
    "CJK: 日本語のテキスト, 中文",
    "emoji: 🙂👍🏽 family 👨‍👩‍👧 flag 🇳🇴",
    "combining: e\u0301 a\u0308",
    "rtl: שלום مرحبا",
    "nul \x00 and control \x07 chars",
    "literal specials: <eos> <pad>",
]


@pytest.fixture(scope="module")
def bios_docs() -> list[str]:
    return generate_biographies(num_people=150, seed=0).documents


@pytest.fixture(scope="module")
def bpe(bios_docs) -> BPETokenizer:
    return BPETokenizer.train(bios_docs, vocab_size=400)


def test_byte_tokenizer_ids_and_round_trip():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    for text in UNICODE_SAMPLES:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text


def test_byte_decode_drops_specials_and_survives_broken_utf8():
    tok = ByteTokenizer()
    assert tok.decode([tok.eos_id] + tok.encode("hi") + [tok.pad_id]) == "hi"
    broken = tok.encode("🙂")[:2]
    assert tok.decode(broken) == "\ufffd"


def test_byte_save_load_and_fingerprint(tmp_path):
    tok = ByteTokenizer()
    tok.save(tmp_path / "byte.json")
    loaded = TextTokenizer.load(tmp_path / "byte.json")
    assert isinstance(loaded, ByteTokenizer)
    assert loaded.fingerprint() == tok.fingerprint() == ByteTokenizer().fingerprint()
    assert len(tok.fingerprint()) == 64


def test_bpe_specials_and_vocab(bpe):
    assert bpe.vocab_size <= 400
    assert bpe.eos_id != bpe.pad_id
    assert 0 <= bpe.eos_id < bpe.vocab_size and 0 <= bpe.pad_id < bpe.vocab_size


def test_bpe_round_trip_on_bios_and_unicode(bpe, bios_docs):
    num_ids = num_bytes = 0
    for doc in bios_docs[:50]:
        ids = bpe.encode(doc)
        assert bpe.decode(ids) == doc
        num_ids, num_bytes = num_ids + len(ids), num_bytes + len(doc.encode())
    assert num_ids < 0.7 * num_bytes, "BPE should compress its own training text"
    for text in UNICODE_SAMPLES:
        assert bpe.decode(bpe.encode(text)) == text


def test_bpe_literal_special_text_is_not_a_special_id(bpe):
    ids = bpe.encode("end <eos> here <pad>")
    assert bpe.eos_id not in ids and bpe.pad_id not in ids
    assert bpe.decode(ids + [bpe.eos_id]) == "end <eos> here <pad>"


def test_bpe_batch_matches_single(bpe, bios_docs):
    assert bpe.encode_batch(bios_docs[:10]) == [bpe.encode(d) for d in bios_docs[:10]]


def test_bpe_save_load(bpe, bios_docs, tmp_path):
    path = tmp_path / "bpe.json"
    bpe.save(path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    loaded = load_tokenizer(path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.fingerprint() == bpe.fingerprint()
    assert loaded.encode(bios_docs[0]) == bpe.encode(bios_docs[0])
    assert (loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (bpe.eos_id, bpe.pad_id, bpe.vocab_size)
    # A literal "<eos>" must stay text after reloading too.
    assert loaded.eos_id not in loaded.encode("<eos>")
    with pytest.raises(ValueError, match="BPETokenizer"):
        ByteTokenizer.load(path)


def test_bpe_training_is_deterministic_and_fingerprint_tracks_settings(bpe, bios_docs):
    assert BPETokenizer.train(bios_docs, vocab_size=400).fingerprint() == bpe.fingerprint()
    assert BPETokenizer.train(bios_docs, vocab_size=350).fingerprint() != bpe.fingerprint()
    assert BPETokenizer.train(bios_docs[:100], vocab_size=400).fingerprint() != bpe.fingerprint()
    assert bpe.fingerprint() != ByteTokenizer().fingerprint()


def test_build_tokenizer_factory(bios_docs):
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    assert isinstance(build_tokenizer("bpe", texts=bios_docs[:20], vocab_size=300), BPETokenizer)
    with pytest.raises(ValueError, match="wordpiece"):
        build_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="texts"):
        build_tokenizer("bpe")
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer("bpe", texts=["abc"], vocab_size=100)


def test_load_rejects_foreign_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="x.json"):
        load_tokenizer(bad)
    with pytest.raises(ValueError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")


def test_tokenizers_package_imports_no_training_stack():
    code = (
        "import sys, models.tokenizers; "
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf') if m in sys.modules]; "
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
