"""Routing monitor for sparse (MoE / MoUE) models on the trunk: per-layer statistics and load heatmaps."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.figures import figure_to_array, heatmap_figure
from models.moe.balance import routing_stats


class MoEMonitor(L.Callback):
    """Every `every_n_steps` training steps, log routing statistics and heatmaps.

    Scalars (per layer l): moe/max_violation/layer_l, moe/cv/layer_l, moe/dead_frac/layer_l,
    moe/dropped_frac/layer_l, moe/entropy/layer_l, and their means over layers (moe/*/mean).
    For MoUE, statistics are over each layer's candidate experts (its window), and the pool is
    summarised by moue/pool_max_violation: max_e F_e / pi_e - 1, the depth-aggregated load against
    the topology's expected share. Images (TensorBoard, heatmaps with a colour bar): moe/load_heatmap
    (each layer's fraction of routed pairs per expert) and, for MoUE, moue/pool_load (each pool
    expert's share of all layers' pairs).
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
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if self.images and trainer.is_global_zero and tensorboards:
            images = self._images(counts.detach().float().cpu(), info["layers"], topology is not None, step)
            for lg in tensorboards:
                for tag, img in images.items():
                    lg.experiment.add_image(tag, img, step, dataformats="HWC")

    @staticmethod
    def _images(counts, layers, pool: bool, step: int) -> dict:
        """HWC uint8 heatmaps of the load fraction: layers x experts and, for MoUE, the pool over all layers."""
        load = counts / counts.sum(1, keepdim=True).clamp_min(1.0)
        images = {"moe/load_heatmap": figure_to_array(heatmap_figure(
            load, xlabel="expert", ylabel="layer", yticklabels=list(layers), cbar_label="fraction of routed pairs",
            title=f"expert load, step {step}"))}
        if pool:
            pooled = counts.sum(0, keepdim=True) / counts.sum().clamp_min(1.0)
            images["moue/pool_load"] = figure_to_array(heatmap_figure(
                pooled, xlabel="pool expert", ylabel="", yticklabels=["all layers"],
                cbar_label="fraction of routed pairs", title=f"pool load, step {step}"))
        return images
