"""Multi-scale residual quantization (VAR) with bitwise codes (LFQ/BSQ, Infinity) or an index codebook.

Shapes: N maps (batch x latent frames: quantization is independent per latent frame), d code
channels, H/W the full latent grid, h_k/w_k the grid of scale k, K scales.

Encoding a latent map f [N, d, H, W] (VAR, Eq. 2 of VideoAR):
    f_hat = 0
    for k in 1..K:
        r_k    = down(f - f_hat, (h_k, w_k))          # the residual, seen at scale k
        tok_k  = quantize(r_k)                         # bits [N, h_k, w_k, d] or indices [N, h_k, w_k]
        f_hat += phi_k(up(code(tok_k), (H, W)))        # accumulate the scale's code at full size
The AR model predicting scale k+1 is fed `down(f_hat, (h_{k+1}, w_{k+1}))` (Eq. 6). The step-wise
pieces below (`quantize_scale`, `tokens_to_code`, `accumulate`, `next_input`, `flip_bits`) let a
training loop corrupt bits and re-quantize later scales from the corrupted reconstruction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.random import uniform

__all__ = [
    "BitwiseQuantizer",
    "MultiScaleQuantizer",
    "QuantizerConfig",
    "ScaleQuant",
    "flip_bits",
    "parse_scales",
]


def parse_scales(scales: Sequence) -> list[tuple[int, int]]:
    """[1, 2, (3, 4)] -> [(1, 1), (2, 2), (3, 4)]; validates positivity and non-decreasing size."""
    out = []
    for s in scales:
        if isinstance(s, int):
            hw = (int(s), int(s))
        else:
            s = list(s)
            if len(s) != 2:
                raise ValueError(f"a scale is an int or an (h, w) pair, got {s!r}")
            hw = (int(s[0]), int(s[1]))
        if min(hw) < 1:
            raise ValueError(f"scale sizes must be >= 1, got {hw}")
        if out and (hw[0] < out[-1][0] or hw[1] < out[-1][1]):
            raise ValueError(f"scales must not shrink: {out[-1]} then {hw}")
        out.append(hw)
    if not out:
        raise ValueError("the scale schedule is empty")
    return out


def flip_bits(bits: torch.Tensor, p: float | torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Flip each bit independently with probability `p` (a float, or a tensor broadcastable to `bits`)."""
    noise = uniform(bits.shape, generator, bits.device)
    flip = noise < (p if not torch.is_tensor(p) else p.to(bits.device))
    return torch.where(flip, 1 - bits, bits)


@dataclass
class QuantizerConfig:
    """Multi-scale residual quantizer.

    scales: token-map sizes per latent frame, coarse to fine; the last one is the latent grid.
    kind: 'bits' (lookup-free: each token is `dim` bits) or 'vq' (index codebook of `codebook_size`).
    phi: VAR's refinement after upsampling a scale's code: 'shared' (one 3x3 conv, residual mix
        `phi_ratio`), 'per_scale', or 'none'.
    entropy_temperature: sharpness of the soft bit probabilities used by the entropy penalty.
    """

    dim: int = 16
    scales: list = field(default_factory=lambda: [1, 2, 3, 4])
    kind: str = "bits"
    codebook_size: int = 1024
    vq_l2_normalize: bool = False
    vq_ema: bool = True
    phi: str = "shared"
    phi_ratio: float = 0.5
    down_mode: str = "area"
    up_mode: str = "bilinear"
    entropy_temperature: float = 0.25
    entropy_codebook_weight: float = 1.0

    def __post_init__(self) -> None:
        self.scales = parse_scales(self.scales)
        if self.kind not in ("bits", "vq"):
            raise ValueError(f"quantizer.kind must be 'bits' or 'vq', got {self.kind!r}")
        if self.phi not in ("shared", "per_scale", "none"):
            raise ValueError(f"quantizer.phi must be shared|per_scale|none, got {self.phi!r}")
        if self.dim < 1:
            raise ValueError(f"quantizer.dim must be >= 1, got {self.dim}")
        if self.down_mode not in ("area", "bilinear", "bicubic"):
            raise ValueError(f"quantizer.down_mode must be area|bilinear|bicubic, got {self.down_mode!r}")
        if self.up_mode not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"quantizer.up_mode must be bilinear|bicubic|nearest, got {self.up_mode!r}")


@dataclass
class ScaleQuant:
    """One scale's quantization: tokens, their code map and the entropy penalty / usage stats."""

    tokens: torch.Tensor          # bits uint8 [N, h, w, d] or indices long [N, h, w]
    code: torch.Tensor            # [N, d, h, w]; differentiable w.r.t. the code magnitude / codebook
    entropy_loss: torch.Tensor
    stats: dict


