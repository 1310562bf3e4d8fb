"""Rank-aware sampler whose epoch order is a pure function of (seed, epoch), so it can resume mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Seeded, sharded sampler that can skip the samples a rank already consumed this epoch."""

    def __init__(
        self,
        num_samples: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self._resume: dict | None = None

    def __len__(self) -> int:
        """Samples this rank yields in a full epoch (a resumed epoch yields fewer)."""
        if self.drop_last:
            return self.num_samples // self.world_size
        return -(-self.num_samples // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next `__iter__` produces (Lightning calls this)."""
        self.epoch = epoch

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's full index order for `epoch`, ignoring any resume offset."""
        n = self.num_samples
        if self.shuffle:
            # A fresh generator per epoch: the order never depends on how many
            # epochs this process has already iterated (unlike a shared RNG stream).
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        total = len(self) * self.world_size
        if total <= n:
            order = order[:total]
        elif n > 0:
            # Wrap around so every rank gets the same count (ranks must agree on batch counts).
            reps = -(-total // n)
            order = order.repeat(reps)[:total]
        return order[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        """Yield this rank's indices for the current epoch, minus the resumed prefix if any."""
        indices = self.epoch_order(self.epoch)
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] == self.epoch:
            indices = indices[resume["consumed"] :]
        # Built eagerly, so the skip is decided when the DataLoader calls iter(), not on first next().
        return iter(indices)

    def load_state_dict(self, state: dict) -> None:
        """Resume inside `state["epoch"]` after `state["consumed"]` samples of this rank; applies once."""
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed < 0:
            raise ValueError(f"consumed must be >= 0, got {consumed}")
        self._resume = {"epoch": epoch, "consumed": consumed}
        self.epoch = epoch

    @staticmethod
    def state_for(epoch: int, consumed_batches: int, batch_size: int) -> dict:
        """State to checkpoint after `consumed_batches` per-rank batches of `epoch`."""
        return {"epoch": int(epoch), "consumed": int(consumed_batches) * int(batch_size)}
