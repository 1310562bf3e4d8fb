"""DataModule serving a token cache (tools/tokenize_dataset.py) to autoregressive models.

It loads the frozen tokenizer it is given (which the LightningModule can ask for, to build
scale inputs and to decode samples) and refuses a cache whose manifest records another tokenizer:
tokens are only meaningful to the exact weights that wrote them.

Shards are checked against the manifest's sha256 (`verify_shard`) and then opened memory-mapped
(`torch.load(mmap=True, weights_only=True)`): items are read from the page cache as they are
indexed, never concatenated, so a cache larger than memory can be served.
"""

from __future__ import annotations

import logging
import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset

from datamodules.media import MediaDataModule
from datamodules.token_cache import read_manifest, verify_shard
from models.tokenizers.checkpoint import load_media_tokenizer

__all__ = ["TokenBatch", "TokenDataModule", "TokenDataset", "collate_tokens", "load_shard"]

log = logging.getLogger(__name__)


@dataclass
class TokenBatch:
    """Cached tokens of B items.

    tokens: per scale, visual bits uint8 [B, T', h, w, d] (or indices [B, T', h, w]); audio: one
        tensor [B, F, Q] of codes. features: the tokenizer's continuous latent [B, d, T', H, W]
        (visual caches built with features) or None. labels/index: int64 [B].
    """

    tokens: list[torch.Tensor]
    labels: torch.Tensor
    index: torch.Tensor
    features: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, *args, **kwargs) -> "TokenBatch":
        device = kwargs.get("device", args[0] if args and not isinstance(args[0], torch.dtype) else None)
        mv = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        return TokenBatch([mv(t) for t in self.tokens], mv(self.labels), mv(self.index),
                          None if self.features is None else self.features.to(*args, **kwargs))

    def pin_memory(self) -> "TokenBatch":
        return TokenBatch([t.pin_memory() for t in self.tokens], self.labels.pin_memory(), self.index.pin_memory(),
                          None if self.features is None else self.features.pin_memory())


class TokenDataset(Dataset):
    """The items of a split's shards, in shard order, indexed without concatenating the shards.

    shards: per shard {"tokens": [per scale [n, ...]], "labels": [n], "index": [n], optional
    "features": [n, ...]}, e.g. memory-mapped `torch.load` results; only labels and index (int64 [n])
    are gathered into memory.
    """

    def __init__(self, shards: Sequence[dict]) -> None:
        self.shards = list(shards)
        if self.shards:
            num_scales = len(self.shards[0]["tokens"])
            has_features = "features" in self.shards[0]
            for k, shard in enumerate(self.shards):
                if len(shard["tokens"]) != num_scales or ("features" in shard) != has_features:
                    raise ValueError(f"token cache shard {k} holds other fields than shard 0")
        sizes = [int(s["labels"].shape[0]) for s in self.shards]
        self._starts = [0]
        for n in sizes:
            self._starts.append(self._starts[-1] + n)
        empty = torch.zeros(0, dtype=torch.long)
        self.labels = torch.cat([s["labels"] for s in self.shards]).long() if self.shards else empty
        self.index = torch.cat([s["index"] for s in self.shards]).long() if self.shards else empty.clone()

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, i: int) -> tuple[dict, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} cached items")
        i %= n
        k = bisect.bisect_right(self._starts, i) - 1
        return self.shards[k], i - self._starts[k]

    def __getitem__(self, i: int) -> dict:
        shard, j = self._locate(int(i))
        # views into the mapped shard: only these pages are read; collate copies them into the batch
        out = {"tokens": [t[j] for t in shard["tokens"]], "label": int(self.labels[i]), "index": int(self.index[i])}
        if "features" in shard:
            out["features"] = shard["features"][j]
        return out

    @property
    def tokens(self) -> list[torch.Tensor]:
        """Per scale, every item's tokens concatenated: a copy in memory (for tools and tests)."""
        if not self.shards:
            return []
        return [torch.cat([s["tokens"][k] for s in self.shards]) for k in range(len(self.shards[0]["tokens"]))]

    @property
    def features(self) -> Optional[torch.Tensor]:
        """Every item's features concatenated (a copy in memory), or None for a cache without them."""
        if not self.shards or "features" not in self.shards[0]:
            return None
        return torch.cat([s["features"] for s in self.shards])


