"""Position layouts of multi-scale video sequences, as (t, h, w) triples for `models.layers.rope.Rotary`.

Shapes: L sequence length, positions [L, 3] as (t, h, w). A text / condition token i sits at
(i, i, i). Layouts for the video tokens of frame t, scale k with an (h_k, w_k) grid, after n prefix
tokens:
- "raw"    (VideoAR, MST-RoPE): (t + n, i + n, j + n), raw integer grid indices at every scale;
- "center" (ERNIE 5.0, Uni-RoPE): grid cell centres mapped onto the final scale's grid,
           (t + n, (i + 0.5) * H_K / h_k - 0.5 + n, (j + 0.5) * W_K / w_k - 0.5 + n) (fractional);
- "1d"     every token (i, i, i) with i its sequence index (plain 1-D RoPE, the ablation baseline).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["LAYOUTS", "sequence_positions"]

LAYOUTS = ("raw", "center", "1d")


def sequence_positions(prefix_len: int, scales: Sequence[tuple[int, int]], num_frames: int,
                       layout: str = "raw", first_frame: int = 0) -> torch.Tensor:
    """Positions [L, 3] of `prefix_len` text/condition tokens then frames x scales of grid tokens.

    layout: 'raw' (VideoAR) or 'center' (ERNIE 5.0), see the module docstring; '1d' gives every
        token (i, i, i) with i its sequence index (plain 1-D RoPE, the ablation baseline).
    first_frame: index of the first frame in this call (for building positions block by block).
    """
    if layout not in LAYOUTS:
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
