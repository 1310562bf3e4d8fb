"""LightningModule training the frame classifier that stands in for Whisper as the audio tokenizer's
semantic teacher offline (`models/tokenizers/semantic.py`): every log-mel frame of a labelled clip is
classified as the clip's sound class (cross-entropy over frames; unlabelled clips are skipped)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lit_modules.teacher import TeacherModule
from models.tokenizers.semantic import AudioFrameClassifier, FrameClassifierConfig

__all__ = ["AudioTeacherModule"]


class AudioTeacherModule(TeacherModule):
    """net: FrameClassifierConfig fields. Logs loss and frame / clip accuracy (clip: mean logits)."""

    config_cls, net_cls, kind = FrameClassifierConfig, AudioFrameClassifier, "frame_classifier"

    def _step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keep = batch.labels >= 0
        if not bool(keep.any()):
            raise ValueError("the audio teacher trains on labelled clips (synthetic audio, or data.labels_from_dirs=true)")
        if int(batch.labels[keep].max()) >= self.net_cfg.num_classes:
            raise ValueError(f"label {int(batch.labels[keep].max())} >= model.net.num_classes={self.net_cfg.num_classes}")
        logits = self.net(batch.waveform[keep])  # [B, T, C]
        y = batch.labels[keep]
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(logits.shape[1]))
        return loss, logits, y

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, logits, y = self._step(batch)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/frame_acc", (logits.argmax(-1) == y[:, None]).float().mean(), on_step=True, on_epoch=False)
        return loss

    @torch.no_grad()
    def _evaluate(self, batch, stage: str) -> None:
        loss, logits, y = self._step(batch)
        kw = dict(on_epoch=True, batch_size=y.shape[0], sync_dist=True)
        self.log(f"{stage}/loss", loss, prog_bar=True, **kw)
        self.log(f"{stage}/frame_acc", (logits.argmax(-1) == y[:, None]).float().mean(), **kw)
        self.log(f"{stage}/clip_acc", (logits.mean(1).argmax(-1) == y).float().mean(), **kw)