class BitwiseQuantizer(nn.Module):
    """Lookup-free binary quantizer: bit = [x > 0], code = (2*bit - 1) * scale.

    The code magnitude is a learnable per-scale scalar, so coarse scales can carry large residuals
    and fine scales small ones. The entropy penalty (LFQ) makes each position's bits confident
    (low per-sample entropy) while keeping every bit balanced over the batch (high marginal entropy),
    which keeps the 2^d code space in use.
    """

    def __init__(self, dim: int, num_scales: int, temperature: float, codebook_weight: float) -> None:
        super().__init__()
        self.dim = dim
        self.temperature = temperature
        self.codebook_weight = codebook_weight
        # Coarse scales see the largest residuals; start at 1 and let training settle the rest.
        self.log_magnitude = nn.Parameter(torch.zeros(num_scales))

    def magnitude(self, k: int) -> torch.Tensor:
        return self.log_magnitude[k].exp()

    def bits_to_code(self, bits: torch.Tensor, k: int) -> torch.Tensor:
        """bits [N, h, w, d] -> code [N, d, h, w]."""
        return (2.0 * bits.to(self.log_magnitude.dtype) - 1.0).permute(0, 3, 1, 2) * self.magnitude(k)

    def forward(self, r: torch.Tensor, k: int) -> ScaleQuant:
        """Quantize r [N, d, h, w]; the entropy penalty back-propagates into r (the encoder)."""
        bits = (r.detach() > 0).to(torch.uint8).permute(0, 2, 3, 1)
        code = self.bits_to_code(bits, k)
        scale = self.magnitude(k).detach()
        prob = torch.sigmoid(r / (scale * self.temperature))
        sample_ent = _binary_entropy(prob).mean()
        codebook_ent = _binary_entropy(prob.mean(dim=(0, 2, 3))).mean()
        entropy_loss = sample_ent - self.codebook_weight * codebook_ent
        with torch.no_grad():
            hard_marginal = bits.float().mean(dim=(0, 1, 2))
            stats = {
                "bit_balance": (1.0 - (2 * hard_marginal - 1).abs()).mean(),  # 1 = every bit 50/50
                "bit_entropy": _binary_entropy(hard_marginal).mean() / math.log(2),  # in bits, max 1
            }
        return ScaleQuant(bits, code, entropy_loss, stats)


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


class _VQScale(nn.Module):
    """Index-codebook quantizer shared by all scales (VAR), wrapping `models.tokenizers.vq`."""

    def __init__(self, cfg: QuantizerConfig) -> None:
        super().__init__()
        from models.tokenizers.vq import VectorQuantizer

        self.vq = VectorQuantizer(cfg.codebook_size, cfg.dim, l2_normalize=cfg.vq_l2_normalize, ema=cfg.vq_ema,
                                  commitment_weight=1.0)

    def forward(self, r: torch.Tensor, k: int) -> ScaleQuant:
        out = self.vq(r.detach().permute(0, 2, 3, 1))  # EMA update / dead-code restart in training
        code = self.bits_to_code(out.indices, k)
        counts = torch.bincount(out.indices.flatten(), minlength=self.vq.codebook_size).float()
        probs = counts / counts.sum().clamp_min(1)
        stats = {"usage": (counts > 0).float().mean(),
                 "perplexity": torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum())}
        return ScaleQuant(out.indices, code, r.new_zeros(()), stats)

    def bits_to_code(self, indices: torch.Tensor, k: int) -> torch.Tensor:
        return self.vq.lookup(indices).permute(0, 3, 1, 2)


