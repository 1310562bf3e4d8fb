"""Random draws that work whatever device the generator lives on.

A `torch.Generator` can only fill tensors on its own device (a CPU generator cannot draw a CUDA
tensor and vice versa), so every seeded draw in the project goes through these: they draw on the
generator's device and move the result to where it is used.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["multinomial", "uniform"]


def _draw_device(generator: Optional[torch.Generator], device) -> torch.device | None:
    return generator.device if generator is not None else device


def uniform(shape: Sequence[int], generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """U[0, 1) float32 of `shape` on `device`, drawn from `generator` (on whichever device it is)."""
    return torch.rand(tuple(shape), generator=generator, device=_draw_device(generator, device)).to(device)


def multinomial(probs: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """torch.multinomial over rows of `probs`, drawn with `generator` on its device; result on probs' device."""
    dev = _draw_device(generator, probs.device)
    return torch.multinomial(probs.to(dev), num_samples, generator=generator).to(probs.device)
