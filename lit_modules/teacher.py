"""The shared frame of the semantic teachers' LightningModules (`audio_teacher.py`, `visual_teacher.py`):
a classifier built from `model.net`, AdamW from `model.optim`, validation and test through `_evaluate`,
and a checkpoint that `models.tokenizers.semantic.load_teacher` recognises by its `teacher.kind`."""

from __future__ import annotations

from typing import Optional

from torch import nn

from lit_modules.base import ExperimentModule, OptimConfig

__all__ = ["TeacherModule"]


class TeacherModule(ExperimentModule):
    """Subclasses set `config_cls`, `net_cls` and `kind`, and implement `training_step` and `_evaluate`."""

    config_cls: type
    net_cls: type
    kind: str

    def __init__(self, net: dict, optim: Optional[dict] = None, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        try:
            self.net_cfg = self.config_cls.from_dict(dict(net))
        except ValueError as e:
            raise ValueError(f"invalid model.net: {e}") from e
        self.optim_cfg = OptimConfig.from_dict(dict(optim or {}))
        self.seed = seed
        self.net: Optional[nn.Module] = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = self.net_cls(self.net_cfg)

    def _evaluate(self, batch, stage: str) -> None:
        raise NotImplementedError

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["teacher"] = {"kind": self.kind, "config": self.net_cfg.to_dict()}
