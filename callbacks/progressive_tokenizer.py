"""ERNIE 5.0's progressive tokenizer switching (papers.md 4.2): the backbone trains on a visual
tokenizer of few bits first and moves to tokenizers of more bits, ending on the final one.

The run's visual tokenizers are `data.visual_tokenizer_stages` (fewest bits first) and then
`data.visual_tokenizer`; the module's `visual_stage` knob picks the one in use (lit_modules/ernie5.py).
"""

from __future__ import annotations

from typing import Sequence

import lightning as L

__all__ = ["ProgressiveTokenizer"]


class ProgressiveTokenizer(L.Callback):
    """Before every training batch, set `pl_module.visual_stage` to the number of switch points the
    step has reached: stage 0 (the fewest bits) until `switch_at[0]`, stage i from `switch_at[i - 1]`,
    the final tokenizer from `switch_at[-1]` on. A switch point is a step (an int >= 1) or a fraction
    of the planned steps (a float in (0, 1), `module.planned_steps`); one per stage tokenizer, in order.

    The stage is a pure function of the step, so a resumed run continues the same schedule. Validation
    and sampling use the stage in force (val losses of different stages score different bits: compare
    runs at the final stage). Logs `train/visual_bits`.
    """

    def __init__(self, switch_at: Sequence = (0.25, 0.5)) -> None:
        points = list(switch_at or [])
        for i, v in enumerate(points):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or (isinstance(v, float) and v >= 1):
                raise ValueError(f"callbacks.progressive_tokenizer.switch_at.{i} must be a step >= 1 or a fraction "
                                 f"in (0, 1), got {v!r}")
        self.switch_at = points

    def steps(self, planned: int) -> list[int]:
        """The switch points as steps (equal points, e.g. fractions of a very short run, skip a stage)."""
        out = [int(round(v * planned)) if isinstance(v, float) else int(v) for v in self.switch_at]
        if any(b < a for a, b in zip(out, out[1:])):
            raise ValueError(f"callbacks.progressive_tokenizer.switch_at must ascend, got {self.switch_at} "
                             f"(steps {out} of {planned})")
        return out

    def stage(self, step: int, planned: int) -> int:
        return sum(step >= s for s in self.steps(planned))

    def on_fit_start(self, trainer, pl_module) -> None:
        n = getattr(pl_module, "num_visual_stages", None)
        if n is None:
            raise ValueError("callbacks.progressive_tokenizer needs a module with visual tokenizer stages "
                             "(experiment=ernie5_progressive_tokenizer)")
        if len(self.switch_at) != n - 1:
            raise ValueError(f"callbacks.progressive_tokenizer.switch_at has {len(self.switch_at)} switch points; "
                             f"the run has {n - 1} earlier visual tokenizers (data.visual_tokenizer_stages), "
                             "so it needs one per stage")
        self.steps(pl_module.planned_steps)  # fail now, not at the first switch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        pl_module.visual_stage = self.stage(trainer.global_step, pl_module.planned_steps)
        pl_module.log("train/visual_bits", float(pl_module.visual_stage_slice()[1]), on_step=True, on_epoch=False)
