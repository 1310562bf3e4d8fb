"""Timing helpers shared by the benchmarks: one call with device work included, and A/B alternation."""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: Optional[torch.device] = None) -> float:
    """Seconds for one call, device work included."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def alternate(fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int,
              device: Optional[torch.device] = None, warmup: int = 1) -> tuple[list[float], list[float]]:
    """Per-pair seconds of A and B, timed alternately with the order flipped every pair.

    Alternation makes slow drifts (thermal, other processes) hit both sides of each pair; callers
    report the median of per-pair ratios.
    """
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    for i in range(repeats):
        if i % 2:
            b = time_call(fn_b, device)
            a = time_call(fn_a, device)
        else:
            a = time_call(fn_a, device)
            b = time_call(fn_b, device)
        ta.append(a)
        tb.append(b)
    return ta, tb
