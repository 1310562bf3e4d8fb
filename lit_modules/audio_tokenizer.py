"""LightningModule training the mel residual-VQ audio tokenizer on `AudioBatch.waveform`.

Loss: L1 + L2 between normalised log-mels, plus the residual VQ's commitment (codebooks follow EMAs),
plus, with `semantic.teacher`, the first code's distillation (papers.md 4.3): a linear projection of the
level-1 quantized vectors (straight-through to the encoder) should point where the teacher's frame
features, average-pooled to the codec's frame rate, point: weight x (1 - cosine), per frame.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

from lit_modules.base import ExperimentModule, OptimConfig
from models.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig
from models.config import config_from_dict
from models.tokenizers.checkpoint import load_media_tokenizer
from models.tokenizers.semantic import SemanticConfig, load_teacher, pool_to

__all__ = ["AudioTokenizerModule", "load_audio_tokenizer"]


def load_audio_tokenizer(path: str) -> AudioTokenizer:
    """A frozen, eval-mode audio tokenizer from a training checkpoint or an export."""
    tok, _ = load_media_tokenizer(path, expect_kind="audio")
    return tok


def snr_db(ref: torch.Tensor, est: torch.Tensor) -> torch.Tensor:
    """10 log10(|ref|^2 / |ref - est|^2), over all elements."""
    return 10 * torch.log10(ref.pow(2).sum() / (ref - est).pow(2).sum().clamp_min(1e-12))


class AudioTokenizerModule(ExperimentModule):
    """Trains `models.tokenizers.audio.AudioTokenizer`.

    net: AudioTokenizerConfig fields. l1 / l2: weights of the mel reconstruction terms.
    log_samples: clips logged to TensorBoard (original and Griffin-Lim reconstruction) per validation.
    semantic: SemanticConfig (module docstring); the projection lives here, not in the exported tokenizer.
    """

    def __init__(self, net: dict, optim: Optional[dict] = None, l1: float = 1.0, l2: float = 1.0, seed: int = 0,
                 log_samples: int = 2, semantic: Optional[dict] = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        try:
            self.net_cfg = AudioTokenizerConfig.from_dict(dict(net))
        except ValueError as e:
            raise ValueError(f"invalid model.net: {e}") from e
        if l1 < 0 or l2 < 0:
            raise ValueError("model.l1 and model.l2 must be >= 0")
        self.optim_cfg = OptimConfig.from_dict(dict(optim or {}))
        self.l1, self.l2 = l1, l2
        self.seed = seed
        self.log_samples = log_samples
        self.semantic_cfg = config_from_dict(SemanticConfig, dict(semantic or {}), "model.semantic")
        self.semantic_proj: Optional[torch.nn.Linear] = None
        self.net: AudioTokenizer | None = None
        self._samples: Optional[torch.Tensor] = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = AudioTokenizer(self.net_cfg)
        if self.semantic_cfg.teacher and self.semantic_proj is None:
            teacher = load_teacher(self.semantic_cfg.teacher, expect_rate=self.net_cfg.sample_rate)
            object.__setattr__(self, "_teacher", teacher)  # frozen, outside the module tree and checkpoints
            self.semantic_proj = torch.nn.Linear(self.net_cfg.latent_dim, teacher.dim)

    @property
    def teacher(self):
        return self.__dict__.get("_teacher")

    def semantic_cosine(self, wave: torch.Tensor, out: dict) -> torch.Tensor:
        """Mean cosine between the projected level-1 vectors and the teacher's pooled frame features."""
        teacher = self.teacher
        if next(teacher.parameters()).device != wave.device:
            teacher.to(wave.device)
        with torch.no_grad():
            target = pool_to(teacher.features(wave).float(), out["codes"].shape[1])
        pred = self.semantic_proj(self.net.first_level(out["latent"], out["codes"]))
        return F.cosine_similarity(pred, target, dim=-1).mean()

    def _losses(self, wave: torch.Tensor) -> tuple[dict, dict]:
        out = self.net(wave)
        mel, mel_hat = out["mel"], out["mel_hat"]
        l1 = (mel_hat - mel).abs().mean()
        l2 = F.mse_loss(mel_hat, mel)
        loss = self.l1 * l1 + self.l2 * l2 + out["vq_loss"]
        terms = {"mel_l1": l1, "mel_l2": l2, "vq": out["vq_loss"]}
        if self.semantic_proj is not None:
            cos = self.semantic_cosine(wave, out)
            loss = loss + self.semantic_cfg.weight * (1 - cos)
            terms["semantic_cos"] = cos
        return {"loss": loss, **terms}, out

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        losses, out = self._losses(batch.waveform)
        logs = {f"train/{k}": v.detach() for k, v in losses.items()}
        for q, (p, u) in enumerate(zip(out["perplexity"], out["usage"])):
            logs[f"train/perplexity_level_{q + 1}"] = p
            logs[f"train/usage_level_{q + 1}"] = u
        self.log_dict(logs, on_step=True, on_epoch=False)
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "num_bad_files"):
            self.log("data/bad_files", float(dm.num_bad_files), on_step=True, on_epoch=False)
        return losses["loss"]

    @torch.no_grad()
    def _evaluate(self, batch, stage: str, batch_idx: int) -> None:
        wave = batch.waveform
        losses, out = self._losses(wave)
        n = wave.shape[0]
        kw = dict(on_epoch=True, batch_size=n, sync_dist=True)
        self.log(f"{stage}/loss", losses["loss"], prog_bar=True, **kw)
        self.log(f"{stage}/mel_l1", losses["mel_l1"], **kw)
        self.log(f"{stage}/mel_snr_db", snr_db(out["mel"], out["mel_hat"]), **kw)
        if "semantic_cos" in losses:
            self.log(f"{stage}/semantic_cos", losses["semantic_cos"], **kw)
        codes = out["codes"]
        for q in range(codes.shape[-1]):
            counts = torch.bincount(codes[..., q].flatten(), minlength=self.net_cfg.codebook_size).float()
            p = counts / counts.sum()
            self.log(f"{stage}/perplexity_level_{q + 1}", torch.exp(-(p * p.clamp_min(1e-12).log()).sum()), **kw)
            self.log(f"{stage}/usage_level_{q + 1}", (counts > 0).float().mean(), **kw)
            # reconstruction error when only the first q + 1 levels are decoded
            mel_q = self.net.decode(codes, q + 1)
            self.log(f"{stage}/mel_l1_levels_{q + 1}", (mel_q - out["mel"]).abs().mean(), **kw)
        if stage == "val" and batch_idx == 0 and self.log_samples > 0:
            self._samples = wave[: self.log_samples].detach().cpu()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    @torch.no_grad()
    def on_validation_epoch_end(self) -> None:
        if self._samples is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        wave, self._samples = self._samples.to(self.device), None
        writers = [lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers:
            return
        codes = self.net.encode(wave)
        mel, mel_hat = self.net.log_mel(wave), self.net.decode(codes)
        recon = self.net.mel_to_wave(mel_hat, wave.shape[-1]).clamp(-1, 1).cpu()
        sr = self.net_cfg.sample_rate
        for w in writers:
            for i in range(wave.shape[0]):
                w.add_audio(f"samples/original_{i}", wave[i].cpu(), self.global_step, sample_rate=sr)
                w.add_audio(f"samples/reconstruction_{i}", recon[i], self.global_step, sample_rate=sr)
                pair = torch.cat([mel[i], mel_hat[i]], dim=0).flip(0).cpu()  # low frequencies at the bottom
                img = ((pair - pair.min()) / (pair.max() - pair.min()).clamp_min(1e-6))[None]
                w.add_image(f"samples/mel_{i}", img, self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["tokenizer"] = {"kind": "audio", "config": self.net_cfg.to_dict()}
