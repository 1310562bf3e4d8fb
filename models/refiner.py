"""Cascaded diffusion refiner: low-resolution image -> high-resolution image (ERNIE 5.0, papers.md 4.2).

The autoregressive backbone produces low-resolution semantics and layout; a separately trained
conditional diffusion model adds the detail. It is trained on high-resolution images paired with a
controlled degradation of themselves (`degrade`: blur, downsampling, an optional round trip through
the frozen visual tokenizer with random bit flips, additive noise), so that at inference it accepts
what the tokenizer decodes from a generated token map.

Pieces, top to bottom: `RefinerConfig` (+ presets), `DegradeConfig` and `degrade`, the noise schedule
(cosine, v-prediction), the conditional U-Net `Refiner` with its `loss` and DDIM `sample`.

Shapes: x_BCHW high resolution in [-1, 1]; low_BChw low resolution; t_B integer diffusion steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.config import config_from_dict, fill_preset

__all__ = ["DegradeConfig", "Refiner", "RefinerConfig", "cosine_alpha_bar", "degrade", "gaussian_blur", "load_refiner",
           "refiner_from_checkpoint"]

PRESETS = {
    "tiny": dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, attention=False),
    "small": dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attention=True),
    "base": dict(ch=64, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attention=True),
}


@dataclass
class RefinerConfig:
    """Architecture and diffusion process of the refiner. Fields left `None` come from `preset`.

    scale: upsampling factor (high = scale x low). attention: self-attention at the lowest resolution.
    prediction: 'v' (v-prediction) or 'eps'. residual: diffuse the residual high - upsample(low)
        instead of the image itself (the network then only has to add detail).
    timesteps: length of the discrete noise schedule (cosine alpha-bar).
    target_scale: what is diffused is (image or residual) / target_scale: the residual of a good
        upsampling is small (std ~0.08 on the embedded shapes), and at unit noise its signal would
        be drowned at all but the last steps; null = 0.1 for residuals (near unit variance), 1.0 for images.
    """

    preset: str = "tiny"
    in_channels: int = 3
    scale: int = 2
    ch: Optional[int] = None
    ch_mult: Optional[list] = None
    num_res_blocks: Optional[int] = None
    attention: Optional[bool] = None
    heads: int = 4
    dropout: float = 0.0
    timesteps: int = 1000
    prediction: str = "v"
    residual: bool = True
    target_scale: Optional[float] = None

    def __post_init__(self) -> None:
        fill_preset(self, PRESETS)
        self.ch_mult = [int(m) for m in self.ch_mult]
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"model.net.ch_mult must be a non-empty list of positive ints, got {self.ch_mult}")
        if self.ch < 4 or self.ch % 4:
            raise ValueError(f"model.net.ch must be a positive multiple of 4, got {self.ch}")
        if self.scale < 1:
            raise ValueError(f"model.net.scale must be >= 1, got {self.scale}")
        if self.prediction not in ("v", "eps"):
            raise ValueError(f"model.net.prediction must be 'v' or 'eps', got {self.prediction!r}")
        if self.target_scale is None:
            self.target_scale = 0.1 if self.residual else 1.0
        if self.target_scale <= 0:
            raise ValueError(f"model.net.target_scale must be > 0, got {self.target_scale}")
        if self.timesteps < 2:
            raise ValueError(f"model.net.timesteps must be >= 2, got {self.timesteps}")
        if self.num_res_blocks < 1:
            raise ValueError(f"model.net.num_res_blocks must be >= 1, got {self.num_res_blocks}")

    @property
    def multiple(self) -> int:
        """High-resolution sides must be a multiple of this (one halving per extra level)."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RefinerConfig":
        return config_from_dict(cls, d)


# ----------------------------------------------------------------------------------- degradation


