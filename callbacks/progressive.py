"""Progressive learning (ERNIE 3.0, papers.md 3.3): sequence length, batch size, learning rate and
dropout grow together, smoothly, over the first `steps` optimiser steps.

Each value is start + (end - start) * ramp(step / steps), ramp 'linear' or 'cosine' (0 -> 1), and
holds its end value after `steps`. The callback sets documented knobs: the DataModule's
`progressive` (a function from the global micro-batch index to its sequence length and batch size,
so a prefetched batch has the shape of the step it belongs to) and, before every training batch,
the module's `lr_scale` (multiplies the scheduled learning rate, so warm-up composes with it) and
`dropout_now`. Being a function of the global step, the ramp continues unchanged after a resume.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L

__all__ = ["ProgressiveLearning", "ramp_value"]

SHAPES = ("linear", "cosine")


def ramp_value(step: int, steps: int, start: float, end: float, shape: str = "linear") -> float:
    """start -> end over `steps` steps (end afterwards)."""
    a = 1.0 if steps <= 0 else min(1.0, step / steps)
    if shape == "cosine":
        a = 0.5 * (1.0 - math.cos(math.pi * a))
    return start + (end - start) * a


class ProgressiveLearning(L.Callback):
    """Ramp [start, end] pairs over the first `steps` steps; a null pair leaves that knob alone.

    seq_len: tokens per example / segment (rounded down to a multiple of `seq_multiple`);
    batch_size: global batch (rounded down to a multiple of the world size); lr_scale: factor on the
    scheduled learning rate; dropout: the network's dropout probability.
    """

    def __init__(self, steps: int = 200, shape: str = "linear", seq_len: Optional[list] = None,
                 batch_size: Optional[list] = None, lr_scale: Optional[list] = None, dropout: Optional[list] = None,
                 seq_multiple: int = 8) -> None:
        if steps < 0:
            raise ValueError(f"callbacks.progressive.steps must be >= 0, got {steps}")
        if shape not in SHAPES:
            raise ValueError(f"callbacks.progressive.shape must be one of {list(SHAPES)}, got {shape!r}")
        for name, pair in (("seq_len", seq_len), ("batch_size", batch_size), ("lr_scale", lr_scale), ("dropout", dropout)):
            if pair is not None and (len(pair) != 2 or min(pair) < 0):
                raise ValueError(f"callbacks.progressive.{name} must be [start, end] (>= 0) or null, got {pair}")
        if dropout is not None and max(dropout) >= 1:
            raise ValueError(f"callbacks.progressive.dropout must stay below 1, got {dropout}")
        self.steps, self.shape, self.seq_multiple = steps, shape, seq_multiple
        self.pairs = {"seq_len": seq_len, "batch_size": batch_size, "lr_scale": lr_scale, "dropout": dropout}
        self.current: dict[str, Any] = {}

    def values_at(self, step: int, world_size: int = 1) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, pair in self.pairs.items():
            if pair is None:
                continue
            v = ramp_value(step, self.steps, float(pair[0]), float(pair[1]), self.shape)
            if name == "seq_len":
                v = max(self.seq_multiple, int(v) // self.seq_multiple * self.seq_multiple)
            elif name == "batch_size":
                v = max(world_size, int(v) // world_size * world_size)
            out[name] = v
        return out

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        dm = trainer.datamodule
        if (self.pairs["seq_len"] or self.pairs["batch_size"]) and not hasattr(dm, "progressive"):
            raise ValueError(f"callbacks.progressive: {type(dm).__name__} has no `progressive` knob (seq_len / batch_size)")
        for knob, name in (("lr_scale", "lr_scale"), ("dropout_now", "dropout")):
            if self.pairs[name] is not None and not hasattr(pl_module, knob):
                raise ValueError(f"callbacks.progressive.{name}: {type(pl_module).__name__} has no `{knob}` knob")
        if self.pairs["seq_len"] or self.pairs["batch_size"]:
            accumulate, world = max(1, trainer.accumulate_grad_batches), trainer.world_size

            def shape(index: int) -> dict:
                # the DataModule asks per global micro-batch index: the step it belongs to decides
                values = self.values_at(index // accumulate, world)
                return {k: values[k] for k in ("seq_len", "batch_size") if k in values}

            dm.progressive = shape

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        values = self.values_at(trainer.global_step, trainer.world_size)
        if "lr_scale" in values:
            pl_module.lr_scale = values["lr_scale"]
        if "dropout" in values:
            pl_module.dropout_now = values["dropout"]
        self.current = values
        pl_module.log_dict({f"progressive/{k}": float(v) for k, v in values.items()}, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "shape": self.shape, "pairs": self.pairs, "current": self.current}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current = dict(state_dict.get("current") or {})
