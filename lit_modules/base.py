"""What every LightningModule here shares: reproducible per-step randomness and optimiser set-up."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Optional

import lightning as L
import numpy as np
import torch

from models.config import config_from_dict


def step_seed(seed: int, batch_index: int, rank: int) -> int:
    """A 63-bit seed that depends only on (run seed, global batch index, rank)."""
    digest = hashlib.blake2b(f"{seed}:{batch_index}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_step(seed: int, batch_index: int, rank: int) -> None:
    """Re-seed torch (all devices) for one training batch.

    Dropout and any other sampling inside a step then depend only on the batch index, not on how
    much randomness the data loader, validation or a restart consumed before it; this is what makes a
    resumed run reproduce the uninterrupted one exactly.
    """
    torch.manual_seed(step_seed(seed, batch_index, rank))


def rng_state() -> dict:
    """Global RNG states, in types that `torch.load(weights_only=True)` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class OptimConfig:
    """AdamW with a learning-rate schedule over `total_steps`, after a linear warm-up:

    schedule: 'cosine' (cosine decay to `min_lr_ratio * lr` over the rest of the run) or 'wsd'
        (warmup-stable-decay, ERNIE 5.0's pre-training recipe: constant at `lr`, then a cosine decay to
        `min_lr_ratio * lr` over the last `decay_fraction` of the run, e.g. 1e-4 -> 1e-5 in mid-training).
    total_steps: None takes the trainer's estimate (max_steps, or epochs x batches).
    grad_clip: max global gradient norm; 0 disables clipping.
    """

    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    total_steps: Optional[int] = None
    grad_clip: float = 1.0
    schedule: str = "cosine"
    decay_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"model.optim.schedule must be 'cosine' or 'wsd', got {self.schedule!r}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"model.optim.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.lr <= 0:
            raise ValueError(f"model.optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ValueError(f"model.optim.betas must have 2 values, got {self.betas}")
        if self.warmup_steps < 0:
            raise ValueError(f"model.optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"model.optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    @classmethod
    def from_dict(cls, d: dict) -> "OptimConfig":
        return config_from_dict(cls, d, "model.optim")

    def lr_lambda(self, total: int):
        """The LR multiplier as a function of the optimiser step, for a run of `total` steps."""
        if self.schedule == "wsd":
            return lambda s: warmup_stable_decay(s, self.warmup_steps, total, self.decay_fraction, self.min_lr_ratio)
        return lambda s: warmup_cosine(s, self.warmup_steps, total, self.min_lr_ratio)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier at `step`: linear 0->1 over `warmup`, cosine 1->min_ratio until `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_stable_decay(step: int, warmup: int, total: int, decay_fraction: float, min_ratio: float) -> float:
    """LR multiplier at `step`: linear 0->1 over `warmup`, 1 until the last `decay_fraction` of `total`,
    then cosine 1->min_ratio until `total` (warmup-stable-decay)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    start = max(warmup, total - int(round(decay_fraction * total)))
    if step < start:
        return 1.0
    progress = min(1.0, (step - start) / max(1, total - start))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (and embeddings); never decay gains or biases."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ExperimentModule(L.LightningModule):
    """Base LightningModule: per-step RNG derivation, RNG state in checkpoints, AdamW + schedule.

    Subclasses set `self.optim_cfg` (OptimConfig) and `self.seed`.
    """

    seed: int = 0
    optim_cfg: OptimConfig

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # total_batch_idx is restored from the checkpoint's loop progress, so a resumed run derives
        # the same seeds as an uninterrupted one.
        seed_step(self.seed, self.trainer.fit_loop.total_batch_idx, self.global_rank)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:
            set_rng_state(checkpoint["rng_states"])

    @property
    def planned_steps(self) -> int:
        """The run's planned optimiser steps: model.optim.total_steps, else trainer.max_steps, else the
        trainer's estimate (epochs x batches). The LR schedule's horizon, and what step-fraction
        schedules (callbacks) are measured against."""
        if self.optim_cfg.total_steps:
            return int(self.optim_cfg.total_steps)
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        return int(self.trainer.estimated_stepping_batches)

    def configure_optimizers(self):
        cfg = self.optim_cfg
        # trainer.model holds the sharded/wrapped parameters under FSDP2 and DDP.
        model = self.trainer.model if self.trainer is not None else self
        opt = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
            # foreach over DTensors is supported; fused is not available on every backend.
        )
        total = cfg.total_steps or int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_lambda(total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_before_optimizer_step(self, optimizer) -> None:
        # Clipping here (not Trainer.gradient_clip_val) works the same under DDP and FSDP2: the
        # norm of DTensor gradients is the global norm.
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if len({getattr(p.grad, "device_mesh", None) for p in params}) > 1:
            # expert parallelism: DTensor gradients on two meshes, which torch's clip cannot combine
            from models.parallelize import clip_grad_norm_

            norm = clip_grad_norm_(params, self.optim_cfg.grad_clip)
        elif self.optim_cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
