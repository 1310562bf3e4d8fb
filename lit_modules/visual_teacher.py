"""LightningModule training the image attribute classifier that stands in for a vision foundation model as
the visual tokenizer's semantic teacher offline (`models/tokenizers/semantic.py`): each labelled image is
classified, one head per attribute, from its pooled feature map. The label is the mixed-radix class of
`data.labels=attributes` (`datamodules.captions.attribute_label`), split into one target per head; the
loss is the sum of the heads' cross-entropies. Unlabelled images are skipped."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from datamodules.captions import split_attribute_label
from lit_modules.base import ExperimentModule, OptimConfig
from models.tokenizers.semantic import AttributeClassifierConfig, ImageAttributeClassifier

__all__ = ["VisualTeacherModule"]


class VisualTeacherModule(ExperimentModule):
    """net: AttributeClassifierConfig fields. Logs the loss and each head's accuracy (`val/acc_colour`, ...)."""

    def __init__(self, net: dict, optim: Optional[dict] = None, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        try:
            self.net_cfg = AttributeClassifierConfig.from_dict(dict(net))
        except ValueError as e:
            raise ValueError(f"invalid model.net: {e}") from e
        self.optim_cfg = OptimConfig.from_dict(dict(optim or {}))
        self.seed = seed
        self.net: Optional[ImageAttributeClassifier] = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = ImageAttributeClassifier(self.net_cfg)

    def _step(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        keep = batch.labels >= 0
        if not bool(keep.any()):
            raise ValueError("the visual teacher trains on labelled images (data.labels=attributes)")
        classes = math.prod(self.net_cfg.heads)
        if int(batch.labels[keep].max()) >= classes:
            raise ValueError(f"label {int(batch.labels[keep].max())} >= {classes}, the classes of model.net.heads="
                             f"{list(self.net_cfg.heads)} (train on data.labels=attributes)")
        targets = split_attribute_label(batch.labels[keep], self.net_cfg.heads)
        logits = self.net(batch.pixels[keep])
        loss = sum(F.cross_entropy(lg, y) for lg, y in zip(logits, targets))
        acc = {name: (lg.argmax(-1) == y).float().mean()
               for name, lg, y in zip(self.net_cfg.head_names, logits, targets)}
        return loss, acc

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, acc = self._step(batch)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        self.log_dict({f"train/acc_{k}": v for k, v in acc.items()}, on_step=True, on_epoch=False)
        return loss

    @torch.no_grad()
    def _evaluate(self, batch, stage: str) -> None:
        loss, acc = self._step(batch)
        kw = dict(on_epoch=True, batch_size=int((batch.labels >= 0).sum()), sync_dist=True)
        self.log(f"{stage}/loss", loss, prog_bar=True, **kw)
        self.log_dict({f"{stage}/acc_{k}": v for k, v in acc.items()}, **kw)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["teacher"] = {"kind": "attribute_classifier", "config": self.net_cfg.to_dict()}
