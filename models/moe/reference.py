"""Slow, obviously-correct MoE forward used as the oracle in tests.

Shapes: N tokens, k experts per token, E experts, D model dim, H expert hidden.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_moe(
    x_ND: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w13_EDH2: torch.Tensor,
    w2_EHD: torch.Tensor,
    capacity_factor: float | None = None,
) -> torch.Tensor:
    """y_n = sum_j w_nj * swiglu_{e_nj}(x_n), one boolean mask per expert; capacity keeps each expert's first pairs in (token, slot) order."""
    N, k = topk_idx.shape
    E, _, H2 = w13_EDH2.shape
    H = H2 // 2
    capacity = None
    if capacity_factor is not None:
        capacity = math.ceil(capacity_factor * N * k / E)
    y = torch.zeros_like(x_ND)
    for e in range(E):
        hit_Nk = topk_idx == e
        if capacity is not None:
            rank_Nk = hit_Nk.reshape(-1).cumsum(0).reshape(N, k)  # 1-based rank in (token, slot) order
            hit_Nk = hit_Nk & (rank_Nk <= capacity)
        rows = hit_Nk.any(dim=1)
        if not rows.any():
            continue
        gate_N = (topk_weight * hit_Nk).sum(dim=1)[rows].to(x_ND.dtype)
        h = x_ND[rows] @ w13_EDH2[e]
        out = (F.silu(h[:, :H]) * h[:, H:]) @ w2_EHD[e]
        y[rows] = y[rows] + gate_N[:, None] * out
    return y