def load_shard(cache_dir: Path, entry: dict) -> dict:
    """A verified shard, memory-mapped: tensors read their bytes from the file as they are indexed."""
    path = verify_shard(cache_dir, entry)
    try:
        shard = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError) as e:
        raise ValueError(f"token cache shard {path} cannot be read memory-mapped: {e}") from e
    missing = [k for k in ("tokens", "labels", "index") if k not in shard]
    if missing:
        raise ValueError(f"token cache shard {path} lacks {', '.join(missing)}")
    return shard


def collate_tokens(samples: Sequence[dict]) -> TokenBatch:
    if not samples:
        raise ValueError("collate_tokens got an empty list of samples")
    k = len(samples[0]["tokens"])
    tokens = [torch.stack([s["tokens"][j] for s in samples]) for j in range(k)]
    feats = torch.stack([s["features"] for s in samples]) if "features" in samples[0] else None
    return TokenBatch(tokens, torch.tensor([s["label"] for s in samples], dtype=torch.long),
                      torch.tensor([s["index"] for s in samples], dtype=torch.long), feats)


class TokenDataModule(MediaDataModule):
    """Batches of `TokenBatch` from a token cache, with the loaders/resume of the media DataModules.

    cache_dir: the cache (tools/tokenize_dataset.py OUT_DIR).
    tokenizer_ckpt: the tokenizer the model will decode with; it must be the one that wrote the cache.
    Both must be set by the time the DataModule is built (an experiment's `requires` may build them).
    """

    modality = "token"

    def __init__(self, cache_dir: Optional[str] = None, tokenizer_ckpt: Optional[str] = None, batch_size: int = 8,
                 seed: int = 0, num_workers: int = 0, pin_memory: bool = False) -> None:
        for key, value in (("cache_dir", cache_dir), ("tokenizer_ckpt", tokenizer_ckpt)):
            if not value:
                raise ValueError(f"data.{key} is not set: give a token cache and the tokenizer that wrote it "
                                 "(tools/tokenize_dataset.py), or list it under `requires` to build it")
        super().__init__(source=str(cache_dir), batch_size=batch_size, seed=seed, num_workers=num_workers,
                         pin_memory=pin_memory)
        self.cache_dir = Path(cache_dir)
        self.tokenizer_ckpt = tokenizer_ckpt
        self.tokenizer = None
        self.tokenizer_info: dict = {}
        self.manifest: dict = {}

    def _build(self) -> None:
        manifest = read_manifest(self.cache_dir)
        tokenizer, info = load_media_tokenizer(self.tokenizer_ckpt)
        written_by = manifest["tokenizer"]
        if written_by["digest"] != info["digest"]:
            raise ValueError(
                f"token cache {self.cache_dir} was written by tokenizer {written_by['digest']} "
                f"(checkpoint sha256 {written_by['checkpoint_sha256'][:12]}), but data.tokenizer_ckpt="
                f"{self.tokenizer_ckpt} is tokenizer {info['digest']}: rebuild the cache with "
                "tools/tokenize_dataset.py or pass the tokenizer that wrote it"
            )
        datasets = {}
        for split in ("train", "val", "test"):
            entry = manifest["splits"].get(split)
            if entry is None:
                continue
            if not entry["complete"]:
                raise ValueError(f"token cache {self.cache_dir}: split {split!r} is incomplete "
                                 f"({len(entry['shards'])} shards written); re-run tools/tokenize_dataset.py to finish it")
            parts = [load_shard(self.cache_dir, s) for s in entry["shards"]]
            if not parts:
                continue
            datasets[split] = TokenDataset(parts)
        if "train" not in datasets:
            raise ValueError(f"token cache {self.cache_dir} has no train split")
        self.manifest = manifest
        self.tokenizer, self.tokenizer_info = tokenizer, info
        self.class_names = list(manifest["data"].get("class_names") or [])
        self.num_classes = int(manifest["data"].get("num_classes") or len(self.class_names))
        self.train_dataset = datasets["train"]
        self.val_dataset = datasets.get("val", TokenDataset([]))
        self.test_dataset = datasets.get("test", self.val_dataset)

    def _collate_fn(self) -> Callable:
        return collate_tokens
