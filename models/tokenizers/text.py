"""Text tokenizers with one small interface: a raw byte tokenizer and byte-level BPE.

Pure Python/`tokenizers`: no Lightning or Hydra, so checkpoints and tools can
load a tokenizer without the training stack.
"""

from __future__ import annotations

from collections.abc import Iterable
import hashlib
import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as hf_models

from models.io import atomic_write_text

__all__ = ["BPETokenizer", "ByteTokenizer", "TextTokenizer", "build_tokenizer", "load_tokenizer"]

EOS_TOKEN = "<eos>"
PAD_TOKEN = "<pad>"


class TextTokenizer:
    """Common interface: text <-> integer ids, with EOS/PAD specials and a stable fingerprint."""

    kind: str = ""

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included (the embedding table size)."""
        raise NotImplementedError

    @property
    def eos_id(self) -> int:
        """Id appended after every document."""
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        """Id used to pad ragged batches."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Text to ids, without adding any special token."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode several texts (subclasses may parallelize)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; special ids are dropped."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer to one JSON file (atomically)."""
        raise NotImplementedError

    def _fingerprint_payload(self) -> str:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Hex digest that changes whenever the settings or vocabulary change."""
        return hashlib.sha256(f"{self.kind}\n{self._fingerprint_payload()}".encode()).hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike) -> TextTokenizer:
        """Load a file written by `save`; the concrete class is detected from its content."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot load tokenizer from {path}: {e}") from e
        if isinstance(data, dict) and data.get("kind") == ByteTokenizer.kind:
            tok: TextTokenizer = ByteTokenizer._from_json(data, path)
        elif isinstance(data, dict) and "model" in data:
            tok = BPETokenizer(Tokenizer.from_str(text))
        else:
            raise ValueError(f"{path} is not a tokenizer file written by TextTokenizer.save")
        if not isinstance(tok, cls):
            raise ValueError(f"{path} holds a {type(tok).__name__}, not a {cls.__name__}")
        return tok

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class ByteTokenizer(TextTokenizer):
    """UTF-8 bytes as ids 0-255, EOS=256, PAD=257: lossless for any string, no training."""

    kind = "byte"
    _VERSION = 1

    @property
    def vocab_size(self) -> int:
        """258: all bytes plus EOS and PAD."""
        return 258

    @property
    def eos_id(self) -> int:
        """256."""
        return 256

    @property
    def pad_id(self) -> int:
        """257."""
        return 257

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of `text` as ints."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Join byte ids back into text; invalid UTF-8 (e.g. from sampling) becomes U+FFFD."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, path: str | os.PathLike) -> None:
        """Write a small JSON marker file (there is no vocabulary to store)."""
        atomic_write_text(path, json.dumps({"kind": self.kind, "version": self._VERSION}))

    @classmethod
    def _from_json(cls, data: dict, path: Path) -> ByteTokenizer:
        if data.get("version") != cls._VERSION:
            raise ValueError(f"{path}: unsupported byte tokenizer version {data.get('version')!r}")
        return cls()

    def _fingerprint_payload(self) -> str:
        return f"version={self._VERSION}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(self.kind)


class BPETokenizer(TextTokenizer):
    """Byte-level BPE from HF `tokenizers` with `<eos>` and `<pad>` specials."""

    kind = "bpe"

    def __init__(self, tokenizer: Tokenizer) -> None:
        eos, pad = tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN)
        if eos is None or pad is None:
            raise ValueError(f"BPE tokenizer lacks the {EOS_TOKEN!r}/{PAD_TOKEN!r} special tokens")
        # Literal "<eos>" in user text must stay text: only the data pipeline
        # may emit the EOS id, otherwise documents could forge boundaries.
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self._eos, self._pad = eos, pad

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> BPETokenizer:
        """Train on an iterator of strings; the 256 byte symbols are always in the vocabulary."""
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + 2:
            raise ValueError(
                f"vocab_size must be >= {len(alphabet) + 2} for byte-level BPE, got {vocab_size}"
            )
        tok = Tokenizer(hf_models.BPE())
        # No normalizer and no prefix space: encode/decode is then an exact round trip.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN, PAD_TOKEN],
            initial_alphabet=alphabet,
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        """Trained vocabulary size (may be below the requested size on small corpora)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        """Id of `<eos>`."""
        return self._eos

    @property
    def pad_id(self) -> int:
        """Id of `<pad>`."""
        return self._pad

    @property
    def hf_tokenizer(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, no specials added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts using the library's thread pool."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` with special tokens dropped."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write the standard `tokenizers` JSON file (atomically)."""
        atomic_write_text(path, self._tok.to_str())

    def _fingerprint_payload(self) -> str:
        # Canonical JSON so that key order in the serializer cannot change the hash.
        return json.dumps(json.loads(self._tok.to_str()), sort_keys=True, ensure_ascii=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and self.fingerprint() == other.fingerprint()

    def __hash__(self) -> int:
        return hash(self.fingerprint())


def build_tokenizer(
    kind: str,
    texts: Iterable[str] | None = None,
    vocab_size: int = 2048,
    min_frequency: int = 2,
) -> TextTokenizer:
    """Create a tokenizer by name: "byte" (no training) or "bpe" (trained on `texts`)."""
    if kind == ByteTokenizer.kind:
        return ByteTokenizer()
    if kind == BPETokenizer.kind:
        if texts is None:
            raise ValueError("build_tokenizer('bpe') needs `texts` to train on")
        return BPETokenizer.train(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'byte' or 'bpe'")


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """Load any tokenizer written by `TextTokenizer.save`."""
    return TextTokenizer.load(path)
