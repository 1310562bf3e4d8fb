"""Checkpointing callback: Lightning's ModelCheckpoint plus a final `last.ckpt`."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ModelCheckpoint that also writes `last.ckpt` when training ends.

    Lightning saves after validation and every N steps; a run that reaches `max_steps` between
    two of those (or is stopped early) would otherwise leave a `last.ckpt` that is not its final
    state, and resuming from it would redo finished steps.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
