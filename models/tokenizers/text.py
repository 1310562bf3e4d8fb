"""Text tokenizers with one small interface: a raw byte tokenizer, byte-level BPE and character BPE
with UTF-16BE byte fallback (ERNIE 5.0's text tokenizer), all with optional BPE-dropout.

- `ByteTokenizer`: UTF-8 bytes, no training.
- `BPETokenizer`: byte-level BPE (GPT-2 style); every string is encodable.
- `CharBPETokenizer`: BPE over characters; a character outside its alphabet is written as its
  UTF-16BE bytes, one `<0xNN>` token per byte (2 tokens for most of Unicode, 4 for characters outside
  the Basic Multilingual Plane), so nothing is ever unknown and decoding is exact.

BPE-dropout (Provilkov et al. 2020): `encode(text, dropout=p, rng=random.Random(seed))` skips each
applicable merge with probability p at every merge step, so one word gets several segmentations
during training. `tokenizers` has a dropout option, but it draws from an unseeded RNG; the data
pipeline needs a segmentation that is a function of (seed, row) so that a resumed run sees the same
tokens, so the merge loop here is written out and seeded. With p = 0 it is exactly the library's
segmentation (tested against it); `encode(text)` without dropout always takes the library's path.

Pure Python/`tokenizers`: no Lightning or Hydra, so checkpoints and tools can
load a tokenizer without the training stack.
"""

from __future__ import annotations

from collections.abc import Iterable
import hashlib
import json
import os
from pathlib import Path
import random
from typing import Optional

from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as hf_models

from models.io import atomic_write_text

__all__ = ["BPETokenizer", "ByteTokenizer", "CharBPETokenizer", "TextTokenizer", "build_tokenizer", "load_tokenizer"]

EOS_TOKEN = "<eos>"
PAD_TOKEN = "<pad>"
# CharBPETokenizer's fallback tokens, one per byte value of a character's UTF-16BE encoding
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
# GPT-2's pre-tokenization pattern (what ByteLevel(use_regex=True) splits on), for character BPE
_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


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

    def encode(self, text: str, dropout: float = 0.0, rng: Optional[random.Random] = None) -> list[int]:
        """Text to ids, without adding any special token.

        dropout: BPE-dropout probability (subword tokenizers only; 0 = the deterministic segmentation);
        rng: the `random.Random` it draws from (required when dropout > 0, for reproducibility).
        """
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
            tok = BPETokenizer.from_str(text)
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

    def encode(self, text: str, dropout: float = 0.0, rng: Optional[random.Random] = None) -> list[int]:
        """UTF-8 bytes of `text` as ints (there are no merges to drop: `dropout` changes nothing)."""
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
        self._ranks: Optional[dict] = None  # (left, right) -> merge rank, built on the first dropout encode

    @staticmethod
    def from_str(text: str) -> "BPETokenizer":
        """A tokenizer from the library's JSON (as `save` writes it); the right subclass is picked."""
        tok = Tokenizer.from_str(text)
        if tok.token_to_id(BYTE_TOKENS[0]) is not None:
            return CharBPETokenizer(tok)
        return BPETokenizer(tok)

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

    def encode(self, text: str, dropout: float = 0.0, rng: Optional[random.Random] = None) -> list[int]:
        """BPE ids of `text`, no specials added; `dropout` > 0 samples a BPE-dropout segmentation."""
        if dropout <= 0.0:
            return self._tok.encode(text, add_special_tokens=False).ids
        if dropout > 1.0:
            raise ValueError(f"BPE-dropout must be in [0, 1], got {dropout}")
        if rng is None:
            raise ValueError("BPE-dropout needs an explicit rng (random.Random(seed)) so that it is reproducible")
        ids = []
        for piece, _ in self._tok.pre_tokenizer.pre_tokenize_str(text):
            ids += [self._tok.token_to_id(sym) for sym in self.merge(list(piece), dropout, rng)]
        return ids

    def merge(self, symbols: list[str], dropout: float = 0.0, rng: Optional[random.Random] = None) -> list[str]:
        """Apply the merges to one pre-tokenized word: repeatedly merge the adjacent pair of lowest rank
        (leftmost on ties), each candidate pair skipped with probability `dropout` at every step."""
        if self._ranks is None:
            merges = json.loads(self._tok.to_str())["model"]["merges"]
            self._ranks = {tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m): r for r, m in enumerate(merges)}
        ranks = self._ranks
        while len(symbols) > 1:
            best, at = None, -1
            for i in range(len(symbols) - 1):
                r = ranks.get((symbols[i], symbols[i + 1]))
                if r is None or (dropout > 0.0 and rng.random() < dropout):
                    continue
                if best is None or r < best:
                    best, at = r, i
            if best is None:
                break
            symbols[at:at + 2] = [symbols[at] + symbols[at + 1]]
        return symbols

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts using the library's thread pool."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    @property
    def byte_fallback(self) -> Optional[str]:
        """The encoding of the byte-fallback tokens (None: byte-level BPE needs none)."""
        return None

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


