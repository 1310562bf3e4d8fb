"""Batch type for language modelling and its collate function."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["LMBatch", "collate_lm"]


@dataclass
class LMBatch:
    """Input tokens and next-token targets, both [B, T] int64."""

    tokens: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def pin_memory(self) -> LMBatch:
        """Pinned copy; the DataLoader calls this on custom batch types when pin_memory=True."""
        return LMBatch(self.tokens.pin_memory(), self.targets.pin_memory())

    def to(self, *args, **kwargs) -> LMBatch:
        """Move/cast both tensors like `Tensor.to`."""
        return LMBatch(self.tokens.to(*args, **kwargs), self.targets.to(*args, **kwargs))


def collate_lm(samples: Sequence[Mapping[str, torch.Tensor] | Sequence[torch.Tensor]]) -> LMBatch:
    """Stack samples given as {"tokens", "targets"} dicts or (tokens, targets) pairs into an LMBatch."""
    if len(samples) == 0:
        raise ValueError("collate_lm got an empty list of samples")
    if isinstance(samples[0], Mapping):
        tokens = [s["tokens"] for s in samples]
        targets = [s["targets"] for s in samples]
    else:
        tokens = [s[0] for s in samples]
        targets = [s[1] for s in samples]
    return LMBatch(
        tokens=torch.stack([torch.as_tensor(t) for t in tokens]).long(),
        targets=torch.stack([torch.as_tensor(t) for t in targets]).long(),
    )
