"""LightningModule training the multi-scale visual tokenizer (image or causal-3D video).

Loss (per frame, VideoAR Eq. 4 without the perceptual term, which would need a downloaded network):
    L = l1 * |x - x_hat| + l2 * (x - x_hat)^2 + commit * L_commit + quant * L_quant
        + entropy * L_entropy [+ gan * L_G after gan.start_step]
with an optional patch discriminator (hinge loss, LeCAM regularisation), off by default, and an optional
semantic branch (ERNIE 5.0, papers.md 4.2: "a semantic regularization loss from a vision foundation
model"): with `semantic.teacher`, + semantic.weight * (1 - cosine) between a 1x1 projection of the
quantized latent (straight-through to the encoder) and the teacher's feature map of the frames, average-
pooled to the latent grid and, for video, over the frames each latent frame covers (frame 0, then
`time_stride` frames each). The projection and the teacher stay out of the exported tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from lit_modules.base import ExperimentModule, OptimConfig, param_groups, step_seed
from models.config import config_from_dict
from models.tokenizers.causal_conv import per_frame_start_
from models.tokenizers.checkpoint import load_media_tokenizer
from models.tokenizers.metrics import colour_metrics
from models.tokenizers.semantic import SemanticConfig, load_teacher
from models.tokenizers.visual import TokenizerConfig, VisualTokenizer, inflate_2d_to_3d

__all__ = ["GANConfig", "TokenizerLossConfig", "VisualTokenizerModule", "load_visual_tokenizer"]


@dataclass
class TokenizerLossConfig:
    """Weights of the tokenizer loss terms (papers.md 2.9 defaults, without the perceptual term).

    chroma: weight of an extra L1 on the colour part of the error, |c(x_hat) - c(x)| with
        c(x) = x - mean_RGB(x) (the `chroma_error` metric, issue 10). RGB L1/L2 already count it once;
        this weighs colour against luma. 0 (the default) leaves the loss as before.
    """

    l1: float = 1.0
    l2: float = 1.0
    commit: float = 0.25
    quant: float = 1.0
    entropy: float = 0.1
    chroma: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"model.loss.{f.name} must be >= 0, got {getattr(self, f.name)}")


@dataclass
class GANConfig:
    """Optional patch discriminator on frames (hinge loss) with LeCAM regularisation.

    start_step: generator steps before the adversarial term switches on (the discriminator trains
        from the same step). lecam: weight of the LeCAM term; lecam_decay: EMA of D's outputs.
    """

    enabled: bool = False
    weight: float = 0.1
    start_step: int = 0
    lecam: float = 1e-3
    lecam_decay: float = 0.999
    channels: int = 32
    layers: int = 3
    lr: Optional[float] = None

    def __post_init__(self) -> None:
        if self.weight < 0 or self.lecam < 0:
            raise ValueError("model.gan.weight and model.gan.lecam must be >= 0")
        if not 0 <= self.lecam_decay < 1:
            raise ValueError(f"model.gan.lecam_decay must be in [0, 1), got {self.lecam_decay}")
        if self.layers < 1:
            raise ValueError(f"model.gan.layers must be >= 1, got {self.layers}")


class PatchDiscriminator(nn.Module):
    """PatchGAN on single frames: strided convs -> a map of real/fake logits."""

    def __init__(self, in_channels: int, channels: int, layers: int) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers):
            c_next = min(channels * 2 ** i, 8 * channels)
            mods += [nn.Conv2d(c, c_next, 4, 2 if i < layers - 1 else 1, 1), nn.GroupNorm(min(32, c_next // 4), c_next),
                     nn.LeakyReLU(0.2)]
            c = c_next
        mods.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _frames(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] or [B, C, H, W] -> [N, C, H, W]."""
    return x if x.dim() == 4 else x.transpose(1, 2).flatten(0, 1)


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) / 2)


def load_visual_tokenizer(path: str) -> VisualTokenizer:
    """A frozen, eval-mode visual tokenizer from a training checkpoint or an export."""
    tok, _ = load_media_tokenizer(path, expect_kind="visual")
    return tok