class MultiScaleQuantizer(nn.Module):
    """VAR-style multi-scale residual quantizer over a per-frame latent map [N, d, H, W]."""

    def __init__(self, cfg: QuantizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scales = list(cfg.scales)
        k = len(self.scales)
        self.quant = BitwiseQuantizer(cfg.dim, k, cfg.entropy_temperature, cfg.entropy_codebook_weight) \
            if cfg.kind == "bits" else _VQScale(cfg)
        n_phi = {"shared": 1, "per_scale": k, "none": 0}[cfg.phi]
        self.phis = nn.ModuleList(nn.Conv2d(cfg.dim, cfg.dim, 3, padding=1) for _ in range(n_phi))

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def bitwise(self) -> bool:
        return self.cfg.kind == "bits"

    # -- the step-wise pieces ---------------------------------------------------

    def down(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Resample a full-grid map to scale k's grid."""
        hw = self.scales[k]
        if tuple(x.shape[-2:]) == hw:
            return x
        if self.cfg.down_mode == "area":
            return F.interpolate(x, size=hw, mode="area")
        return F.interpolate(x, size=hw, mode=self.cfg.down_mode, align_corners=False, antialias=True)

    def up(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        if self.cfg.up_mode == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        return F.interpolate(x, size=size, mode=self.cfg.up_mode, align_corners=False)

    def phi(self, z: torch.Tensor, k: int) -> torch.Tensor:
        if not len(self.phis):
            return z
        conv = self.phis[0 if len(self.phis) == 1 else k]
        r = self.cfg.phi_ratio
        return (1 - r) * z + r * conv(z)

    def quantize_scale(self, resid: torch.Tensor, k: int) -> ScaleQuant:
        """Quantize the full-grid residual [N, d, H, W] at scale k (it is downsampled first)."""
        return self.quant(self.down(resid, k), k)

    def tokens_to_code(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """Scale k's tokens -> code map [N, d, h_k, w_k]."""
        return self.quant.bits_to_code(tokens, k)

    def accumulate(self, f_hat: torch.Tensor, code: torch.Tensor, k: int) -> torch.Tensor:
        """f_hat + phi_k(up(code)): add scale k's code to the running full-grid reconstruction."""
        return f_hat + self.phi(self.up(code, tuple(f_hat.shape[-2:])), k)

    def next_input(self, f_hat: torch.Tensor, k: int) -> torch.Tensor:
        """The AR model's input for predicting scale k: the reconstruction so far on scale k's grid."""
        return self.down(f_hat, k)

    # -- whole passes ---------------------------------------------------------------

    def check_grid(self, f: torch.Tensor) -> None:
        if tuple(f.shape[-2:]) != self.scales[-1]:
            raise ValueError(f"the last scale {self.scales[-1]} must equal the latent grid {tuple(f.shape[-2:])}")

    def forward(self, f: torch.Tensor, num_scales: Optional[int] = None) -> dict:
        """Quantize f [N, d, H, W] over the first `num_scales` scales (all by default).

        Returns `f_hat` with VAR's straight-through (value = the reconstruction, gradient = identity
        to f), tokens per scale, `commit_loss` (pulls f to its reconstruction, trains the encoder),
        `quant_loss` (pulls the reconstruction to f, trains code magnitudes, phi, a codebook),
        `entropy_loss` (bitwise code usage) and per-scale stats.
        """
        self.check_grid(f)
        k_max = self.num_scales if num_scales is None else num_scales
        f_hat = torch.zeros_like(f)
        tokens, stats = [], []
        entropy = f.new_zeros(())
        for k in range(k_max):
            # tokens come from the detached residual; the entropy term still reaches the encoder via f
            q = self.quantize_scale(f - f_hat.detach(), k)
            f_hat = self.accumulate(f_hat, q.code, k)
            tokens.append(q.tokens)
            stats.append(q.stats)
            entropy = entropy + q.entropy_loss
        commit = F.mse_loss(f, f_hat.detach())
        quant = F.mse_loss(f_hat, f.detach())
        f_st = f_hat.detach() + (f - f.detach())
        return {"f_hat": f_st, "tokens": tokens, "commit_loss": commit, "quant_loss": quant,
                "entropy_loss": entropy / k_max, "stats": stats}

    @torch.no_grad()
    def encode(self, f: torch.Tensor, return_partial: bool = False):
        """Tokens per scale for f [N, d, H, W]; optionally the reconstruction after each scale."""
        self.check_grid(f)
        f_hat = torch.zeros_like(f)
        tokens, partial = [], []
        for k in range(self.num_scales):
            q = self.quantize_scale(f - f_hat, k)
            f_hat = self.accumulate(f_hat, self.tokens_to_code(q.tokens, k), k)
            tokens.append(q.tokens)
            partial.append(f_hat)
        return (tokens, partial) if return_partial else tokens

    def decode(self, tokens: Sequence[torch.Tensor], grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """f_hat from the tokens of the first len(tokens) scales (fewer scales = coarser)."""
        grid = grid or self.scales[-1]
        first = tokens[0]
        f_hat = None
        for k, tok in enumerate(tokens):
            code = self.tokens_to_code(tok, k)
            if f_hat is None:
                f_hat = code.new_zeros(first.shape[0], code.shape[1], *grid)
            f_hat = self.accumulate(f_hat, code, k)
        return f_hat

    def teacher_forcing_inputs(self, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Inputs for scales 2..K from ground-truth tokens: down(f_hat after scale k-1, scale k)."""
        grid = self.scales[-1]
        f_hat = None
        inputs = []
        for k, tok in enumerate(tokens[:-1]):
            code = self.tokens_to_code(tok, k)
            if f_hat is None:
                f_hat = code.new_zeros(tok.shape[0], code.shape[1], *grid)
            f_hat = self.accumulate(f_hat, code, k)
            inputs.append(self.next_input(f_hat, k + 1))
        return inputs
