"""Text tokenizers (byte-level and BPE) behind one small interface."""

from models.tokenizers.text import (
    BPETokenizer,
    ByteTokenizer,
    TextTokenizer,
    build_tokenizer,
    load_tokenizer,
)

__all__ = ["BPETokenizer", "ByteTokenizer", "TextTokenizer", "build_tokenizer", "load_tokenizer"]
