"""Token dispatch: sort (token, expert) pairs by expert, apply capacity, run experts, combine.

Shapes: N tokens, k experts per token, E experts, M routed (kept) pairs, D model dim.
Pairs are numbered token-major: pair p = n * k + j is token n's j-th choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from models.moe.router import RouterOutput

if TYPE_CHECKING:
    from models.moe.experts import GroupedExperts


@dataclass
class DispatchPlan:
    """Where each kept pair goes: pairs sorted by expert (stable), with per-expert counts."""

    order: torch.Tensor  # [M] indices into the flattened (token, slot) pairs, sorted by expert
    token_idx: torch.Tensor  # [M] token of each kept pair
    weight: torch.Tensor  # [M] gate weight of each kept pair (carries the router's gradient)
    counts: torch.Tensor  # [E] int64 kept pairs per expert
    dropped: torch.Tensor  # scalar int64 pairs dropped by capacity
    expert_idx: Optional[torch.Tensor] = None  # [M] expert of each kept pair (non-decreasing)
    capacity: Optional[int] = None  # per-expert capacity, None when dropless


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """ceil(capacity_factor * N * k / E)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def plan_dispatch(
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    num_experts: int,
    capacity_factor: float | None = None,
) -> DispatchPlan:
    """Sort pairs by expert; with a capacity factor drop each expert's pairs past capacity, later tokens first."""
    N, k = topk_idx.shape
    flat_M = topk_idx.reshape(-1)
    # Stable, so within an expert pairs stay in token order: capacity keeps the earliest tokens.
    sorted_e, order = torch.sort(flat_M, stable=True)
    counts = torch.bincount(flat_M, minlength=num_experts)
    dropped = torch.zeros((), dtype=torch.int64, device=flat_M.device)
    capacity = None
    if capacity_factor is not None:
        capacity = expert_capacity(N, k, num_experts, capacity_factor)
        start_E = counts.cumsum(0) - counts
        rank_M = torch.arange(flat_M.numel(), device=flat_M.device) - start_E[sorted_e]
        keep = rank_M < capacity
        order, sorted_e = order[keep], sorted_e[keep]
        kept = counts.clamp(max=capacity)
        dropped = (counts - kept).sum()
        counts = kept
    return DispatchPlan(
        order=order,
        token_idx=order // k,
        weight=topk_weight.reshape(-1)[order],
        counts=counts,
        dropped=dropped,
        expert_idx=sorted_e,
        capacity=capacity,
    )


def moe_forward(
    x_ND: torch.Tensor,
    router_out: RouterOutput,
    experts: "GroupedExperts",
    capacity_factor: float | None = None,
) -> tuple[torch.Tensor, DispatchPlan]:
    """y_n = sum over kept pairs (n, e) of gate * expert_e(x_n), in x's dtype; dropped pairs add 0."""
    plan = plan_dispatch(router_out.topk_idx, router_out.topk_weight, experts.num_experts, capacity_factor)
    # The gather x_ND[token_idx], the gate scaling and the scatter-add back to [N, D] happen inside
    # the experts, fused with their GEMMs on the loop path so no [M, D] permuted copy is made.
    y_ND = experts.forward_routed(x_ND, plan.token_idx, plan.weight, plan.counts)
    return y_ND, plan
