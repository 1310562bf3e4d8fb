"""What the DataModules here share: the global batch split over ranks and exact mid-epoch resume.

Subclasses create `self._train_sampler` (a `ResumableSampler`) in `train_dataloader` and apply
`self._pending_sampler_state` to it when set; `batch_size` is the GLOBAL batch size.
"""

from __future__ import annotations

import logging
import warnings

import lightning as L

from datamodules.sampler import ResumableSampler

__all__ = ["ResumableDataModule"]

log = logging.getLogger(__name__)


class ResumableDataModule(L.LightningDataModule):
    """Rank/world helpers, per-rank batch size, and sampler-position `state_dict`/`load_state_dict`."""

    batch_size: int
    _train_sampler: ResumableSampler | None = None
    _pending_sampler_state: dict | None = None

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def per_rank_batch_size(self) -> int:
        """Global `batch_size` divided by the world size (which must divide it)."""
        _, world = self._rank_and_world()
        if self.batch_size % world != 0:
            raise ValueError(
                f"data.batch_size={self.batch_size} is the global batch size and must be divisible by "
                f"the world size ({world} processes)"
            )
        return self.batch_size // world

    # -- samplers ------------------------------------------------------------------

    def _make_train_sampler(self, num_items: int, too_few: str) -> ResumableSampler:
        """Shuffled, rank-sharded train sampler with any pending resume position applied.

        too_few: the error message when this rank would get less than one batch.
        """
        # Lightning warns that a plain DataLoader cannot resume mid-epoch; these DataModules restore the
        # sampler position themselves (state_dict/load_state_dict), so the warning does not apply here.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
        rank, world = self._rank_and_world()
        sampler = ResumableSampler(num_items, self.seed, shuffle=True, rank=rank, world_size=world)
        if len(sampler) < self.per_rank_batch_size():
            raise ValueError(too_few)
        if self._pending_sampler_state is not None:
            sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None
        self._train_sampler = sampler
        return sampler

    def _make_eval_sampler(self, num_items: int) -> ResumableSampler:
        """Sequential sampler over this rank's shard of an evaluation split."""
        rank, world = self._rank_and_world()
        # Padding by wrapping (drop_last=False) keeps per-rank batch counts equal, as collective
        # ops in DDP require; the few duplicated items only matter when world > 1.
        return ResumableSampler(num_items, self.seed, shuffle=False, rank=rank, world_size=world, drop_last=False)

    # -- exact resume ------------------------------------------------------------

    def state_dict(self) -> dict:
        """Sampler position from the trainer's progress counters (not from prefetching workers)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        epoch = trainer.current_epoch
        num_batches = getattr(trainer, "num_training_batches", float("inf"))
        if ready >= num_batches:
            # A finished epoch is stored as "start of the next one": with workers the
            # DataLoader draws the sampler order before Lightning calls set_epoch, so
            # the restored epoch must already be the one that runs next.
            epoch, ready = epoch + 1, 0
        _, world = self._rank_and_world()
        state = ResumableSampler.state_for(epoch, ready, self.per_rank_batch_size())
        return {"sampler": state, "world_size": world}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the sampler position; applied now or when the train loader is created."""
        state = state_dict.get("sampler")
        if state is None:
            return
        state = dict(state)
        _, world = self._rank_and_world()
        saved_world = state_dict.get("world_size", world)
        if saved_world != world:
            # Rank r takes every world-th index of the same global order, so skipping the
            # same global prefix (divided over the new ranks) preserves what was seen.
            state["consumed"] = state["consumed"] * saved_world // world
            log.warning("resuming with world size %d instead of %d: mid-epoch position is approximate",
                        world, saved_world)
        if self._train_sampler is not None:
            self._train_sampler.load_state_dict(state)
        else:
            self._pending_sampler_state = state
