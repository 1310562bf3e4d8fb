"""Routing analysis per group of tokens (a task or modality: "text", "image_und", "video_gen", ...).

Shapes: N tokens, k experts per token, G groups, L layers, E experts.
`counts` is {group name: int64 [L, E]}: the number of (token, expert) routing pairs per layer and
expert among that group's tokens. Indices returned here are 0-based (layers and experts); only the
markdown report numbers layers from 1. Pure torch, no plotting.
"""

from __future__ import annotations

import math

import torch

__all__ = ["activation_frequency", "normalized_entropy", "report_layers", "route_counts", "routing_markdown",
           "routing_tables", "top_experts", "topset_iou"]


def route_counts(routes_NK: torch.Tensor, group_ids_N: torch.Tensor, num_groups: int, num_experts: int) -> torch.Tensor:
    """int64 [G, E]: routed pairs per group and expert from per-token top-k routes.

    Tokens with a group id < 0 (padding, unlabelled) and route entries < 0 (dropped slots) are ignored.
    """
    routes = routes_NK.reshape(routes_NK.shape[0], -1).long()
    groups = group_ids_N.reshape(-1, 1).long().expand_as(routes)
    if routes.numel() and (int(groups.max()) >= num_groups or int(routes.max()) >= num_experts):
        raise ValueError(f"group id or expert index out of range (num_groups={num_groups}, num_experts={num_experts})")
    keep = (groups >= 0) & (routes >= 0)
    flat = groups[keep] * num_experts + routes[keep]
    return torch.bincount(flat, minlength=num_groups * num_experts).reshape(num_groups, num_experts)


def activation_frequency(counts_LE: torch.Tensor) -> torch.Tensor:
    """float [..., E]: each row's share of pairs per expert (rows sum to 1; an all-zero row stays zero)."""
    c = counts_LE.detach().float()
    return c / c.sum(-1, keepdim=True).clamp_min(1.0)


def _top_count(num_experts: int, fraction: float) -> int:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, math.ceil(fraction * num_experts - 1e-9))  # the tolerance keeps 0.1 * 30 at 3


def _ranking(freq: torch.Tensor) -> torch.Tensor:
    """Expert indices from most to least activated along the last dim; ties go to the lower index."""
    return torch.sort(freq.detach().float(), dim=-1, descending=True, stable=True).indices


def top_experts(freq_E: torch.Tensor, fraction: float = 0.25) -> torch.Tensor:
    """bool [E]: the ceil(fraction * E) most-activated experts (ties broken by the lower index)."""
    E = freq_E.shape[-1]
    mask = torch.zeros(E, dtype=torch.bool, device=freq_E.device)
    mask[_ranking(freq_E)[: _top_count(E, fraction)]] = True
    return mask


def topset_iou(freqs_GE: torch.Tensor, fraction: float = 0.25) -> torch.Tensor:
    """float [G, G]: intersection over union of the groups' top-`fraction` expert sets (diagonal 1).

    A group whose row is all zero (no pairs) has no meaningful top set: its row and column are nan.
    """
    G, E = freqs_GE.shape
    masks = torch.zeros(G, E, dtype=torch.float32, device=freqs_GE.device)
    masks.scatter_(1, _ranking(freqs_GE)[:, : _top_count(E, fraction)], 1.0)
    inter = masks @ masks.T
    size = masks.sum(1)
    iou = inter / (size[:, None] + size[None, :] - inter)
    empty = freqs_GE.detach().float().sum(1) <= 0
    iou[empty, :] = float("nan")
    iou[:, empty] = float("nan")
    return iou


def normalized_entropy(counts_LE: torch.Tensor) -> torch.Tensor:
    """float [..., L]: -sum_e p log p / log E per row, p = share of the row's pairs per expert.

    1 = uniform over the experts, 0 = every pair on one expert (0 log 0 = 0); a row with no pairs is
    nan. With a single expert every row with pairs is 0.
    """
    c = counts_LE.detach().float()
    total = c.sum(-1)
    p = c / total.unsqueeze(-1).clamp_min(1.0)
    h = -torch.where(p > 0, p * p.clamp_min(1e-30).log(), torch.zeros_like(p)).sum(-1)
    E = c.shape[-1]
    ne = h / math.log(E) if E > 1 else torch.zeros_like(h)
    return torch.where(total > 0, ne, torch.full_like(ne, float("nan")))


