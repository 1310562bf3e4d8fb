import os
import random
from pathlib import Path
import subprocess
import sys

import pytest

from datamodules.synthetic_bios import generate_biographies
from models.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharBPETokenizer,
    TextTokenizer,
    build_tokenizer,
    load_tokenizer,
)

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


# --------------------------------------------------------------------- BPE-dropout and character BPE


@pytest.fixture(scope="module")
def char_bpe(bios_docs) -> CharBPETokenizer:
    return CharBPETokenizer.train(bios_docs, vocab_size=600)


@pytest.mark.parametrize("kind", ["bpe", "char_bpe"])
def test_bpe_dropout_zero_equals_the_library_and_one_gives_single_symbols(kind, bpe, char_bpe, bios_docs):
    """The written-out merge loop is the reference-checked slow path: with dropout -> 0 it must give
    the library's segmentation exactly; with dropout 1 no merge ever applies."""
    tok = bpe if kind == "bpe" else char_bpe
    for text in UNICODE_SAMPLES + bios_docs[:40]:
        assert tok.encode(text, dropout=1e-12, rng=random.Random(0)) == tok.encode(text)
    word = "Cambridge"
    singles = tok.encode(word, dropout=1.0, rng=random.Random(0))
    assert len(singles) == len(word) and tok.decode(singles) == word
    assert len(tok.encode(word)) < len(word)


@pytest.mark.parametrize("kind", ["bpe", "char_bpe"])
def test_bpe_dropout_round_trips_is_seeded_and_lengthens_with_p(kind, bpe, char_bpe, bios_docs):
    tok = bpe if kind == "bpe" else char_bpe
    docs = bios_docs[:40]
    lengths = []
    for p in (0.0, 0.1, 0.3, 0.6):
        n = 0
        for i, text in enumerate(docs + UNICODE_SAMPLES):
            ids = tok.encode(text, dropout=p, rng=random.Random(i))
            assert tok.decode(ids) == text
            assert ids == tok.encode(text, dropout=p, rng=random.Random(i))  # same seed, same segmentation
            n += len(ids)
        lengths.append(n)
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    # another seed gives another segmentation of the same document
    seg = {tuple(tok.encode(docs[0], dropout=0.3, rng=random.Random(s))) for s in range(5)}
    assert len(seg) > 1
    with pytest.raises(ValueError, match="rng"):
        tok.encode(docs[0], dropout=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tok.encode(docs[0], dropout=1.5, rng=random.Random(0))


def test_char_bpe_falls_back_to_utf16be_bytes(char_bpe, bios_docs):
    tok = char_bpe
    assert "日" not in tok.alphabet and "e" in tok.alphabet
    byte0 = tok.hf_tokenizer.token_to_id("<0x00>")
    ids = tok.encode("日")  # U+65E5: UTF-16BE 0x65 0xE5 (UTF-8 would take 3 bytes)
    assert ids == [byte0 + 0x65, byte0 + 0xE5]
    smile = tok.encode("🙂")  # outside the BMP: a surrogate pair, 4 bytes D8 3D DE 42
    assert smile == [byte0 + b for b in (0xD8, 0x3D, 0xDE, 0x42)]
    for text in UNICODE_SAMPLES + bios_docs[:20]:
        assert tok.decode(tok.encode(text)) == text
    # nothing is dropped: the library alone silently loses out-of-alphabet characters
    assert len(tok.hf_tokenizer.encode("caf\u00e9", add_special_tokens=False).ids) < len(tok.encode("caf\u00e9"))
    assert tok.decode(tok.encode("caf\u00e9")) == "caf\u00e9"
    # a broken byte run (e.g. sampled) decodes to U+FFFD, the text around it intact
    assert tok.decode(tok.encode("ab") + [byte0 + 0xD8] + tok.encode("cd")) == "ab\ufffdcd"
    # a literal byte-token string in user text stays text
    assert tok.decode(tok.encode("<0x41>")) == "<0x41>" and byte0 + 0x41 not in tok.encode("<0x41>")
    # specials are dropped when decoding
    assert tok.decode(tok.encode("hi") + [tok.eos_id, tok.pad_id]) == "hi"


def test_char_bpe_alphabet_size_save_load_and_factory(char_bpe, bios_docs, tmp_path):
    small = build_tokenizer("char_bpe", texts=bios_docs, vocab_size=600, alphabet_size=20)
    assert isinstance(small, CharBPETokenizer) and len(small.alphabet) == 20
    doc = bios_docs[0]
    assert small.decode(small.encode(doc)) == doc
    assert len(small.encode(doc)) > len(char_bpe.encode(doc))  # rarer characters became 2 byte tokens each
    path = tmp_path / "char.json"
    char_bpe.save(path)
    loaded = load_tokenizer(path)
    assert isinstance(loaded, CharBPETokenizer) and loaded.fingerprint() == char_bpe.fingerprint()
    assert loaded.encode("日本 " + doc) == char_bpe.encode("日本 " + doc)
    assert char_bpe.fingerprint() != small.fingerprint()
    assert BPETokenizer.load(path).byte_fallback == "utf-16-be"
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer("char_bpe", texts=bios_docs, vocab_size=100)
    with pytest.raises(ValueError, match="alphabet_size"):
        build_tokenizer("char_bpe", texts=bios_docs, alphabet_size=0)
