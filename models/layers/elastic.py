"""Elastic sub-models of one trunk: which layers run (depth), which routed experts a layer may use
(width) and how many it picks per token (sparsity). ERNIE 5.0's once-for-all pre-training samples
these per micro-batch; an exported sub-model keeps exactly the same layers and experts.

Shapes: L layers, E experts per routing distribution (the pool size for MoUE).

Pieces:
  * `RoutingLimit`          - the width / sparsity part of a choice, handed to `Trunk.forward(routing=...)`;
  * `depth_layers`          - the deterministic layer subset of a depth (export, evaluation grid);
  * `sample_depth_layers`   - a random one (training): keep the first and last layer, drop a middle span;
  * `keep_experts`          - which experts a width-reduced layer keeps (most used, or a fixed prefix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["EXPERT_RULES", "RoutingLimit", "depth_layers", "keep_experts", "sample_depth_layers"]

EXPERT_RULES = ("usage", "prefix")


@dataclass
class RoutingLimit:
    """Width and sparsity of an elastic sub-model.

    kept: per layer (all L of them, indexed by layer), the routed experts it may use, or None for all;
        the others get a -inf routing score before top-k, so they are never picked and get no gradient.
        Shared experts are not routed and always run.
    top_k: experts per token (None = the configured k).
    replay: a `models.moe.replay.RouteReplay` that records or forces every sparse layer's routed experts
        (RL routing replay); None = route normally.
    """

    kept: Optional[list[list[int]]] = None
    top_k: Optional[int] = None
    replay: Optional[object] = None

    def __post_init__(self) -> None:
        if self.top_k is not None and int(self.top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        self._masks: dict = {}

    @property
    def is_full(self) -> bool:
        return self.kept is None and self.top_k is None and self.replay is None

    def additive_mask(self, layer: int, num_experts: int, device) -> Optional[torch.Tensor]:
        """[E] float mask of one layer: 0 on its kept experts, -inf elsewhere (None: all kept)."""
        if self.kept is None:
            return None
        key = (layer, num_experts, str(device))
        if key not in self._masks:
            m = torch.full((num_experts,), float("-inf"))
            m[list(self.kept[layer])] = 0.0
            self._masks[key] = m.to(device)
        return self._masks[key]

    def for_layer(self, layer: int, num_experts: int, device) -> Optional[tuple]:
        """(additive mask or None, top_k or None, replay or None) for a block's FFN, or None when nothing
        is limited."""
        if self.is_full:
            return None
        return self.additive_mask(layer, num_experts, device), self.top_k, self.replay

    def check(self, n_layers: int, num_experts: int, default_k: int,
              candidates: Optional[Sequence[Sequence[int]]] = None) -> None:
        """Raise if a layer could not pick k experts (candidates: MoUE's per-layer windows)."""
        k = default_k if self.top_k is None else int(self.top_k)
        if self.kept is not None and len(self.kept) != n_layers:
            raise ValueError(f"kept experts must list all {n_layers} layers, got {len(self.kept)}")
        for layer in range(n_layers):
            kept = set(range(num_experts)) if self.kept is None else set(int(e) for e in self.kept[layer])
            if any(not 0 <= e < num_experts for e in kept):
                raise ValueError(f"layer {layer}: kept expert ids must be in [0, {num_experts}), got {sorted(kept)}")
            if candidates is not None:
                kept &= set(candidates[layer])
            if len(kept) < k:
                raise ValueError(f"layer {layer} keeps {len(kept)} routable experts but top_k={k}")


def _drop_span(n_layers: int, depth: int, pick) -> list[int]:
    """Keep the first and the last layer and drop a contiguous span of n_layers - depth others;
    `pick(k)` chooses the span's start among the k possible ones (0-based)."""
    if not 1 <= depth <= n_layers:
        raise ValueError(f"depth must be in [1, {n_layers}], got {depth}")
    drop = n_layers - depth
    if drop == 0:
        return list(range(n_layers))
    if depth == 1:
        return [0]
    start = 1 + pick(n_layers - 1 - drop)  # spans start in [1, n_layers - 1 - drop]
    return [i for i in range(n_layers) if not start <= i < start + drop]


def depth_layers(n_layers: int, depth: int) -> list[int]:
    """The layers a depth-`depth` sub-model keeps: the first and the last, with a centred span of
    n_layers - depth layers dropped from the middle (an odd leftover drops one later)."""
    return _drop_span(n_layers, depth, lambda k: k // 2)


def sample_depth_layers(n_layers: int, depth: int, generator: torch.Generator) -> list[int]:
    """A random depth-`depth` subset: keep the first and last layer, drop a contiguous span of the others."""
    return _drop_span(n_layers, depth, lambda k: int(torch.randint(k, (1,), generator=generator)))


def keep_experts(num_keep: int, num_experts: int, n_layers: int, rule: str = "usage",
                 usage_LE: Optional[torch.Tensor] = None,
                 candidates: Optional[Sequence[Sequence[int]]] = None) -> list[list[int]]:
    """Per layer, the `num_keep` experts a width-reduced sub-model keeps (ascending ids).

    rule 'usage': the experts that layer routed the most tokens to (usage_LE: accumulated routed
        counts [L, E]; ties and an all-zero history fall back to the lowest ids, i.e. the prefix);
    rule 'prefix': the first num_keep.
    candidates: MoUE's per-layer windows; a layer keeps num_keep of its own candidates.
    """
    if rule not in EXPERT_RULES:
        raise ValueError(f"expert rule {rule!r} is not one of {list(EXPERT_RULES)}")
    out = []
    for layer in range(n_layers):
        cand = list(range(num_experts)) if candidates is None else sorted(int(e) for e in candidates[layer])
        if not 1 <= num_keep <= len(cand):
            raise ValueError(f"experts kept must be in [1, {len(cand)}], got {num_keep}")
        if rule == "prefix" or usage_LE is None:
            out.append(cand[:num_keep])
            continue
        u = usage_LE[layer].double().cpu()[cand]
        # stable descending sort: equal usage keeps the lower id first
        order = sorted(range(len(cand)), key=lambda j: (-float(u[j]), j))[:num_keep]
        out.append(sorted(cand[j] for j in order))
    return out
