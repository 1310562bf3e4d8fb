"""LightningModule training ERNIE 5.0's cascaded diffusion refiner (`models/refiner.py`).

Each training image is a high-resolution target; its input is a controlled degradation of itself
(`model.degrade`), drawn from a generator seeded by (seed, batch index, rank), so a resumed run sees
the same inputs. Validation reports the denoising loss and, on `model.sample.val_batches` batches,
DDIM samples scored against the target beside the bicubic upsampling of the same input:
`val/psnr`, `val/psnr_bicubic`, `val/psnr_gain`, `val/ssim`, `val/chroma_ratio`, `val/sharpness_ratio`
(mean gradient magnitude over the target's) and `val/consistency_psnr` (the sample downsampled
again, against its own low-resolution input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics.functional.image import structural_similarity_index_measure

from lit_modules.base import ExperimentModule, OptimConfig, step_seed
from lit_modules.visual_tokenizer import _frames, load_visual_tokenizer
from models.config import config_from_dict
from models.refiner import DegradeConfig, Refiner, RefinerConfig, degrade
from models.tokenizers.metrics import colour_metrics, psnr

__all__ = ["RefinerModule", "RefinerSampleConfig", "refinement_metrics", "sharpness"]


@dataclass
class RefinerSampleConfig:
    """Sampling at validation: DDIM `steps`, `eta`, on the first `val_batches` batches; `log_images`
    examples (input, bicubic, refined, target) to TensorBoard (0 = none)."""

    steps: int = 25
    eta: float = 1.0
    val_batches: int = 1
    log_images: int = 8

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"model.sample.steps must be >= 1, got {self.steps}")
        if self.eta < 0:
            raise ValueError(f"model.sample.eta must be >= 0, got {self.eta}")


def sharpness(x: torch.Tensor) -> float:
    """Mean absolute finite difference (both axes) of images [N, C, H, W]: detail, in pixel units."""
    return float(0.5 * ((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()))


@torch.no_grad()
def refinement_metrics(refined: torch.Tensor, bicubic: torch.Tensor, target: torch.Tensor,
                       low: torch.Tensor) -> dict[str, float]:
    """Scores of refined images against targets, with the bicubic baseline, all [N, 3, H, W] in [-1, 1]."""
    unit = lambda x: (x.float().clamp(-1, 1) + 1) / 2  # noqa: E731
    scale = target.shape[-1] // low.shape[-1]
    down = F.interpolate(refined, scale_factor=1 / scale, mode="area") if scale > 1 else refined
    out = {
        "psnr": psnr(refined, target),
        "psnr_bicubic": psnr(bicubic, target),
        "ssim": float(structural_similarity_index_measure(unit(refined), unit(target), data_range=1.0)),
        "ssim_bicubic": float(structural_similarity_index_measure(unit(bicubic), unit(target), data_range=1.0)),
        "chroma_ratio": colour_metrics(refined, target)["chroma_ratio"],
        "sharpness_ratio": sharpness(refined) / max(sharpness(target), 1e-8),
        "sharpness_ratio_bicubic": sharpness(bicubic) / max(sharpness(target), 1e-8),
        "consistency_psnr": psnr(down, low),
    }
    out["psnr_gain"] = out["psnr"] - out["psnr_bicubic"]
    return out


class RefinerModule(ExperimentModule):
    """Trains `models.refiner.Refiner` on `VisualBatch.pixels` (images; clips are split into frames).

    net: RefinerConfig fields. degrade: DegradeConfig fields (its `tokenizer` is loaded frozen and
    never saved in this module's checkpoint). sample: RefinerSampleConfig fields.
    """

    def __init__(self, net: dict, degrade: Optional[dict] = None, optim: Optional[dict] = None,
                 sample: Optional[dict] = None, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        try:
            self.net_cfg = RefinerConfig.from_dict(dict(net))
        except ValueError as e:
            raise ValueError(f"invalid model.net: {e}") from e
        self.degrade_cfg = DegradeConfig.from_dict(dict(degrade or {}))
        if self.degrade_cfg.tokenizer == "auto":
            raise ValueError("model.degrade.tokenizer=auto is filled by train.py's `requires` (the video tokenizer "
                             "built on demand); outside train.py give a visual tokenizer checkpoint, or null")
        self.optim_cfg = OptimConfig.from_dict(dict(optim or {}))
        self.sample_cfg = config_from_dict(RefinerSampleConfig, dict(sample or {}), "model.sample")
        self.seed = seed
        self.net: Refiner | None = None
        self._tok = None  # frozen visual tokenizer of the degradation (not a submodule: never saved)
        self._images: Optional[tuple] = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = Refiner(self.net_cfg)

    @property
    def tokenizer(self):
        if self._tok is None and self.degrade_cfg.tokenizer:
            # object.__setattr__: an nn.Module attribute would register the tokenizer as a submodule
            object.__setattr__(self, "_tok", load_visual_tokenizer(self.degrade_cfg.tokenizer).to(self.device))
        return self._tok

    def degraded(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return degrade(x, self.degrade_cfg, self.net_cfg.scale, generator, self.tokenizer)

    def _generator(self, batch_index: int, rank: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(step_seed(self.seed, batch_index, rank))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = _frames(batch.pixels)
        gen = self._generator(self.trainer.fit_loop.total_batch_idx, self.global_rank)
        low = self.degraded(x, gen)
        loss = self.net.loss(x, low, gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite refiner loss {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        return loss

    @torch.no_grad()
    def _evaluate(self, batch, stage: str, batch_idx: int) -> None:
        x = _frames(batch.pixels)
        # the same inputs, steps and noise at every validation: curves compare checkpoints, not draws
        gen = self._generator(-1 - batch_idx, 0)
        low = self.degraded(x, gen)
        n = x.shape[0]
        self.log(f"{stage}/loss", self.net.loss(x, low, gen), on_epoch=True, batch_size=n, sync_dist=True,
                 prog_bar=True)
        if batch_idx >= self.sample_cfg.val_batches:
            return
        refined = self.net.sample(low, self.sample_cfg.steps, self.sample_cfg.eta, gen)
        bicubic = self.net.upsample(low)
        for name, v in refinement_metrics(refined, bicubic, x, low).items():
            self.log(f"{stage}/{name}", v, on_epoch=True, batch_size=n, sync_dist=True, prog_bar=name == "psnr_gain")
        if stage == "val" and batch_idx == 0 and self.sample_cfg.log_images > 0:
            k = self.sample_cfg.log_images
            self._images = (low[:k].cpu(), bicubic[:k].cpu(), refined[:k].cpu(), x[:k].cpu())

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    def on_validation_epoch_end(self) -> None:
        if self._images is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        from torchvision.utils import make_grid

        low, bicubic, refined, target = self._images
        self._images = None
        nearest = F.interpolate(low, size=target.shape[-2:], mode="nearest")
        rows = torch.cat([nearest, bicubic, refined, target])
        grid = make_grid((rows.clamp(-1, 1) + 1) / 2, nrow=low.shape[0], padding=1)
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                # rows: degraded input (nearest), bicubic, refined, target
                logger.experiment.add_image("samples/refiner", grid, self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["refiner"] = {"config": self.net_cfg.to_dict()}
