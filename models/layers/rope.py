"""Rotary position embeddings (1D, for token sequences).

Shapes: B batch, H heads, T time, D head dim.
"""

from __future__ import annotations

import torch
from torch import nn


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Inverse frequencies for the rotated pairs of a head, shape [head_dim // 2]."""
    if head_dim % 2:
        raise ValueError(f"rotary head_dim must be even, got {head_dim}")
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def apply_rotary(x_BHTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x[..., :D/2], x[..., D/2:]) by the given angles."""
    d2 = x_BHTD.shape[-1] // 2
    x1, x2 = x_BHTD[..., :d2], x_BHTD[..., d2:]
    cos, sin = cos_TD[..., :d2], sin_TD[..., :d2]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x_BHTD)


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for positions [0, max_seq_len); computed in float64 then cast once."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        # Buffers are non-persistent: they are derived from the config, never trained, and FSDP
        # need not shard or checkpoint them.
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        inv = rope_frequencies(self.head_dim, self.theta)
        pos = torch.arange(self.max_seq_len, dtype=torch.float64)
        ang = torch.outer(pos, inv)
        ang = torch.cat((ang, ang), dim=-1)
        device = self.cos.device if self.cos.device.type != "meta" else None
        self.cos = ang.cos().float().to(device)
        self.sin = ang.sin().float().to(device)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + length > self.max_seq_len:
            raise ValueError(
                f"position {start + length} exceeds max_seq_len={self.max_seq_len}; "
                "raise model.net.max_seq_len"
            )
        return self.cos[start : start + length], self.sin[start : start + length]
