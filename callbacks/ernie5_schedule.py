"""ERNIE 5.0's two-stage knob schedule: the MTP loss weight and the router bias speed drop at mid-training.

papers.md 4.4: the 8K stage trains with MTP weight 0.3 and aux-loss-free bias speed 1e-4;
mid-training lowers them to 0.1 and 1e-5 (the lower speed suppresses routing oscillation).
"""

from __future__ import annotations

import lightning as L

__all__ = ["StageSchedule"]


class StageSchedule(L.Callback):
    """Before every training batch, set the module's `mtp_weight` and `bias_update_rate` knobs to
    their stage-1 values before `switch_at` (a fraction of the planned steps, `module.planned_steps`)
    and to their stage-2 values from then on. A pure function of the step: a resumed run continues
    the same schedule (nothing to checkpoint). A value of null leaves that knob alone."""

    def __init__(self, switch_at: float = 0.5, mtp_weight: tuple = (0.3, 0.1),
                 bias_update_rate: tuple = (1e-4, 1e-5)) -> None:
        if not 0.0 <= switch_at <= 1.0:
            raise ValueError(f"callbacks.ernie5_schedule.switch_at must be in [0, 1], got {switch_at}")
        for key, pair in (("mtp_weight", mtp_weight), ("bias_update_rate", bias_update_rate)):
            if pair is not None and (len(pair) != 2 or min(float(v) for v in pair) < 0):
                raise ValueError(f"callbacks.ernie5_schedule.{key} must be [stage 1, stage 2] values >= 0 or null, "
                                 f"got {pair}")
        self.switch_at = float(switch_at)
        self.mtp_weight = None if mtp_weight is None else [float(v) for v in mtp_weight]
        self.bias_update_rate = None if bias_update_rate is None else [float(v) for v in bias_update_rate]

    def stage(self, step: int, planned: int) -> int:
        return int(step >= self.switch_at * planned)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        s = self.stage(trainer.global_step, pl_module.planned_steps)
        if self.mtp_weight is not None:
            pl_module.mtp_weight = self.mtp_weight[s]
        if self.bias_update_rate is not None and pl_module.sparse:
            pl_module.bias_update_rate = self.bias_update_rate[s]
        pl_module.log("train/stage", float(s + 1), on_step=True, on_epoch=False)
