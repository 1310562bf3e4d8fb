"""VideoAR's training-time schedules: Cross-Frame Error Correction and the Random Frame Mask.

Each callback computes its values from the global step at the start of every training batch and
sets the module's documented knobs (`cfec`, `frame_mask_prob`, `frame_mask_window`); the values are
logged and checkpointed, and, being a function of the step, continue unchanged after a resume.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Optional

import lightning as L

from models.videoar import CFECConfig

__all__ = ["CrossFrameErrorCorrection", "RandomFrameMask", "ramp_factor"]

SCHEDULES = ("constant", "linear", "cosine", "step")


def ramp_factor(step: int, schedule: str, start_step: int = 0, ramp_steps: int = 0,
                milestones: Optional[list] = None) -> float:
    """A factor in [0, 1] at `step`: 0 before `start_step`, then

    constant: 1; linear / cosine: 0 -> 1 over `ramp_steps`; step: the value of the last
    `[at_step, factor]` milestone reached (0 before the first).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "step":
        out = 0.0
        for at, value in sorted((int(a), float(v)) for a, v in (milestones or [])):
            if step >= at:
                out = value
        return out
    if step < start_step:
        return 0.0
    if schedule == "constant" or ramp_steps <= 0:
        return 1.0
    a = min(1.0, (step - start_step) / ramp_steps)
    return a if schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * a))


class _Scheduled(L.Callback):
    def __init__(self, schedule: str, start_step: int, ramp_steps: int, milestones: Optional[list], name: str) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"callbacks.{name}.schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule == "step" and not milestones:
            raise ValueError(f"callbacks.{name}.milestones must list [step, factor] pairs for schedule=step")
        self.schedule, self.start_step, self.ramp_steps = schedule, start_step, ramp_steps
        self.milestones = [list(m) for m in (milestones or [])]
        self.factor: float | None = None

    def factor_at(self, step: int) -> float:
        return ramp_factor(step, self.schedule, self.start_step, self.ramp_steps, self.milestones)

    def on_train_start(self, trainer, pl_module) -> None:
        self._apply(trainer.global_step, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._apply(trainer.global_step, pl_module)
        self._log(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "schedule": self.schedule, "start_step": self.start_step,
                "ramp_steps": self.ramp_steps, "milestones": self.milestones}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.factor = state_dict.get("factor")


class CrossFrameErrorCorrection(_Scheduled):
    """Ramp VideoAR's bit corruption: p ~ U(p_min + delta*t, p_max + delta*t), with inheritance.

    The schedule's factor scales `p_max` and `delta` (p_min stays); factor 0 switches CFEC off.
    time_dependent / inherit / requantize are the switches of the ablation (papers.md Table 4).
    """

    def __init__(self, p_min: float = 0.0, p_max: float = 0.25, delta: float = 0.01, time_dependent: bool = True,
                 inherit: bool = True, requantize: bool = True, schedule: str = "constant", start_step: int = 0,
                 ramp_steps: int = 0, milestones: Optional[list] = None) -> None:
        super().__init__(schedule, start_step, ramp_steps, milestones, "cfec")
        self.base = CFECConfig(True, p_min, p_max, delta, time_dependent, inherit, requantize)  # validates

    def config_at(self, step: int) -> CFECConfig:
        f = self.factor_at(step)
        if f <= 0:
            return replace(self.base, enabled=False)
        return replace(self.base, p_max=max(self.base.p_min, f * self.base.p_max), delta=f * self.base.delta)

    def _apply(self, step: int, pl_module) -> None:
        self.factor = self.factor_at(step)
        pl_module.cfec = self.config_at(step)

    def _log(self, pl_module) -> None:
        c = pl_module.cfec
        pl_module.log_dict({"cfec/p_max": float(c.p_max if c.enabled else 0.0), "cfec/delta": float(c.delta if c.enabled else 0.0),
                            "cfec/enabled": float(c.enabled)}, on_step=True, on_epoch=False)


class RandomFrameMask(_Scheduled):
    """Ramp the Random Frame Mask: each earlier frame within `window` frames is hidden from a query
    frame with probability `p_mask * factor` (the condition and the query's own frame never are)."""

    def __init__(self, p_mask: float = 0.1, window: Optional[int] = None, schedule: str = "constant",
                 start_step: int = 0, ramp_steps: int = 0, milestones: Optional[list] = None) -> None:
        super().__init__(schedule, start_step, ramp_steps, milestones, "frame_mask")
        if not 0.0 <= p_mask < 1.0:
            raise ValueError(f"callbacks.frame_mask.p_mask must be in [0, 1), got {p_mask}")
        if window is not None and window < 1:
            raise ValueError(f"callbacks.frame_mask.window must be >= 1 or null, got {window}")
        self.p_mask, self.window = p_mask, window

    def _apply(self, step: int, pl_module) -> None:
        self.factor = self.factor_at(step)
        pl_module.frame_mask_prob = self.p_mask * self.factor
        pl_module.frame_mask_window = self.window

    def _log(self, pl_module) -> None:
        pl_module.log_dict({"frame_mask/p_mask": float(pl_module.frame_mask_prob),
                            "frame_mask/window": float(pl_module.frame_mask_window or 0)}, on_step=True, on_epoch=False)
