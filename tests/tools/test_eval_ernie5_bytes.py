"""`tools/eval_ernie5.target_bytes`: the byte count that puts text losses of different tokenizers on one
scale (bits per UTF-8 byte)."""

from __future__ import annotations

import pytest

from datamodules.multimodal import Vocabulary
from models.ernie5 import BOUNDARY_TOKENS
from models.tokenizers.text import build_tokenizer
from tools.eval_ernie5 import target_bytes

TEXTS = ["Ada Lovelace was born in London.", "She studied mathematics in London.", "Charles Babbage met Ada."] * 20


@pytest.mark.parametrize("kind", ["bpe", "char_bpe"])
def test_target_bytes_counts_the_utf8_bytes_the_ids_spell(kind):
    vocab = Vocabulary(build_tokenizer(kind, TEXTS, vocab_size=300))
    a, b = "Ada was born in London.", "Zoë, 東京"  # b leaves char_bpe's alphabet: UTF-16BE byte fallback
    ids = vocab.encode(a) + [vocab.eos] + vocab.encode(b)
    assert target_bytes(vocab, ids) == len(a) + 1 + len(b.encode("utf-8"))
    # a boundary token spells nothing; the runs on either side still count
    ids = vocab.encode(a) + [vocab[BOUNDARY_TOKENS[0]]] + vocab.encode(b) + [vocab.eos]
    assert target_bytes(vocab, ids) == len(a) + len(b.encode("utf-8")) + 1
    assert target_bytes(vocab, []) == 0
    # additive over a split between two whole-character runs (how rows are scored in chunks)
    ids = vocab.encode(a + " " + a)
    assert target_bytes(vocab, ids) == target_bytes(vocab, ids[:5]) + target_bytes(vocab, ids[5:])