class VisualTokenizerModule(ExperimentModule):
    """Trains `models.tokenizers.visual.VisualTokenizer` on `VisualBatch.pixels` (images or clips).

    net: TokenizerConfig fields. loss: TokenizerLossConfig. gan: GANConfig.
    inflate_from: a 2D tokenizer checkpoint whose weights initialise this (video) tokenizer.
    init_ckpt: a tokenizer checkpoint of the same architecture to start from (weights only).
    log_samples: clips logged to TensorBoard at each validation end (0 = none).
    image_steps: (3D, from scratch) the first K steps train on single frames of the batch's clips,
        `image_batch_factor` x as many frames as clips, drawn from (seed, step), with the network held
        per-frame (`per_frame_start_`: past temporal slices zero, temporal resampling subsample / repeat,
        all temporal weights frozen); then every weight trains on clips. The image -> inflate -> video
        path in one run, from random weights (docs/results.md, issue 10: clips from the first step go grey).
    clips_per_step: train on the first N clips of each batch only (None = all). With a larger
        data.batch_size the image stage then draws its frames from more clips (colour diversity: a 2D
        tokenizer keeps colour at 32 images per batch and can lose it at 8), while clips train at N.
    semantic: SemanticConfig ({teacher, weight}): the semantic branch (module docstring); the teacher is an
        `experiment=visual_teacher` checkpoint (`auto`: built by `requires`) or a local Hugging Face vision
        encoder directory (ViT, DINOv2, CLIP or SigLIP: `models.tokenizers.semantic.VisionFoundationTeacher`).
    """

    def __init__(
        self,
        net: dict,
        optim: Optional[dict] = None,
        loss: Optional[dict] = None,
        gan: Optional[dict] = None,
        seed: int = 0,
        inflate_from: Optional[str] = None,
        init_ckpt: Optional[str] = None,
        log_samples: int = 4,
        image_steps: int = 0,
        image_batch_factor: int = 4,
        clips_per_step: Optional[int] = None,
        semantic: Optional[dict] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        try:
            self.net_cfg = TokenizerConfig.from_dict(dict(net))
        except ValueError as e:
            raise ValueError(f"invalid model.net: {e}") from e
        self.optim_cfg = OptimConfig.from_dict(dict(optim or {}))
        self.loss_cfg = config_from_dict(TokenizerLossConfig, dict(loss or {}), "model.loss")
        self.gan_cfg = config_from_dict(GANConfig, dict(gan or {}), "model.gan")
        self.semantic_cfg = config_from_dict(SemanticConfig, dict(semantic or {}), "model.semantic")
        self.semantic_proj: Optional[nn.Conv2d] = None
        if inflate_from == "auto":
            raise ValueError("model.inflate_from=auto is filled by train.py's `requires` (an image tokenizer built "
                             "on demand); outside train.py give a 2D tokenizer checkpoint, or null for scratch")
        if inflate_from and not self.net_cfg.video:
            raise ValueError("model.inflate_from needs model.net.video=true (it inflates a 2D tokenizer into 3D)")
        if image_steps < 0 or image_batch_factor < 1:
            raise ValueError(f"model.image_steps must be >= 0 and model.image_batch_factor >= 1, got {image_steps}, "
                             f"{image_batch_factor}")
        if image_steps and not self.net_cfg.video:
            raise ValueError("model.image_steps is the image stage of a 3D tokenizer (model.net.video=true); a 2D "
                             "tokenizer trains on images throughout")
        if image_steps and (inflate_from or init_ckpt):
            raise ValueError("model.image_steps starts a 3D tokenizer from random weights; it does not combine with "
                             "model.inflate_from or model.init_ckpt (those start from a trained network)")
        if clips_per_step is not None and clips_per_step < 1:
            raise ValueError(f"model.clips_per_step must be >= 1 or null, got {clips_per_step}")
        self.image_steps, self.image_batch_factor = int(image_steps), int(image_batch_factor)
        self.clips_per_step = clips_per_step
        self._frozen: dict[str, torch.Tensor] = {}
        self.seed = seed
        self.inflate_from = inflate_from
        self.init_ckpt = init_ckpt
        self.log_samples = log_samples
        self.automatic_optimization = False  # generator and (optional) discriminator steps
        self.net: VisualTokenizer | None = None
        self.disc: PatchDiscriminator | None = None
        self.register_buffer("lecam_ema", torch.zeros(2), persistent=True)  # EMA of D(real), D(fake)
        self._samples: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    # ------------------------------------------------------------------ building
    def configure_model(self) -> None:
        if self.net is not None:
            return
        if self.inflate_from:
            image_tok = load_visual_tokenizer(self.inflate_from)
            self.net, _ = inflate_2d_to_3d(image_tok, self.net_cfg)
            self.net.requires_grad_(True).train()
        else:
            self.net = VisualTokenizer(self.net_cfg)
            if self.image_steps:
                self._frozen = per_frame_start_(self.net)
        if self.init_ckpt:
            src = load_visual_tokenizer(self.init_ckpt)
            try:
                self.net.load_state_dict(src.state_dict())
            except RuntimeError as e:
                raise ValueError(f"model.init_ckpt={self.init_ckpt} does not match model.net: {e}") from e
        if self.gan_cfg.enabled:
            self.disc = PatchDiscriminator(self.net_cfg.in_channels, self.gan_cfg.channels, self.gan_cfg.layers)
        if self.semantic_cfg.teacher and self.semantic_proj is None:
            teacher = load_teacher(self.semantic_cfg.teacher)
            if not hasattr(teacher, "feature_map"):
                raise ValueError(f"model.semantic.teacher={self.semantic_cfg.teacher} is an audio teacher; the visual "
                                 "tokenizer needs a visual one (experiment=visual_teacher)")
            object.__setattr__(self, "_teacher", teacher)  # frozen, outside the module tree and checkpoints
            self.semantic_proj = nn.Conv2d(self.net_cfg.dim, teacher.dim, 1)

    @property
    def teacher(self):
        return self.__dict__.get("_teacher")

    def _generator(self) -> nn.Module:
        """What the generator's optimiser trains: the tokenizer, and the semantic projection when on."""
        return self.net if self.semantic_proj is None else nn.ModuleList([self.net, self.semantic_proj])

    @torch.no_grad()
    def semantic_target(self, x: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The teacher's feature map of images [B, 3, H, W] or clips [B, 3, T, H, W], average-pooled to the
        latent grid and, for clips, over the frames of each latent frame: [B * T', D, H', W'] (the
        quantizer's frame order)."""
        teacher = self.teacher
        if next(teacher.parameters()).device != x.device:
            teacher.to(x.device)
        b, t = x.shape[0], 1 if x.dim() == 4 else x.shape[2]
        fm = F.adaptive_avg_pool2d(teacher.feature_map(_frames(x)).float(), latent_hw)
        fm = fm.view(b, t, *fm.shape[1:])
        tau = self.net_cfg.time_stride if self.net_cfg.video else 1
        groups = [fm[:, :1]] + [fm[:, s:s + tau] for s in range(1, t, tau)]
        return torch.stack([g.mean(1) for g in groups], 1).flatten(0, 1)

    def semantic_cosine(self, x: torch.Tensor, out: dict) -> torch.Tensor:
        """Mean cosine between the projected quantized latent and the teacher's pooled features."""
        f_hat = out["f_hat"]
        target = self.semantic_target(x, tuple(f_hat.shape[-2:]))
        return F.cosine_similarity(self.semantic_proj(f_hat).float(), target, dim=1).mean()

    def configure_optimizers(self):
        cfg = self.optim_cfg
        total = cfg.total_steps or int(self.trainer.estimated_stepping_batches)
        opts, scheds = [], []
        groups = [param_groups(self._generator(), cfg.weight_decay)]
        if self.disc is not None:
            groups.append(param_groups(self.disc, cfg.weight_decay))
        for i, g in enumerate(groups):
            lr = cfg.lr if i == 0 or self.gan_cfg.lr is None else self.gan_cfg.lr
            opt = torch.optim.AdamW(g, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
            opts.append(opt)
            scheds.append(torch.optim.lr_scheduler.LambdaLR(
                opt, cfg.lr_lambda(total)))
        return opts, scheds

    def on_before_optimizer_step(self, optimizer) -> None:
        pass  # clipping is done explicitly per optimiser in training_step (manual optimisation)

    def _clip(self, module: nn.Module) -> torch.Tensor:
        params = [p for p in module.parameters() if p.grad is not None]
        if self.optim_cfg.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.grad_clip)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    # ------------------------------------------------------------------ losses
    def _recon_losses(self, x: torch.Tensor, out: dict) -> dict[str, torch.Tensor]:
        recon = out["recon"]
        c = self.loss_cfg
        l1 = (recon - x).abs().mean()
        l2 = F.mse_loss(recon, x)
        total = c.l1 * l1 + c.l2 * l2 + c.commit * out["commit_loss"] + c.quant * out["quant_loss"] \
            + c.entropy * out["entropy_loss"]
        terms = {"l1": l1, "l2": l2, "commit": out["commit_loss"], "quant": out["quant_loss"],
                 "entropy": out["entropy_loss"]}
        if c.chroma > 0:
            err = recon - x
            terms["chroma"] = (err - err.mean(dim=1, keepdim=True)).abs().mean()
            total = total + c.chroma * terms["chroma"]
        if self.semantic_proj is not None:
            cos = self.semantic_cosine(x, out)
            total = total + self.semantic_cfg.weight * (1 - cos)
            terms["semantic_cos"] = cos
        return {"loss": total, **terms}

    def _gan_active(self) -> bool:
        return self.disc is not None and self.trainer.global_step >= self.gan_cfg.start_step

    def image_stage(self) -> bool:
        """Whether this step is in the image stage (`image_steps`)."""
        return self.global_step < self.image_steps

    def stage_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Clips [B, 3, T, H, W] -> the image stage's frames [factor * B, 3, H, W]: (clip, frame) pairs drawn
        from (seed, step, rank) by `step_seed`, so a resumed run draws the same ones and ranks draw their own."""
        if x.dim() != 5:
            return x
        g = torch.Generator().manual_seed(step_seed(int(self.seed), int(self.global_step), int(self.global_rank)))
        n = self.image_batch_factor * x.shape[0]
        # each clip gives one frame first (a permutation), then clips are drawn again for the rest
        b = torch.cat([torch.randperm(x.shape[0], generator=g),
                       torch.randint(x.shape[0], (max(0, n - x.shape[0]),), generator=g)])[:n].to(x.device)
        t = torch.randint(x.shape[2], (n,), generator=g).to(x.device)
        return x[b, :, t]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch.pixels
        image_stage = self.image_stage()
        if image_stage:
            x = self.stage_frames(x)
        elif self.clips_per_step is not None and x.dim() == 5:
            x = x[: self.clips_per_step]
        opts = self.optimizers()
        scheds = self.lr_schedulers()
        opt_g = opts[0] if isinstance(opts, list) else opts
        sched_g = scheds[0] if isinstance(scheds, list) else scheds
        out = self.net(x)
        losses = self._recon_losses(x, out)
        loss = losses["loss"]
        gan_on = self._gan_active()
        if gan_on:
            # the discriminator is not updated by the generator's loss
            self.disc.requires_grad_(False)
            g_adv = -self.disc(_frames(out["recon"])).mean()
            self.disc.requires_grad_(True)
            loss = loss + self.gan_cfg.weight * g_adv
            losses["g_adv"] = g_adv
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite tokenizer loss {loss.item()} at step {self.global_step}")
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if image_stage and self._frozen:  # the temporal weights stay per-frame through the image stage
            for name, p in self.net.named_parameters():
                mask = self._frozen.get(name)
                if mask is not None and p.grad is not None:
                    if mask.any():
                        p.grad.mul_(mask.to(p.grad.device))
                    else:
                        p.grad = None
        grad_norm = self._clip(self._generator())
        opt_g.step()
        sched_g.step()
        if gan_on:
            self._discriminator_step(x, out["recon"].detach(), opts[1], scheds[1])
        self._log_train(losses, out, grad_norm, x, sched_g.get_last_lr()[0])
        return loss

    def _discriminator_step(self, real: torch.Tensor, fake: torch.Tensor, opt_d, sched_d) -> None:
        d_real = self.disc(_frames(real))
        d_fake = self.disc(_frames(fake))
        hinge = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        # LeCAM: keep D's outputs near the EMA of the opposite side's, which bounds D under few data.
        ema = self.lecam_ema
        lecam = F.relu(d_real - ema[1]).pow(2).mean() + F.relu(ema[0] - d_fake).pow(2).mean()
        d_loss = hinge + self.gan_cfg.lecam * lecam
        with torch.no_grad():
            decay = self.gan_cfg.lecam_decay
            ema.mul_(decay).add_((1 - decay) * torch.stack([d_real.mean(), d_fake.mean()]))
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        self._clip(self.disc)
        # The raw optimiser: a LightningOptimizer step would count as a second global step per batch.
        opt_d.optimizer.step() if hasattr(opt_d, "optimizer") else opt_d.step()
        sched_d.step()
        self.log_dict({"train/d_loss": d_loss.detach(), "train/lecam": lecam.detach(),
                       "train/d_real": d_real.mean().detach(), "train/d_fake": d_fake.mean().detach()},
                      on_step=True, on_epoch=False)

    def _log_train(self, losses: dict, out: dict, grad_norm: torch.Tensor, x: torch.Tensor, lr: float) -> None:
        logs = {f"train/{k}": v.detach() for k, v in losses.items()}
        logs["train/grad_norm"] = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        logs["train/lr"] = torch.tensor(float(lr))
        if self.image_steps:
            logs["train/image_stage"] = torch.tensor(float(x.dim() == 4))
        with torch.no_grad():
            logs["train/psnr"] = peak_signal_noise_ratio(_to_unit(out["recon"]), _to_unit(x), data_range=1.0)
        for k, st in enumerate(out["stats"]):
            for name, v in st.items():
                logs[f"train/{name}_scale_{k + 1}"] = v
        self.log_dict(logs, on_step=True, on_epoch=False, prog_bar=False)
        self.log("train/loss_total", losses["loss"].detach(), prog_bar=True, on_step=True, on_epoch=False)
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "num_bad_files"):
            self.log("data/bad_files", float(dm.num_bad_files), on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _evaluate(self, batch, stage: str, batch_idx: int) -> None:
        x = batch.pixels
        out = self.net(x)
        losses = self._recon_losses(x, out)
        xu, ru = _frames(_to_unit(x)), _frames(_to_unit(out["recon"]))
        psnr = peak_signal_noise_ratio(ru, xu, data_range=1.0)
        ssim = structural_similarity_index_measure(ru, xu, data_range=1.0)
        n = x.shape[0]
        for name, v in (("loss", losses["loss"]), ("psnr", psnr), ("ssim", ssim), ("l1", losses["l1"])):
            self.log(f"{stage}/{name}", v, on_epoch=True, batch_size=n, sync_dist=True, prog_bar=name == "psnr")
        if "semantic_cos" in losses:
            self.log(f"{stage}/semantic_cos", losses["semantic_cos"], on_epoch=True, batch_size=n, sync_dist=True)
        # colour: PSNR over RGB barely sees a grey reconstruction of a colourful input
        for name, v in colour_metrics(out["recon"], x).items():
            if name != "chroma_real":
                self.log(f"{stage}/{name}", v, on_epoch=True, batch_size=n, sync_dist=True)
        for k, st in enumerate(out["stats"]):
            for name, v in st.items():
                self.log(f"{stage}/{name}_scale_{k + 1}", v, on_epoch=True, batch_size=n, sync_dist=True)
        # Reconstruction quality as a function of how many scales are decoded (coarse -> fine).
        tokens = self.net.encode(x)
        for k in range(1, len(tokens) + 1):
            rec_k = self.net.decode(tokens[:k])
            if x.dim() == 4:
                rec_k = rec_k[:, :, 0]
            self.log(f"{stage}/psnr_scales_{k}", peak_signal_noise_ratio(_frames(_to_unit(rec_k)), xu, data_range=1.0),
                     on_epoch=True, batch_size=n, sync_dist=True)
            self.log(f"{stage}/mse_scales_{k}", F.mse_loss(rec_k, x), on_epoch=True, batch_size=n, sync_dist=True)
            self.log(f"{stage}/chroma_ratio_scales_{k}", colour_metrics(rec_k, x)["chroma_ratio"], on_epoch=True,
                     batch_size=n, sync_dist=True)
        if stage == "val" and batch_idx == 0 and self.log_samples > 0:
            self._samples = (x[: self.log_samples].detach().cpu(), out["recon"][: self.log_samples].detach().cpu())

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    def on_validation_epoch_end(self) -> None:
        if self._samples is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        real, recon = self._samples
        self._samples = None
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                log_reconstructions(logger.experiment, real, recon, self.global_step)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["tokenizer"] = {"kind": "visual", "config": self.net_cfg.to_dict()}


def log_reconstructions(writer, real: torch.Tensor, recon: torch.Tensor, step: int) -> None:
    """Originals above reconstructions: one image grid (images) or one frame strip per clip (videos)."""
    from torchvision.utils import make_grid

    real, recon = _to_unit(real), _to_unit(recon)
    if real.dim() == 4:
        grid = make_grid(torch.cat([real, recon]), nrow=real.shape[0], padding=1)
        writer.add_image("samples/reconstruction", grid, step)
        return
    for i in range(real.shape[0]):
        # rows: original frames, reconstructed frames; columns: time
        frames = torch.cat([real[i].transpose(0, 1), recon[i].transpose(0, 1)])
        grid = make_grid(frames, nrow=real.shape[2], padding=1)
        writer.add_image(f"samples/frames_{i}", grid, step)
