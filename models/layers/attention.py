"""Causal multi-head self-attention with grouped KV heads and an optional KV cache.

Shapes: B batch, T query length, S key length, H query heads, K kv heads, D head dim, C model dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.rope import apply_rotary


@dataclass
class LayerKVCache:
    """Preallocated keys/values of one layer: [B, K, max_len, D]."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, batch: int, kv_heads: int, max_len: int, head_dim: int, device, dtype) -> "LayerKVCache":
        shape = (batch, kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


class CausalSelfAttention(nn.Module):
    """Self-attention through `scaled_dot_product_attention` with a causal mask."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(d_model, 2 * n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.dropout = dropout

    def forward(
        self,
        x_BTC: torch.Tensor,
        cos_TD: torch.Tensor,
        sin_TD: torch.Tensor,
        cache: LayerKVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        q = self.wq(x_BTC).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.wkv(x_BTC).view(B, T, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos_TD, sin_TD), apply_rotary(k, cos_TD, sin_TD)

        attn_mask, is_causal = None, True
        if cache is not None:
            cache.k[:B, :, start_pos : start_pos + T] = k
            cache.v[:B, :, start_pos : start_pos + T] = v
            k, v = cache.k[:B, :, : start_pos + T], cache.v[:B, :, : start_pos + T]
            if start_pos > 0:
                # Query i sits at absolute position start_pos + i and may see keys 0..start_pos + i.
                S = start_pos + T
                q_pos = torch.arange(start_pos, S, device=x_BTC.device)[:, None]
                attn_mask = q_pos >= torch.arange(S, device=x_BTC.device)[None, :]
                is_causal = False
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))
