"""Routing monitor for sparse (MoE / MoUE) models on the trunk: per-layer statistics and load heatmaps."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from models.moe.balance import routing_stats

# A 5-stop approximation of matplotlib's viridis (no plotting dependency needed for a heatmap).
_VIRIDIS = torch.tensor(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=torch.float32
) / 255.0


def heatmap(values_RC: torch.Tensor, cell: int = 12) -> torch.Tensor:
    """[3, R*cell, C*cell] RGB image of a matrix, min-max scaled, viridis colours."""
    v = values_RC.detach().float().cpu()
    lo, hi = v.min(), v.max()
    t = (v - lo) / (hi - lo) if hi > lo else torch.zeros_like(v)
    pos = t * (len(_VIRIDIS) - 1)
    i0 = pos.floor().long().clamp(max=len(_VIRIDIS) - 2)
    frac = (pos - i0).unsqueeze(-1)
    rgb = _VIRIDIS[i0] * (1 - frac) + _VIRIDIS[i0 + 1] * frac  # [R, C, 3]
    rgb = rgb.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return rgb.permute(2, 0, 1).contiguous()


class MoEMonitor(L.Callback):
    """Every `every_n_steps` training steps, log routing statistics and heatmaps.

    Scalars (per layer l): moe/max_violation/layer_l, moe/cv/layer_l, moe/dead_frac/layer_l,
    moe/dropped_frac/layer_l, moe/entropy/layer_l, and their means over layers (moe/*/mean).
    For MoUE, statistics are over each layer's candidate experts (its window), and the pool is
    summarised by moue/pool_max_violation: max_e F_e / pi_e - 1, the depth-aggregated load against
    the topology's expected share. Images (TensorBoard): moe/load_heatmap (layers x experts) and,
    for MoUE, moue/pool_load (the pool's load summed over layers).
    Reads the module's `last_routing` and `routing_topology()` (lit_modules/trunk.py); a dense
    model logs nothing.
    """

    def __init__(self, every_n_steps: int = 50, images: bool = True):
        if every_n_steps < 1:
            raise ValueError(f"callbacks.moe_monitor.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.images = every_n_steps, images

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        info = getattr(pl_module, "last_routing", None)
        step = trainer.global_step
        if info is None or step % self.every_n_steps:
            return
        topology = pl_module.routing_topology()
        counts = info["counts"]
        metrics: dict[str, float] = {}
        per_layer: dict[str, list[float]] = {}
        for row, layer in enumerate(info["layers"]):
            c, p = counts[row], info["probs_mean"][row]
            if topology is not None:
                keep = topology["allowed"][layer]
                c, p = c[keep], p[keep] / p[keep].sum().clamp_min(1e-20)
            stats = routing_stats(c, p, info["dropped"][row], info["num_pairs"])
            stats["entropy"] = info["entropy"][row]
            for name in ("max_vio", "cv", "dead_frac", "dropped_frac", "entropy"):
                key = "max_violation" if name == "max_vio" else name
                metrics[f"moe/{key}/layer_{layer}"] = float(stats[name])
                per_layer.setdefault(key, []).append(float(stats[name]))
        for key, vals in per_layer.items():
            metrics[f"moe/{key}/mean"] = sum(vals) / len(vals)
        if topology is not None:
            F = counts.sum(0) / counts.sum().clamp_min(1.0)
            pi = topology["pi"].to(F.device)
            live = pi > 0
            metrics["moue/pool_max_violation"] = float((F[live] / pi[live]).max() - 1.0)
            metrics["moue/window"] = float(topology["window"])
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        if self.images and trainer.is_global_zero:
            load = counts / counts.sum(1, keepdim=True).clamp_min(1.0)
            for lg in trainer.loggers:
                if isinstance(lg, TensorBoardLogger):
                    lg.experiment.add_image("moe/load_heatmap", heatmap(load), step)
                    if topology is not None:
                        lg.experiment.add_image("moue/pool_load", heatmap(counts.sum(0, keepdim=True)), step)
