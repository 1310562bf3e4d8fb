"""Feed-forward layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DenseFFN", "SwiGLU", "swiglu_hidden"]


def swiglu_hidden(d_model: int, multiple_of: int = 32) -> int:
    """LLaMA's hidden size: 2/3 of 4d (same parameters as a 4d GELU MLP), rounded up."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, 0.0, std)
        nn.init.normal_(self.w3.weight, 0.0, std)
        nn.init.normal_(self.w2.weight, 0.0, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DenseFFN(SwiGLU):
    """A block's dense FFN, with the trunk's FFN interface: (h, state) -> (y, state, routing info = None)."""

    def forward(self, x: torch.Tensor, state=None, limit=None) -> tuple[torch.Tensor, None, None]:
        return super().forward(x), state, None
