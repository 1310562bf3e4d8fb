"""Block-causal attention masks over (prefix), (frame 1, scale 1..K), (frame 2, scale 1..K), ...

Masks are boolean, True = the query may attend to the key (the `scaled_dot_product_attention`
convention). Inside a block attention is bidirectional; a block sees every earlier block. The
Random Frame Mask then hides some earlier frames from a query frame: never the prefix (text /
condition), never the query's own frame.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["block_causal_mask", "block_layout", "frame_mask_keep", "reference_block_mask"]


def block_layout(prefix_len: int, scales: Sequence[tuple[int, int]], num_frames: int,
                 device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: block id (prefix = 0, frame t scale k = 1 + t*K + k) and frame id (prefix = -1)."""
    sizes = [h * w for h, w in scales]
    k = len(sizes)
    block = [torch.zeros(prefix_len, dtype=torch.long)]
    frame = [torch.full((prefix_len,), -1, dtype=torch.long)]
    for t in range(num_frames):
        for s, n in enumerate(sizes):
            block.append(torch.full((n,), 1 + t * k + s, dtype=torch.long))
            frame.append(torch.full((n,), t, dtype=torch.long))
    return torch.cat(block).to(device), torch.cat(frame).to(device)


def block_causal_mask(block_q: torch.Tensor, block_k: torch.Tensor, frame_q: Optional[torch.Tensor] = None,
                      frame_k: Optional[torch.Tensor] = None, frame_keep: Optional[torch.Tensor] = None,
                      window: Optional[int] = None) -> torch.Tensor:
    """[Lq, Lk] (or [B, 1, Lq, Lk] with `frame_keep`) boolean mask, vectorised.

    frame_keep: [B, T, T] bool; frame_keep[b, tq, tk] = False hides frame tk from queries of frame tq
        (only tk < tq is consulted: the prefix and the query's own frame are always visible).
    window: queries of frame tq see earlier frames tk >= tq - window only (None: all).
    """
    allowed = block_k[None, :] <= block_q[:, None]
    if frame_keep is None and window is None:
        return allowed
    fq, fk = frame_q[:, None], frame_k[None, :]
    earlier = (fk >= 0) & (fq >= 0) & (fk < fq)  # an earlier video frame, not the prefix
    if window is not None:
        allowed = allowed & ~(earlier & (fk < fq - window))
    if frame_keep is None:
        return allowed
    b = frame_keep.shape[0]
    tq = frame_q.clamp_min(0)
    tk = frame_k.clamp_min(0)
    keep = frame_keep[:, tq][:, :, tk]  # [B, Lq, Lk]
    hidden = earlier[None] & ~keep
    return (allowed[None] & ~hidden).reshape(b, 1, *allowed.shape)


def frame_mask_keep(batch: int, num_frames: int, p_mask: float, generator: Optional[torch.Generator] = None,
                    device: torch.device | None = None) -> torch.Tensor:
    """Random Frame Mask draw: keep[b, tq, tk] ~ Bernoulli(1 - p_mask) i.i.d. per (query, key) frame pair."""
    draw = torch.rand(batch, num_frames, num_frames, generator=generator)
    return (draw >= p_mask).to(device)


def reference_block_mask(prefix_len: int, scales: Sequence[tuple[int, int]], num_frames: int,
                         frame_keep: Optional[torch.Tensor] = None, window: Optional[int] = None) -> torch.Tensor:
    """Slow, explicit construction (python loops over token pairs), for tests."""
    tokens = [("p", -1, 0)] * prefix_len  # (kind, frame, scale)
    for t in range(num_frames):
        for s, (h, w) in enumerate(scales):
            tokens += [("v", t, s)] * (h * w)
    n = len(tokens)
    batch = 1 if frame_keep is None else frame_keep.shape[0]
    out = torch.zeros(batch, n, n, dtype=torch.bool)
    for b in range(batch):
        for i, (kq, tq, sq) in enumerate(tokens):
            for j, (kk, tk, sk) in enumerate(tokens):
                if kk == "p":
                    ok = True  # the prefix is visible to everyone (and bidirectional inside)
                elif kq == "p":
                    ok = False  # the prefix never sees video tokens
                elif tk < tq:
                    ok = True
                    if window is not None and tk < tq - window:
                        ok = False
                    if frame_keep is not None and not bool(frame_keep[b, tq, tk]):
                        ok = False
                elif tk == tq:
                    ok = sk <= sq
                else:
                    ok = False
                out[b, i, j] = ok
    return out if frame_keep is not None else out[0]
