"""Rotary position embeddings from a positions tensor: 1-D indices or (t, h, w) triples, integer or fractional.

Shapes: B batch, H heads, T tokens, D head dim (D/2 rotated channel pairs), P positions:
[T] or [B, T] (one axis), [T, 3] or [B, T, 3] (three axes).

One axis (the LM): pair i rotates by p * theta^(-2i/D), the usual RoPE.
Three axes (VideoAR's MST-RoPE, ERNIE 5.0's Uni-RoPE): the D/2 pairs are split between t, h and w
(`split`, e.g. 1/4, 3/8, 3/8 as in M-RoPE), each axis with its own geometric frequency ladder; a
token at (t, h, w) rotates its t-pairs by t * f_t, its h-pairs by h * f_h and its w-pairs by
w * f_w, so the score of two tokens depends only on the difference of their positions. A text
token i sits at (i, i, i). Angles are computed in float64 and cast once, so fractional positions
(the ERNIE 5.0 centre-aligned layout) cost nothing extra.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["Rotary", "apply_rotary", "axis_pairs", "rope_frequencies"]


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Inverse frequencies for the rotated pairs of a head, shape [head_dim // 2]."""
    if head_dim % 2:
        raise ValueError(f"rotary head_dim must be even, got {head_dim}")
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def axis_pairs(head_dim: int, split: Sequence[float]) -> tuple[int, int, int]:
    """How many of the head_dim/2 rotated pairs each axis (t, h, w) gets; the remainder goes to t."""
    if head_dim % 2:
        raise ValueError(f"rotary head_dim must be even, got {head_dim}")
    if len(split) != 3 or min(split) < 0 or sum(split) <= 0:
        raise ValueError(f"rope split must be 3 non-negative fractions (t, h, w), got {list(split)}")
    total = head_dim // 2
    s = [float(x) / float(sum(split)) for x in split]
    h, w = int(total * s[1]), int(total * s[2])
    return total - h - w, h, w


def apply_rotary(x_BHTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x[..., :D/2], x[..., D/2:]) by the given angles.

    cos / sin: [T, D] (shared by the batch) or [B, T, D] (per-sample positions).
    """
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    d2 = x_BHTD.shape[-1] // 2
    x1, x2 = x_BHTD[..., :d2], x_BHTD[..., d2:]
    cos, sin = cos[..., :d2], sin[..., :d2]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x_BHTD)


class Rotary(nn.Module):
    """cos/sin tables [.., T, D] for a positions tensor, in the layout `apply_rotary` expects.

    split: None for one axis (positions [T] / [B, T]); three fractions (t, h, w) for three axes
        (positions [T, 3] / [B, T, 3]).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, split: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.split = None if split is None else [float(s) for s in split]
        inv = self._frequencies()
        self.axes = len(inv)
        # Non-persistent: derived from the config, never trained, nothing for FSDP to shard or save.
        for i, f in enumerate(inv):
            self.register_buffer(f"inv_{i}", f, persistent=False)

    def _frequencies(self) -> list[torch.Tensor]:
        if self.split is None:
            return [rope_frequencies(self.head_dim, self.theta)]
        return [1.0 / (self.theta ** (torch.arange(n, dtype=torch.float64) / max(n, 1)))
                for n in axis_pairs(self.head_dim, self.split)]

    def reset_parameters(self) -> None:
        """Recompute the frequencies (after `to_empty` from the meta device)."""
        for i, f in enumerate(self._frequencies()):
            buf = getattr(self, f"inv_{i}")
            setattr(self, f"inv_{i}", f.to(buf.device if buf.device.type != "meta" else None))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = positions.to(torch.float64)
        if self.axes == 1:
            if p.dim() not in (1, 2):
                raise ValueError(f"1-D rotary positions must be [T] or [B, T], got shape {tuple(positions.shape)}")
            ang = p[..., None] * self.inv_0.double()
        else:
            if p.dim() not in (2, 3) or p.shape[-1] != 3:
                raise ValueError(f"(t, h, w) rotary positions must be [T, 3] or [B, T, 3], got {tuple(positions.shape)}")
            ang = torch.cat([p[..., i:i + 1] * getattr(self, f"inv_{i}").double() for i in range(3)], dim=-1)
        ang = torch.cat([ang, ang], dim=-1)
        return ang.cos().float(), ang.sin().float()