class CharBPETokenizer(BPETokenizer):
    """BPE over characters with UTF-16BE byte fallback (ERNIE 5.0's text tokenizer, papers.md 4.4).

    The vocabulary is `<eos>`, `<pad>`, 256 byte tokens `<0x00>`..`<0xFF>`, the alphabet (the
    `alphabet_size` most frequent characters of the training text, or all of them) and the merges.
    Text is split into runs of in-alphabet characters, encoded by BPE, and out-of-alphabet characters,
    each written as the bytes of its UTF-16BE encoding. Decoding concatenates the tokens' strings and
    decodes each run of byte tokens as UTF-16BE (a broken run, e.g. from sampling, becomes U+FFFD).
    """

    kind = "char_bpe"

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        first = tokenizer.token_to_id(BYTE_TOKENS[0])
        if first is None or any(tokenizer.token_to_id(t) != first + b for b, t in enumerate(BYTE_TOKENS)):
            raise ValueError("a character BPE tokenizer needs the 256 byte tokens <0x00>..<0xFF> with consecutive ids")
        self._byte0 = first
        vocab = tokenizer.get_vocab(with_added_tokens=False)
        self._alphabet = frozenset(t for t in vocab if len(t) == 1)
        self._strings = {i: t for t, i in vocab.items() if i not in (self._eos, self._pad)}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2,
              alphabet_size: Optional[int] = None) -> "CharBPETokenizer":
        """Train on strings; `alphabet_size` keeps only the most frequent characters (None: all seen)."""
        texts = list(texts)
        if vocab_size < len(BYTE_TOKENS) + 3:
            raise ValueError(f"vocab_size must be >= {len(BYTE_TOKENS) + 3} for character BPE with byte fallback, "
                             f"got {vocab_size}")
        if alphabet_size is not None and alphabet_size < 1:
            raise ValueError(f"alphabet_size must be >= 1 or None, got {alphabet_size}")
        tok = Tokenizer(hf_models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(_WORDS), behavior="isolated")
        extra = {} if alphabet_size is None else {"limit_alphabet": alphabet_size}
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN, PAD_TOKEN] + BYTE_TOKENS,
            show_progress=False, **extra)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @property
    def alphabet(self) -> frozenset:
        """Characters the BPE encodes itself; every other character falls back to bytes."""
        return self._alphabet

    @property
    def byte_fallback(self) -> Optional[str]:
        return "utf-16-be"

    def _runs(self, text: str):
        """(True, run of alphabet characters) / (False, run of other characters), in order."""
        start, inside = 0, None
        for i, ch in enumerate(text):
            known = ch in self._alphabet
            if inside is None:
                inside = known
            elif known != inside:
                yield inside, text[start:i]
                start, inside = i, known
        if text:
            yield inside, text[start:]

    def encode(self, text: str, dropout: float = 0.0, rng: Optional[random.Random] = None) -> list[int]:
        ids: list[int] = []
        for known, run in self._runs(text):
            if known:
                ids += super().encode(run, dropout, rng)
            else:
                ids += [self._byte0 + b for b in run.encode("utf-16-be", errors="surrogatepass")]
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        raw = bytearray()
        for i in ids:
            i = int(i)
            if self._byte0 <= i < self._byte0 + 256:
                raw.append(i - self._byte0)
                continue
            if raw:
                out.append(raw.decode("utf-16-be", errors="replace"))
                raw = bytearray()
            piece = self._strings.get(i)
            if piece is not None:  # specials and out-of-range ids are dropped
                out.append(piece)
        if raw:
            out.append(raw.decode("utf-16-be", errors="replace"))
        return "".join(out)


def build_tokenizer(
    kind: str,
    texts: Iterable[str] | None = None,
    vocab_size: int = 2048,
    min_frequency: int = 2,
    alphabet_size: Optional[int] = None,
) -> TextTokenizer:
    """Create a tokenizer by name: "byte" (no training), "bpe" or "char_bpe" (trained on `texts`;
    `alphabet_size` applies to "char_bpe" only)."""
    if kind == ByteTokenizer.kind:
        return ByteTokenizer()
    if kind in (BPETokenizer.kind, CharBPETokenizer.kind):
        if texts is None:
            raise ValueError(f"build_tokenizer({kind!r}) needs `texts` to train on")
        if kind == CharBPETokenizer.kind:
            return CharBPETokenizer.train(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                                          alphabet_size=alphabet_size)
        return BPETokenizer.train(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'byte', 'bpe' or 'char_bpe'")


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """Load any tokenizer written by `TextTokenizer.save`."""
    return TextTokenizer.load(path)
