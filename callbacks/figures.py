"""Matplotlib figures rendered off-screen (Agg, no pyplot global state) for TensorBoard images and PNGs.

Figures are plain `matplotlib.figure.Figure` objects with an Agg canvas: nothing is registered with
pyplot, so nothing has to be closed. matplotlib is imported here only; models/ never needs it.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from models.io import atomic_write_bytes

__all__ = ["figure_to_array", "heatmap_figure", "lines_figure", "save_png"]

_MAX_TICKS = 32  # beyond this many rows / columns, label every n-th one


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """uint8 [H, W, 3] RGB pixels of the figure (TensorBoard `add_image(..., dataformats="HWC")`)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(fig: Figure, path: str | os.PathLike) -> None:
    """Write the figure as a PNG, atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _as_2d(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().float().cpu().numpy()
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or 0 in v.shape:
        raise ValueError(f"heatmap values must be a non-empty [rows, cols] matrix, got shape {v.shape}")
    return v


def _ticks(n: int, labels: Sequence[Any] | None) -> tuple[list[int], list[str]]:
    """Tick positions and labels for n cells, thinned to at most ~_MAX_TICKS / 2 when there are many."""
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} tick labels for {n} cells")
    step = 1 if n <= _MAX_TICKS else math.ceil(n / (_MAX_TICKS // 2))
    pos = list(range(0, n, step))
    return pos, [str(labels[i]) if labels is not None else str(i) for i in pos]


def heatmap_figure(values_RC: Any, *, xlabel: str, ylabel: str, title: str, cbar_label: str,
                   xticklabels: Sequence[Any] | None = None, yticklabels: Sequence[Any] | None = None,
                   annotate: bool = False, vmin: float | None = None, vmax: float | None = None,
                   cmap: str = "viridis") -> Figure:
    """A [rows, cols] matrix as a heatmap: named axes, a labelled colour bar (the figure's second axes),
    and the title (callers put the step in it). Ticks default to 0-based indices and are thinned past
    32 cells; annotate writes each cell's value (2 decimals; for small matrices such as IoU). nan cells
    are left blank."""
    v = _as_2d(values_RC)
    R, C = v.shape
    cell = 0.55 if annotate else 0.2
    width = min(max(3.0 + cell * C, 5.0), 16.0)
    height = min(max(1.6 + cell * R, 3.0), 11.0)
    fig = _new_figure(width, height)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(v), aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
    cbar = fig.colorbar(im, ax=ax)
    cbar.set_label(cbar_label)
    xpos, xlab = _ticks(C, xticklabels)
    ypos, ylab = _ticks(R, yticklabels)
    rotate = xticklabels is not None and max(len(s) for s in xlab) > 3
    ax.set_xticks(xpos, xlab, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    ax.set_yticks(ypos, ylab)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if annotate:
        for r in range(R):
            for c in range(C):
                if np.isfinite(v[r, c]):
                    dark = im.norm(v[r, c]) < 0.5
                    ax.text(c, r, f"{v[r, c]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
    return fig


def lines_figure(series: dict[str, Sequence[float]], *, xlabel: str, ylabel: str, title: str,
                 x: Sequence[float] | None = None) -> Figure:
    """One line per named series over x (default 0, 1, ...), with a legend; nan points break a line."""
    lengths = {len(s) for s in series.values()}
    if len(lengths) > 1:
        raise ValueError(f"all series must have one length, got {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    xs = list(range(n)) if x is None else list(x)
    if len(xs) != n:
        raise ValueError(f"{len(xs)} x values for series of length {n}")
    fig = _new_figure(min(max(4.0 + 0.12 * n, 6.0), 14.0), 4.0)
    ax = fig.add_subplot()
    for name, ys in series.items():
        ax.plot(xs, [float(y) for y in ys], marker="o" if n <= 48 else None, markersize=3, label=str(name))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8, loc="best")
    return fig
