"""The one self-attention of every family: grouped-query heads, rotary positions, any described mask, a
preallocated KV cache and an optional segment memory.

Shapes: B batch, T query tokens, S sequence keys (cached past + current), M memory keys, H query
heads, K kv heads, D head dim, C model dim.

Kernels (chosen per forward by `AttentionMask.plan`): `scaled_dot_product_attention` with no mask
or `is_causal=True` (flash kernels on GPU), SDPA with a dense boolean mask, or FlexAttention with a
`BlockMask` (compiled, or eager as a slow debugging reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.mask import MaskPlan
from models.layers.rope import apply_rotary

__all__ = ["Attention", "LayerKVCache", "attend"]


@dataclass
class LayerKVCache:
    """Preallocated keys/values of one layer, [B, K, max_len, D], filled up to `length`."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, batch: int, kv_heads: int, max_len: int, head_dim: int, device, dtype) -> "LayerKVCache":
        shape = (batch, kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write T new keys/values after `length`; returns all keys/values so far (views)."""
        B, T = k_BKTD.shape[0], k_BKTD.shape[2]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} needed")
        self.k[:B, :, self.length:end] = k_BKTD
        self.v[:B, :, self.length:end] = v_BKTD
        self.length = end
        return self.k[:B, :, :end], self.v[:B, :, :end]


_FLEX_COMPILED = None


def _flex(q, k, v, block_mask, gqa: bool, compiled: bool):
    """FlexAttention; compiled once per process (eager FlexAttention is a slow reference path)."""
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if compiled and not torch.compiler.is_compiling():  # inside a compiled region it is compiled anyway
        if _FLEX_COMPILED is None:
            _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
        fn = _FLEX_COMPILED
    return fn(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def attend(q_BHTD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, plan: MaskPlan,
           dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v under a MaskPlan, grouped-query heads broadcast."""
    gqa = q_BHTD.shape[1] != k_BKSD.shape[1]
    if plan.kind == "segments":
        return _attend_segments(q_BHTD, k_BKSD, v_BKSD, plan.segments, dropout_p, gqa)
    if plan.kind == "flex":
        if dropout_p > 0:
            raise ValueError("FlexAttention has no attention dropout: use attn_impl=sdpa with dropout > 0")
        return _flex(q_BHTD, k_BKSD, v_BKSD, plan.block_mask, gqa, plan.compiled)
    return F.scaled_dot_product_attention(
        q_BHTD, k_BKSD, v_BKSD, attn_mask=plan.dense if plan.kind == "dense" else None,
        is_causal=plan.kind == "causal", dropout_p=dropout_p, enable_gqa=gqa,
    )


def _attend_segments(q, k, v, segments, dropout_p: float, gqa: bool) -> torch.Tensor:
    """One unmasked (or square-causal) SDPA call per run of queries over its contiguous key range."""
    outs = []
    for rows, runs in segments:
        qq, kk, vv = (q, k, v) if rows is None else (q[rows], k[rows], v[rows])
        parts = []
        for r in runs:
            ks = [kk[:, :, a:b] for a, b in r.keys]
            vs = [vv[:, :, a:b] for a, b in r.keys]
            ks, vs = (ks[0], vs[0]) if len(ks) == 1 else (torch.cat(ks, 2), torch.cat(vs, 2))
            parts.append(F.scaled_dot_product_attention(qq[:, :, r.q0:r.q1], ks, vs, attn_mask=r.mask,
                                                        is_causal=r.causal, dropout_p=dropout_p, enable_gqa=gqa))
        outs.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    if len(outs) == 1:
        return outs[0]
    out = torch.empty_like(q)
    for (rows, _), o in zip(segments, outs):
        out[rows] = o
    return out


class Attention(nn.Module):
    """Multi-head self-attention with grouped KV heads; q, k and v come from one fused projection.

    wqkv rows: [q (H*D) | k (K*D) | v (K*D)].
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.wqkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.dropout = dropout

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.wqkv.weight, 0.0, std)
        nn.init.normal_(self.wo.weight, 0.0, out_std)

    def _kv(self, x_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values only (memory states need no queries): [B, K, T, D] each."""
        B, T, _ = x_BTC.shape
        kv = F.linear(x_BTC, self.wqkv.weight[self.n_heads * self.head_dim:])
        k, v = kv.view(B, T, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(
        self,
        x_BTC: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        plan: MaskPlan,
        cache: Optional[LayerKVCache] = None,
        memory_BMC: Optional[torch.Tensor] = None,
        memory_rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """rope: (cos, sin) of the T tokens; memory_BMC: normalised memory states (no gradient flows
        into them) with memory_rope their (cos, sin) at the positions before the segment."""
        B, T, _ = x_BTC.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x_BTC).split([H * D, K * D, K * D], dim=-1)
        q = apply_rotary(q.view(B, T, H, D).transpose(1, 2), *rope)
        k = apply_rotary(k.view(B, T, K, D).transpose(1, 2), *rope)
        v = v.view(B, T, K, D).transpose(1, 2)
        if cache is not None:
            k, v = cache.append(k, v)
        if memory_BMC is not None:
            mk, mv = self._kv(memory_BMC)
            k = torch.cat([apply_rotary(mk, *memory_rope), k], dim=2)
            v = torch.cat([mv, v], dim=2)
        y = attend(q, k, v, plan, self.dropout if self.training else 0.0)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * D))
