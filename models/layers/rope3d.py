"""Rotary embeddings over (t, h, w) and the position layouts of multi-scale video sequences.

Shapes: L sequence length, D head dim (D/2 rotated pairs), P positions [L, 3] as (t, h, w).

The D/2 rotated channel pairs are split between the three axes (`split`, e.g. 1/4 t, 3/8 h, 3/8 w
as in M-RoPE); each axis has its own geometric frequency ladder. A token at p = (t, h, w) rotates
its t-pairs by t * f_t, its h-pairs by h * f_h and its w-pairs by w * f_w, so the score between
two tokens depends only on the difference of their positions. A text token i sits at (i, i, i),
which makes the three-axis rotation the ordinary 1-D RoPE for text.

Two layouts for the video tokens of frame t, scale k with an (h_k, w_k) grid, after n prefix tokens:
- "raw"    (VideoAR, MST-RoPE): (t + n, i + n, j + n), raw integer grid indices at every scale;
- "center" (ERNIE 5.0, Uni-RoPE): grid cell centres mapped onto the final scale's grid,
           (t + n, (i + 0.5) * H_K / h_k - 0.5 + n, (j + 0.5) * W_K / w_k - 0.5 + n).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["MultiAxisRoPE", "axis_pairs", "sequence_positions"]


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


class MultiAxisRoPE(nn.Module):
    """cos/sin tables [L, D] for positions [L, 3], in the layout `models.layers.apply_rotary` expects."""

    def __init__(self, head_dim: int, split: Sequence[float] = (0.25, 0.375, 0.375), theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.pairs = axis_pairs(head_dim, split)
        inv = []
        for n in self.pairs:
            inv.append(1.0 / (theta ** (torch.arange(n, dtype=torch.float64) / max(n, 1))))
        self.register_buffer("inv_t", inv[0], persistent=False)
        self.register_buffer("inv_h", inv[1], persistent=False)
        self.register_buffer("inv_w", inv[2], persistent=False)

    def forward(self, pos_L3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = pos_L3.to(torch.float64)
        ang = torch.cat([p[:, 0:1] * self.inv_t.double(), p[:, 1:2] * self.inv_h.double(),
                         p[:, 2:3] * self.inv_w.double()], dim=-1)  # [L, D/2]
        ang = torch.cat([ang, ang], dim=-1)
        return ang.cos().float(), ang.sin().float()


def sequence_positions(prefix_len: int, scales: Sequence[tuple[int, int]], num_frames: int,
                       layout: str = "raw", first_frame: int = 0) -> torch.Tensor:
    """Positions [L, 3] of `prefix_len` text/condition tokens then frames x scales of grid tokens.

    layout: 'raw' (VideoAR) or 'center' (ERNIE 5.0), see the module docstring; '1d' gives every
        token (i, i, i) with i its sequence index (plain 1-D RoPE, the ablation baseline).
    first_frame: index of the first frame in this call (for building positions block by block).
    """
    if layout not in ("raw", "center", "1d"):
        raise ValueError(f"rope layout must be raw|center|1d, got {layout!r}")
    n = prefix_len
    parts = [torch.arange(n, dtype=torch.float64)[:, None].expand(n, 3)] if first_frame == 0 else []
    hk, wk = scales[-1]
    for t in range(first_frame, first_frame + num_frames):
        for h, w in scales:
            ii, jj = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                    indexing="ij")
            if layout == "center":
                ii = (ii + 0.5) * hk / h - 0.5
                jj = (jj + 0.5) * wk / w - 0.5
            tt = torch.full_like(ii, float(t))
            parts.append(torch.stack([tt, ii, jj], dim=-1).reshape(-1, 3) + n)
    pos = torch.cat(parts) if parts else torch.zeros(0, 3, dtype=torch.float64)
    if layout == "1d":
        start = 0 if first_frame == 0 else n + first_frame * sum(h * w for h, w in scales)
        idx = torch.arange(start, start + pos.shape[0], dtype=torch.float64)
        pos = idx[:, None].expand(-1, 3).clone()
    return pos