@dataclass
class DegradeConfig:
    """The controlled degradation that makes a training input from a high-resolution target.

    Each range [lo, hi] is sampled uniformly per image. In order: Gaussian blur (sigma in high-res
    pixels) -> area downsampling by the refiner's scale -> with probability `tokenizer_prob` (when a
    tokenizer is given) encode with the frozen visual tokenizer, flip each bit with probability in
    `flip_prob`, decode -> additive Gaussian noise (std in [-1, 1] units) -> clamp to [-1, 1].
    tokenizer: checkpoint of the frozen visual tokenizer whose decodes the refiner will see at
        inference (ERNIE 5.0's); null = no round trip.
    """

    blur_sigma: list = field(default_factory=lambda: [0.0, 1.0])
    noise_std: list = field(default_factory=lambda: [0.0, 0.03])
    flip_prob: list = field(default_factory=lambda: [0.0, 0.05])
    tokenizer_prob: float = 0.5
    tokenizer: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("blur_sigma", "noise_std", "flip_prob"):
            r = [float(v) for v in getattr(self, name)]
            if len(r) != 2 or r[0] < 0 or r[1] < r[0]:
                raise ValueError(f"model.degrade.{name} must be [lo, hi] with 0 <= lo <= hi, got {r}")
            setattr(self, name, r)
        if self.flip_prob[1] > 0.5:
            raise ValueError(f"model.degrade.flip_prob must stay <= 0.5, got {self.flip_prob}")
        if not 0.0 <= self.tokenizer_prob <= 1.0:
            raise ValueError(f"model.degrade.tokenizer_prob must be in [0, 1], got {self.tokenizer_prob}")

    @classmethod
    def from_dict(cls, d: dict) -> "DegradeConfig":
        return config_from_dict(cls, d, "model.degrade")


def _uniform(n: int, lo: float, hi: float, generator: Optional[torch.Generator], device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of x [B, C, H, W] with its own sigma [B] (0 = unchanged), reflect padding."""
    radius = max(1, int(math.ceil(3 * float(sigma.max())))) if sigma.numel() else 1
    offs = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp_min(1e-6)[:, None]
    k = torch.exp(-0.5 * (offs[None] / s) ** 2)
    k = torch.where(sigma[:, None] > 0, k, (offs[None] == 0).to(x.dtype))  # sigma 0 -> a delta
    k = k / k.sum(1, keepdim=True)  # [B, K]
    b, c, h, w = x.shape
    if radius >= min(h, w):
        raise ValueError(f"blur sigma {float(sigma.max()):.2f} is too large for {h}x{w} images")
    y = F.pad(x, (radius, radius, radius, radius), mode="reflect").reshape(1, b * c, h + 2 * radius, w + 2 * radius)
    kb = k.repeat_interleave(c, 0)  # one kernel per (image, channel) group
    y = F.conv2d(y, kb[:, None, None, :], groups=b * c)  # along W
    y = F.conv2d(y, kb[:, None, :, None], groups=b * c)  # along H
    return y.reshape(b, c, h, w)


@torch.no_grad()
def degrade(x: torch.Tensor, cfg: DegradeConfig, scale: int, generator: Optional[torch.Generator] = None,
            tokenizer=None) -> torch.Tensor:
    """High-resolution images [B, C, H, W] -> their degraded low-resolution versions [B, C, H/s, W/s].

    tokenizer: a frozen `VisualTokenizer` (2D, or 3D taking images as 1-frame clips) for the round trip.
    The result depends only on x, cfg and the generator's state.
    """
    b, _, h, w = x.shape
    if h % scale or w % scale:
        raise ValueError(f"image size {h}x{w} is not divisible by the refiner's scale {scale}")
    dev = x.device
    sigma = _uniform(b, *cfg.blur_sigma, generator, dev)
    noise_std = _uniform(b, *cfg.noise_std, generator, dev)
    flip_p = _uniform(b, *cfg.flip_prob, generator, dev)
    use_tok = torch.rand(b, generator=generator, device=dev) < cfg.tokenizer_prob
    noise = torch.randn(x.shape[0], x.shape[1], h // scale, w // scale, generator=generator, device=dev)
    y = gaussian_blur(x.float(), sigma) if cfg.blur_sigma[1] > 0 else x.float()
    y = F.interpolate(y, scale_factor=1 / scale, mode="area") if scale > 1 else y
    if tokenizer is not None and bool(use_tok.any()):
        video = tokenizer.cfg.video
        tokens = tokenizer.encode(y.unsqueeze(2) if video else y)
        flipped = []
        for t in tokens:
            if tokenizer.cfg.quantizer == "bits":  # an index codebook (vq) is left as it is
                p = flip_p.view(-1, *([1] * (t.dim() - 1)))
                flip = torch.rand(t.shape, generator=generator, device=dev) < p
                t = torch.where(flip, 1 - t, t)
            flipped.append(t)
        rt = tokenizer.decode(flipped).clamp(-1, 1)
        rt = rt[:, :, 0] if rt.dim() == 5 else rt
        y = torch.where(use_tok.view(-1, 1, 1, 1), rt.to(y.dtype), y)
    y = y + noise_std.view(-1, 1, 1, 1) * noise
    return y.clamp(-1, 1)


# ----------------------------------------------------------------------------------- noise schedule


def cosine_alpha_bar(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """alpha_bar(t) for t = 0 .. timesteps-1 (t = 0 nearly clean, the last nearly pure noise), float64."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    ab = (f / f[0])[1:]
    return ab.clamp(1e-5, 1.0 - 1e-5)


# ----------------------------------------------------------------------------------- network


TIME_FREQS = 64  # sinusoidal features of the step (whatever the width: a narrow net still needs to tell steps apart)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) steps t [B]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c // 4) if c >= 4 else 1, c)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the step embedding as a per-channel scale and shift."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map (residual)."""

    def __init__(self, c: int, heads: int) -> None:
        super().__init__()
        if c % heads:
            raise ValueError(f"model.net.heads={heads} does not divide the lowest level's {c} channels")
        self.heads = heads
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.out = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        o = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, c/heads]
        return x + self.out(o.transpose(-1, -2).reshape(b, c, h, w))


