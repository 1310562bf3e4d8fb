"""Progressive window schedule for MoUE (continued training after MoE -> MoUE conversion)."""

from __future__ import annotations

from typing import Any

import lightning as L


class MoUEWindowSchedule(L.Callback):
    """Open the MoUE window W step by step, e.g. 1 -> 2 -> 3 at 0 / 25 / 50% of training.

    Sets the module's documented knob `moue_window` at the start of every training batch, from
    `milestones`: a list of [at, window] pairs, `at` a fraction of the planned steps
    (`unit: fraction`, of `trainer.max_steps` / `model.optim.total_steps`) or a global step
    (`unit: step`). The window is a function of the global step, so a resumed run continues the
    same schedule; the current value is also checkpointed and logged as `moue/window`.
    """

    def __init__(self, milestones: list[list[float]], unit: str = "fraction"):
        if unit not in ("fraction", "step"):
            raise ValueError(f"callbacks.moue_window.unit={unit!r} must be 'fraction' or 'step'")
        if not milestones:
            raise ValueError("callbacks.moue_window.milestones must not be empty")
        pts = sorted((float(at), int(w)) for at, w in milestones)
        if pts[0][0] != 0:
            raise ValueError("callbacks.moue_window.milestones must start at 0")
        if any(w2 < w1 for (_, w1), (_, w2) in zip(pts, pts[1:])):
            raise ValueError(f"callbacks.moue_window windows must not shrink: {milestones}")
        self.milestones, self.unit = pts, unit
        self.current: int | None = None

    def window_at(self, step: int, total_steps: int) -> int:
        window = self.milestones[0][1]
        for at, w in self.milestones:
            threshold = at * total_steps if self.unit == "fraction" else at
            if step >= threshold:
                window = w
        return window

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        window = self.window_at(trainer.global_step, pl_module.planned_steps)
        if window != pl_module.moue_window:
            pl_module.moue_window = window
        self.current = window

    def on_train_start(self, trainer, pl_module) -> None:
        self._apply(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._apply(trainer, pl_module)
        pl_module.log("moue/window", float(self.current), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current, "milestones": self.milestones, "unit": self.unit}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current = state_dict.get("current")
