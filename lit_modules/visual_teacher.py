"""LightningModule training the image attribute classifier that stands in for a vision foundation model as
the visual tokenizer's semantic teacher offline (`models/tokenizers/semantic.py`): each labelled image is
classified, one head per attribute, from its pooled feature map. The label is the mixed-radix class of
`data.labels=attributes` (`datamodules.captions.attribute_label`), split into one target per head; the
loss is the sum of the heads' cross-entropies. Unlabelled images are skipped."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from datamodules.captions import split_attribute_label
from lit_modules.teacher import TeacherModule
from models.tokenizers.semantic import AttributeClassifierConfig, ImageAttributeClassifier

__all__ = ["VisualTeacherModule"]


class VisualTeacherModule(TeacherModule):
    """net: AttributeClassifierConfig fields. Logs the loss and each head's accuracy (`val/acc_colour`, ...)."""

    config_cls, net_cls, kind = AttributeClassifierConfig, ImageAttributeClassifier, "attribute_classifier"

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