def report_layers(num_layers: int) -> list[int]:
    """0-based layers a report shows: first, middle ((L - 1) // 2, the lower middle for even L), last;
    de-duplicated and sorted (L=1: [0]; L=2: [0, 1]; L=12: [0, 5, 11])."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return sorted({0, (num_layers - 1) // 2, num_layers - 1})


def _role(layer: int, num_layers: int) -> str:
    if layer == 0:
        return "first"
    return "last" if layer == num_layers - 1 else "middle"


def routing_tables(counts: dict[str, torch.Tensor], fraction: float = 0.25) -> dict:
    """Everything a routing report needs, from {group: int64 [L, E]} counts (moved to the CPU).

    Returns (G groups in sorted name order, R = len(layers); layers and experts 0-based):
        groups          [G] names              num_layers, num_experts, fraction, top_k (ceil(fraction * E))
        layers          [R] reported layers    roles  [R] "first" / "middle" / "last"
        frequency       [R] of float [G, E]: each group's share of pairs per expert at that layer
        iou             [R] of float [G, G]: `topset_iou` of those frequencies
        top3            [R] of int64 [G, min(3, E)]: most-activated experts, most first
        concentration   [R] of float [G]: share of the group's pairs its top-`fraction` experts carry
        entropy         float [G, L]: `normalized_entropy` per group and layer
        pairs           int64 [G, L]: routed pairs per group and layer
        counts          {group: int64 [L, E]} the input, on the CPU
    """
    if not counts:
        raise ValueError("routing_tables needs counts for at least one group")
    groups = sorted(counts)
    shapes = {tuple(counts[g].shape) for g in groups}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"every group's counts must share one [L, E] shape, got "
                         f"{ {g: tuple(counts[g].shape) for g in groups} }")
    C = torch.stack([counts[g].detach().cpu().long() for g in groups])  # [G, L, E]
    G, num_layers, E = C.shape
    top_k = _top_count(E, fraction)
    layers = report_layers(num_layers)
    freq = activation_frequency(C)  # [G, L, E]
    frequency, iou, top3, concentration = [], [], [], []
    for layer in layers:
        f = freq[:, layer]
        ranked = _ranking(f)
        frequency.append(f)
        iou.append(topset_iou(f, fraction))
        top3.append(ranked[:, : min(3, E)])
        concentration.append(f.gather(1, ranked[:, :top_k]).sum(1))
    return {
        "groups": groups, "num_layers": num_layers, "num_experts": E, "fraction": fraction, "top_k": top_k,
        "layers": layers, "roles": [_role(layer, num_layers) for layer in layers],
        "frequency": frequency, "iou": iou, "top3": top3, "concentration": concentration,
        "entropy": normalized_entropy(C), "pairs": C.sum(-1),
        "counts": {g: C[i] for i, g in enumerate(groups)},
    }


def _num(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def routing_markdown(tables: dict, step: int | None = None) -> str:
    """Markdown report of `routing_tables`: a top-set IoU table per reported layer, the normalised
    entropy table (groups x all layers) and, per reported layer, each group's top-3 experts and the
    share of its pairs the top-`fraction` experts carry. Layers are 1-based here ("layer 1 (first)");
    experts keep the model's 0-based indices."""
    groups, at = tables["groups"], "" if step is None else f", step {step}"
    pct = f"{tables['fraction'] * 100:g}%"
    out = [f"# Routing analysis{at}", "",
           f"Groups: {', '.join(groups)}. {tables['num_layers']} layers, {tables['num_experts']} experts; "
           f"top set = the {tables['top_k']} most-activated experts (top {pct}). Layers are 1-based, experts 0-based.", ""]
    names = [f"layer {layer + 1} ({role})" for layer, role in zip(tables["layers"], tables["roles"])]
    for name, iou in zip(names, tables["iou"]):
        out += [f"## Top-{pct} expert-set IoU, {name}{at}", ""]
        out += _table(["", *groups], [[a, *(_num(float(v)) for v in iou[i])] for i, a in enumerate(groups)]) + [""]
    out += [f"## Normalised routing entropy{at}", ""]
    header = ["group", *(f"layer {layer + 1}" for layer in range(tables["num_layers"]))]
    out += _table(header, [[g, *(_num(float(v)) for v in tables["entropy"][i])] for i, g in enumerate(groups)]) + [""]
    for layer, name, top3, conc in zip(tables["layers"], names, tables["top3"], tables["concentration"]):
        out += [f"## Top experts, {name}{at}", ""]
        for i, g in enumerate(groups):
            if int(tables["pairs"][i, layer]) == 0:
                out.append(f"- {g}: no routed pairs")
            else:
                out.append(f"- {g}: top-3 experts {', '.join(str(int(e)) for e in top3[i])}; "
                           f"top {pct} carry {float(conc[i]) * 100:.1f}% of pairs")
        out.append("")
    return "\n".join(out)
