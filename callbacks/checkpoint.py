"""Checkpointing callback: Lightning's ModelCheckpoint plus a `last.ckpt` of the final training step."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ModelCheckpoint that always leaves a `last.ckpt` of the run's final state.

    Lightning saves after validation and every N steps; a run that reaches `max_steps` between two
    of those would otherwise leave a `last.ckpt` that is not its final state, and resuming from it
    would redo finished steps. The final step's `last.ckpt` is written at the end of that training
    batch, while the epoch is still open: a checkpoint written later, when training ends, records
    the epoch as finished (Lightning closes the epoch loop on `max_steps`), so a resume would start
    the next epoch's data instead of the rest of this one. Training that ends another way (epochs,
    early stopping) gets its `last.ckpt` when it ends.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._final_step_saved: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if not (final and self.save_last) or trainer.fast_dev_run or trainer.sanity_checking:
            return
        if self._last_global_step_saved != trainer.global_step:  # else the parent just wrote it
            previous = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            # not a top-k save: a validation at this same step must still be able to write its own
            self._last_global_step_saved = previous
        self._final_step_saved = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self._final_step_saved == trainer.global_step:
            return  # written at the final batch, mid-epoch (a validation after it re-wrote it if it ran)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