class Refiner(nn.Module):
    """Conditional U-Net denoiser: (noisy high-res x_t, step t, low-res image) -> v (or eps).

    The low-resolution image enters bicubically upsampled and concatenated with x_t.
    """

    def __init__(self, cfg: RefinerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch, emb_dim, c_img = cfg.ch, 4 * cfg.ch, cfg.in_channels
        self.emb = nn.Sequential(nn.Linear(TIME_FREQS, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(2 * c_img, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips, c = [ch], ch
        for i, m in enumerate(cfg.ch_mult):
            level = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.append(ResBlock(c, ch * m, emb_dim, cfg.dropout))
                c = ch * m
                skips.append(c)
            if i < len(cfg.ch_mult) - 1:
                level.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
            self.down.append(level)
        self.mid1 = ResBlock(c, c, emb_dim, cfg.dropout)
        self.mid_attn = SelfAttention(c, cfg.heads) if cfg.attention else nn.Identity()
        self.mid2 = ResBlock(c, c, emb_dim, cfg.dropout)
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(cfg.ch_mult))):
            level = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.append(ResBlock(c + skips.pop(), ch * m, emb_dim, cfg.dropout))
                c = ch * m
            if i > 0:
                level.append(nn.Upsample(scale_factor=2, mode="nearest"))
                level.append(nn.Conv2d(c, c, 3, padding=1))
            self.up.append(level)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, c_img, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.register_buffer("alpha_bar", cosine_alpha_bar(cfg.timesteps).float(), persistent=False)

    # ------------------------------------------------------------------ the denoiser
    def upsample(self, low: torch.Tensor) -> torch.Tensor:
        """The conditioning image at high resolution (bicubic), the baseline the refiner improves on."""
        if self.cfg.scale == 1:
            return low
        return F.interpolate(low, scale_factor=self.cfg.scale, mode="bicubic", align_corners=False).clamp(-1, 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x_t, cond [B, C, H, W] (cond = the upsampled low-res image); t [B] -> prediction [B, C, H, W]."""
        h, w = x_t.shape[-2:]
        if h % self.cfg.multiple or w % self.cfg.multiple:
            raise ValueError(f"refiner input {h}x{w} is not a multiple of {self.cfg.multiple} (model.net.ch_mult)")
        emb = self.emb(timestep_embedding(t, TIME_FREQS))
        x = self.conv_in(torch.cat([x_t, cond], dim=1))
        hs = [x]
        for level in self.down:
            for layer in level:
                x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
                hs.append(x)
        x = self.mid2(self.mid_attn(self.mid1(x, emb)), emb)
        for level in self.up:
            for layer in level:
                x = layer(torch.cat([x, hs.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(x)
        return self.conv_out(F.silu(self.norm_out(x)))

    # ------------------------------------------------------------------ diffusion
    def _coefs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ab = self.alpha_bar.to(t.device)[t].view(-1, 1, 1, 1)
        return ab.sqrt(), (1 - ab).sqrt()

    def target_of(self, cond: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What is diffused: the image, or its residual over the upsampled condition, / target_scale."""
        return ((x - cond) if self.cfg.residual else x) / self.cfg.target_scale

    def image_of(self, cond: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Inverse of `target_of`."""
        x = x0 * self.cfg.target_scale
        return x + cond if self.cfg.residual else x

    def loss(self, x: torch.Tensor, low: torch.Tensor, generator: Optional[torch.Generator] = None,
             t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Denoising loss (mean squared error of the v / eps prediction) at uniform random steps."""
        cond = self.upsample(low)
        x0 = self.target_of(cond, x)
        if t is None:
            t = torch.randint(0, self.cfg.timesteps, (x.shape[0],), generator=generator, device=x.device)
        noise = torch.randn(x0.shape, generator=generator, device=x.device, dtype=x0.dtype)
        a, s = self._coefs(t)
        x_t = a * x0 + s * noise
        target = a * noise - s * x0 if self.cfg.prediction == "v" else noise
        return F.mse_loss(self(x_t, t, cond), target)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by the network's prediction at (x_t, t)."""
        a, s = self._coefs(t)
        out = self(x_t, t, cond)
        if self.cfg.prediction == "v":
            x0, eps = a * x_t - s * out, s * x_t + a * out
        else:
            x0, eps = (x_t - s * out) / a, out
        return x0, eps

    @torch.no_grad()
    def sample(self, low: torch.Tensor, steps: int = 25, eta: float = 0.0,
               generator: Optional[torch.Generator] = None, clip: bool = True) -> torch.Tensor:
        """DDIM sampling of the high-resolution image [B, C, sH, sW] for low-res images [B, C, H, W].

        steps: denoising steps (evenly spaced over the schedule). eta: 0 = deterministic DDIM,
        1 = DDPM-like ancestral noise. clip: clamp each x0 estimate to the valid range.
        """
        if steps < 1:
            raise ValueError(f"refiner sampling steps must be >= 1, got {steps}")
        cond = self.upsample(low)
        T = self.cfg.timesteps
        ts = torch.linspace(T - 1, 0, min(steps, T), device=low.device).round().long().unique_consecutive()
        x = torch.randn(cond.shape, generator=generator, device=low.device, dtype=cond.dtype)
        bound = (2.0 if self.cfg.residual else 1.0) / self.cfg.target_scale
        for i, t in enumerate(ts):
            tb = t.expand(x.shape[0])
            x0, eps = self.predict_x0(x, tb, cond)
            if clip:
                x0 = x0.clamp(-bound, bound)
                a, s = self._coefs(tb)
                eps = (x - a * x0) / s
            if i == len(ts) - 1:
                x = x0
                break
            ab_t = self.alpha_bar[t].to(x.dtype)
            ab_n = self.alpha_bar[ts[i + 1]].to(x.dtype)
            sigma = eta * ((1 - ab_n) / (1 - ab_t) * (1 - ab_t / ab_n)).clamp_min(0).sqrt()
            x = ab_n.sqrt() * x0 + (1 - ab_n - sigma ** 2).clamp_min(0).sqrt() * eps
            if eta > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.image_of(cond, x).clamp(-1, 1)


def load_refiner(path: str, map_location: str = "cpu") -> Refiner:
    """A frozen, eval-mode refiner from a training checkpoint (train.py) of `lit_modules/refiner.py`."""
    from models.io import load_checkpoint

    return refiner_from_checkpoint(load_checkpoint(path, map_location=map_location, what="refiner checkpoint"), path)


def refiner_from_checkpoint(ckpt: dict, path: str = "the checkpoint") -> Refiner:
    """`load_refiner` for a checkpoint already read (its hyper-parameters are needed too)."""
    if "refiner" not in ckpt:
        raise ValueError(f"{path} is not a refiner checkpoint (no 'refiner' entry; train one with "
                         "`python train.py experiment=ernie5_refiner`)")
    net = Refiner(RefinerConfig.from_dict(dict(ckpt["refiner"]["config"])))
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)
