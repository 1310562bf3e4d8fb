"""Tokenizers: text (bytes, byte-level BPE and character BPE with
UTF-16BE byte fallback, behind one small interface), visual (causal 3D / 2D conv +
multi-scale bitwise or VQ residual quantizer), audio (mel + residual VQ, mu-law) and their checkpoint I/O.

Only the text tokenizers are imported here; the media ones (which pull in torchaudio and friends)
are imported from their modules: `models.tokenizers.visual`, `models.tokenizers.audio`,
`models.tokenizers.checkpoint`.
"""

from models.tokenizers.text import (
    BPETokenizer,
    ByteTokenizer,
    CharBPETokenizer,
    TextTokenizer,
    build_tokenizer,
    load_tokenizer,
)

__all__ = ["BPETokenizer", "ByteTokenizer", "CharBPETokenizer", "TextTokenizer", "build_tokenizer", "load_tokenizer"]
