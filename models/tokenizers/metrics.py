"""Colour-aware reconstruction metrics for pixels in [-1, 1] ([N, 3, H, W] or [B, 3, T, H, W]).

PSNR over RGB barely notices a reconstruction that keeps luminance and drops colour (a grey copy of
a colourful clip still scores ~16 dB), so every place that reports reconstruction quality also
reports these:

- chroma: the mean over pixels of |x - mean_RGB(x)| (0 for a grey image), of the reference and of
  the reconstruction, and `chroma_ratio` = recon / reference (1 = as colourful as the input);
- chroma_error: mean |c(x_hat) - c(x)| with c(x) = x - mean_RGB(x) (the colour part of the error);
- psnr_r / psnr_g / psnr_b: PSNR per RGB channel;
- psnr_y / psnr_cbcr: PSNR of the luma and of the two chroma planes of BT.601 YCbCr (full range).

All PSNRs are over the whole batch (one MSE), in [0, 1] units with data range 1.
"""

from __future__ import annotations

import math

import torch

__all__ = ["chroma", "colour_metrics", "grey", "psnr"]

# BT.601 full-range RGB -> YCbCr for values in [0, 1] (Cb, Cr centred at 0.5)
_YCBCR = torch.tensor([[0.299, 0.587, 0.114],
                       [-0.168736, -0.331264, 0.5],
                       [0.5, -0.418688, -0.081312]])


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """[..., 3, (T,) H, W] -> [P, 3] pixels."""
    if x.dim() not in (4, 5) or x.shape[1] != 3:
        raise ValueError(f"expected RGB [N, 3, H, W] or [B, 3, T, H, W], got {tuple(x.shape)}")
    return x.movedim(1, -1).reshape(-1, 3).float()


def grey(x: torch.Tensor) -> torch.Tensor:
    """The same pixels with every channel set to their RGB mean (a colourless copy)."""
    return x.mean(dim=1, keepdim=True).expand_as(x).clone()


def chroma(x: torch.Tensor) -> float:
    """Mean |x - mean_RGB(x)| in the input's units (0 for grey)."""
    p = _channels_last(x)
    return float((p - p.mean(-1, keepdim=True)).abs().mean())


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a - b).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def psnr(recon: torch.Tensor, real: torch.Tensor) -> float:
    """PSNR over RGB of pixels in [-1, 1] (clamped), in [0, 1] units with data range 1."""
    return _psnr((recon.float().clamp(-1, 1) + 1) / 2, (real.float().clamp(-1, 1) + 1) / 2)


@torch.no_grad()
def colour_metrics(recon: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """Chroma of both, chroma error and ratio, per-channel and YCbCr PSNRs (see the module docstring)."""
    if recon.shape != real.shape:
        raise ValueError(f"recon {tuple(recon.shape)} and real {tuple(real.shape)} differ in shape")
    r, x = _channels_last(recon).clamp(-1, 1), _channels_last(real).clamp(-1, 1)
    cr, cx = r - r.mean(-1, keepdim=True), x - x.mean(-1, keepdim=True)
    chroma_real, chroma_recon = float(cx.abs().mean()), float(cr.abs().mean())
    ru, xu = (r + 1) / 2, (x + 1) / 2
    m = _YCBCR.to(ru)
    ry, xy = ru @ m.T, xu @ m.T
    out = {"chroma_real": chroma_real, "chroma_recon": chroma_recon,
           "chroma_ratio": chroma_recon / chroma_real if chroma_real > 0 else float("nan"),
           "chroma_error": float((cr - cx).abs().mean())}
    for i, c in enumerate("rgb"):
        out[f"psnr_{c}"] = _psnr(ru[:, i], xu[:, i])
    out["psnr_y"] = _psnr(ry[:, 0], xy[:, 0])
    out["psnr_cbcr"] = _psnr(ry[:, 1:], xy[:, 1:])
    return out
