"""Per-group (task / modality) routing analysis at validation: top-set IoU between groups, normalised
routing entropy per layer, frequency heatmaps and a markdown report (models/moe/analysis.py)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.figures import figure_to_array, heatmap_figure, lines_figure
from models.io import atomic_torch_save, atomic_write_text
from models.moe.analysis import routing_markdown, routing_tables


def _sum_over_ranks(local: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """{group: int64 [L, E]} summed over ranks (on the CPU); a group some rank lacks counts zero there."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {g: c.detach().long().cpu() for g, c in local.items()}
    shapes: list = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, {g: tuple(c.shape) for g, c in sorted(local.items())})
    known = {g: s for rank in shapes for g, s in rank.items()}
    out = {}
    for g in sorted(known):
        c = local.get(g)
        t = c.detach().long().to(device).clone() if c is not None else torch.zeros(known[g], dtype=torch.long, device=device)
        dist.all_reduce(t)
        out[g] = t.cpu()
    return out


class RoutingAnalysis(L.Callback):
    """Every `every_n_val`-th validation run (the first, then every n-th; sanity checks excluded),
    record per-group routing counts and report how the groups use the experts.

    Module contract: a boolean attribute `track_routing` (default False). While it is True, the
    module's validation steps add to `routing_counts: dict[str, Tensor]` each group's int64 [L, E]
    count of (token, expert) routing pairs per layer and expert (one shape for all groups; the module
    does the counting, e.g. with `models.moe.analysis.route_counts`). This callback sets
    `routing_counts = {}` and `track_routing = True` at validation epoch start and `track_routing =
    False` at its end, then sums the counts over ranks. A module without `track_routing` (dense) is
    skipped with one warning.

    Logged on every rank (identical values, sync_dist=False), 1-based layer l of the reported layers
    (first, middle, last): routing/ne/<group>/layer_l, routing/ne/<group>/mean (over all layers),
    routing/iou/<a>__<b>/layer_l (a < b by name). nan values (no pairs) are not logged.
    Global zero only: TensorBoard images routing/frequency/layer_l (group x expert), routing/iou/layer_l
    (group x group), routing/entropy (lines per group over layers) and text routing/tables (images /
    markdown flags), and the markdown report at <trainer.log_dir>/routing/step_<global_step>.md with the
    raw counts beside it (step_<global_step>.counts.pt, {group: int64 [L, E]}), which
    `tools/routing_report.py --combine` averages over seeds.

    fraction: the top set of a group is its ceil(fraction * E) most-activated experts.
    """

    def __init__(self, every_n_val: int = 1, fraction: float = 0.25, images: bool = True, markdown: bool = True):
        if isinstance(every_n_val, bool) or not isinstance(every_n_val, int) or every_n_val < 1:
            raise ValueError(f"callbacks.routing_analysis.every_n_val must be an integer >= 1, got {every_n_val!r}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"callbacks.routing_analysis.fraction must be in (0, 1], got {fraction!r}")
        for key, value in (("images", images), ("markdown", markdown)):
            if not isinstance(value, bool):
                raise ValueError(f"callbacks.routing_analysis.{key} must be true or false, got {value!r}")
        self.every_n_val, self.fraction = every_n_val, float(fraction)
        self.images, self.markdown = images, markdown
        self._val_runs = 0  # validation runs seen (sanity checks excluded); checkpointed
        self._recording = False
        self._warned = False

    def state_dict(self) -> dict:
        return {"val_runs": self._val_runs}

    def load_state_dict(self, state_dict: dict) -> None:
        self._val_runs = int(state_dict.get("val_runs", 0))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._recording = False
        if trainer.sanity_checking:
            return
        if not hasattr(pl_module, "track_routing"):
            if not self._warned:
                rank_zero_warn(f"RoutingAnalysis: {type(pl_module).__name__} has no `track_routing` "
                               "(a dense model?); routing analysis is skipped")
                self._warned = True
            return
        run, self._val_runs = self._val_runs, self._val_runs + 1
        if run % self.every_n_val:
            return
        pl_module.routing_counts = {}
        pl_module.track_routing = True
        self._recording = True

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._recording:
            return
        self._recording = False
        pl_module.track_routing = False
        counts = _sum_over_ranks(getattr(pl_module, "routing_counts", None) or {}, pl_module.device)
        if not counts:
            rank_zero_warn("RoutingAnalysis: the module recorded no routing counts this validation")
            return
        tables = routing_tables(counts, self.fraction)
        pl_module.log_dict(self._scalars(tables), rank_zero_only=False, sync_dist=False)
        log_dir = trainer.log_dir  # on every rank: Lightning broadcasts it (a collective)
        if trainer.is_global_zero:
            self._report(trainer, tables, log_dir)

    @staticmethod
    def _scalars(tables: dict) -> dict[str, float]:
        groups, out = tables["groups"], {}
        ne = tables["entropy"]
        for i, g in enumerate(groups):
            for layer in tables["layers"]:
                out[f"routing/ne/{g}/layer_{layer + 1}"] = float(ne[i, layer])
            out[f"routing/ne/{g}/mean"] = float(ne[i].nanmean())
        for layer, iou in zip(tables["layers"], tables["iou"]):
            for i, a in enumerate(groups):
                for j in range(i + 1, len(groups)):
                    out[f"routing/iou/{a}__{groups[j]}/layer_{layer + 1}"] = float(iou[i, j])
        return {k: v for k, v in out.items() if v == v}  # drop nan

    def _report(self, trainer, tables: dict, log_dir) -> None:
        step = trainer.global_step
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        md = routing_markdown(tables, step) if self.markdown else None
        if md is not None and log_dir is not None:
            atomic_write_text(Path(log_dir) / "routing" / f"step_{step}.md", md)
            atomic_torch_save(tables["counts"], Path(log_dir) / "routing" / f"step_{step}.counts.pt")
        if not tensorboards:
            return
        images = self._images(tables, step) if self.images else {}
        for lg in tensorboards:
            for tag, img in images.items():
                lg.experiment.add_image(tag, img, step, dataformats="HWC")
            if md is not None:
                lg.experiment.add_text("routing/tables", md, step)

    def _images(self, tables: dict, step: int) -> dict:
        return {tag: figure_to_array(fig) for tag, fig in routing_figures(tables, step, self.fraction).items()}


def routing_figures(tables: dict, step: int, fraction: float = 0.25) -> dict:
    """{tag: matplotlib Figure} of `models.moe.analysis.routing_tables` output: expert frequency (group x
    expert) and top-set IoU (group x group) per reported layer, normalised entropy per layer."""
    groups, pct = tables["groups"], f"{fraction * 100:g}%"
    figs = {}
    for layer, role, freq, iou in zip(tables["layers"], tables["roles"], tables["frequency"], tables["iou"]):
        name = f"layer {layer + 1} ({role}), step {step}"
        figs[f"routing/frequency/layer_{layer + 1}"] = heatmap_figure(
            freq, xlabel="expert", ylabel="group", yticklabels=groups,
            cbar_label="fraction of the group's routed pairs", title=f"expert frequency, {name}")
        figs[f"routing/iou/layer_{layer + 1}"] = heatmap_figure(
            iou, xlabel="group", ylabel="group", xticklabels=groups, yticklabels=groups, annotate=True,
            vmin=0.0, vmax=1.0, cbar_label=f"IoU of top-{pct} expert sets", title=f"top-set IoU, {name}")
    ne = tables["entropy"]
    figs["routing/entropy"] = lines_figure(
        {g: ne[i].tolist() for i, g in enumerate(groups)}, x=list(range(1, tables["num_layers"] + 1)),
        xlabel="layer", ylabel="normalised entropy", title=f"routing entropy per layer, step {step}")
    return figs
