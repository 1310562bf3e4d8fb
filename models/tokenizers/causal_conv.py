"""Causal 3D convolutional encoder/decoder for the visual tokenizer, and its 2D (image) twin.

Shapes: B batch, C channels, T frames, H/W height/width. Video tensors are [B, C, T, H, W].

Causality rules, relied on by the tests and by chunked encoding:
- every temporal convolution pads only in the past, with zeros, so output frame t depends on input
  frames <= t;
- normalisation is per frame (GroupNorm over C, H, W of one frame): no statistic mixes frames;
- a temporal stride-s layer maps 1 + s*n frames to 1 + n: its first output sees only frame 0
  ("the first frame is encoded on its own"), so an image is a 1-frame video;
- every temporal layer can stream: given a `cache` dict it reads the frames it needs from the
  previous chunk there and writes its own tail back, so encoding chunk by chunk (a first chunk of
  1 + tau*a frames, then multiples of tau) equals encoding the whole clip.

Layers that exist only in 3D (temporal down/upsampling) start as the identity on a single frame, and
a 2D kernel inflated into the temporally last slice of a 3D kernel reproduces the 2D layer on a
1-frame input; together these make an inflated 2D tokenizer exactly the image tokenizer on images.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CausalConv3d",
    "Decoder",
    "Encoder",
    "FrameGroupNorm",
    "per_frame_start_",
    "inflate_state_dict",
]

Cache = Optional[dict]


def _frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _batch_to_frames(x: torch.Tensor, b: int) -> torch.Tensor:
    bt, c, h, w = x.shape
    return x.reshape(b, bt // b, c, h, w).transpose(1, 2)


class CausalConv3d(nn.Module):
    """3D convolution, zero-padded in the past only, optionally strided in time; can stream.

    `forward(x, cache)`: with a cache dict, the previous chunk's last input frames (stored under
    this module) replace the zero padding, and this chunk's tail is stored for the next one.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, time_kernel: int | None = None,
                 stride: int = 1, time_stride: int = 1) -> None:
        super().__init__()
        kt = kernel if time_kernel is None else time_kernel
        if kt < time_stride:
            raise ValueError(f"time kernel {kt} must be >= time stride {time_stride}")
        self.kt, self.time_stride = kt, time_stride
        self.conv = nn.Conv3d(c_in, c_out, (kt, kernel, kernel), stride=(time_stride, stride, stride),
                              padding=(0, kernel // 2, kernel // 2))

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        keep = self.kt - self.time_stride  # past frames the next chunk needs
        prev = None if cache is None else cache.get(self)
        if prev is None:
            pad = x.new_zeros(x.shape[0], x.shape[1], self.kt - 1, *x.shape[3:])
            xp = torch.cat([pad, x], dim=2)
        else:
            xp = torch.cat([prev, x], dim=2)
        if cache is not None:
            cache[self] = xp[:, :, xp.shape[2] - keep:] if keep > 0 else xp[:, :, :0]
        return self.conv(xp)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm applied to each frame on its own (never a statistic over time)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return super().forward(x)
        return _batch_to_frames(super().forward(_frames_to_batch(x)), x.shape[0])


def _groups(c: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if c % g == 0 and c // g >= 2 or g == 1:
            return g
    return 1


def _conv(dims: int, c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Module:
    if dims == 3:
        return CausalConv3d(c_in, c_out, kernel, stride=stride)
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)


def _apply(layer: nn.Module, x: torch.Tensor, cache: Cache) -> torch.Tensor:
    if isinstance(layer, (CausalConv3d, ResBlock, Downsample, Upsample)):
        return layer(x, cache)
    return layer(x)


class ResBlock(nn.Module):
    """Pre-norm residual block: norm, SiLU, conv, norm, SiLU, conv (+ 1x1 skip if channels change)."""

    def __init__(self, dims: int, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(_groups(c_in), c_in)
        self.conv1 = _conv(dims, c_in, c_out)
        self.norm2 = FrameGroupNorm(_groups(c_out), c_out)
        self.conv2 = _conv(dims, c_out, c_out)
        self.skip = _conv(dims, c_in, c_out, kernel=1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        h = _apply(self.conv1, F.silu(self.norm1(x)), cache)
        h = _apply(self.conv2, F.silu(self.norm2(h)), cache)
        skip = x if self.skip is None else _apply(self.skip, x, cache)
        return skip + h


def _dirac_last_slice_(conv: nn.Conv3d, out_offset: int = 0) -> None:
    """Make `conv` the identity on a single frame: last temporal slice = Dirac, bias = 0.

    Earlier temporal slices keep their fresh random values (they only ever see past frames).
    """
    c = conv.in_channels
    with torch.no_grad():
        w = conv.weight
        w[out_offset:out_offset + c, :, -1].zero_()
        kh, kw = w.shape[-2] // 2, w.shape[-1] // 2
        idx = torch.arange(c)
        w[out_offset + idx, idx, -1, kh, kw] = 1.0
        if conv.bias is not None:
            conv.bias[out_offset:out_offset + c].zero_()


class TimeDownsample(nn.Module):
    """Causal temporal stride-2 convolution: 1 + 2n frames -> 1 + n (frame 0 on its own)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(c, c, kernel=3, time_kernel=3, time_stride=2)
        _dirac_last_slice_(self.conv.conv)

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        return self.conv(x, cache)


class TimeUpsample(nn.Module):
    """Causal temporal x2: each latent frame becomes 2 frames, except the very first, which stays 1.

    A causal convolution predicts 2C channels per frame, split into 2 consecutive frames; the first
    frame of a clip (no cache, or a cache that has not started) keeps only the second of them.
    """

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(c, 2 * c, kernel=3)
        _dirac_last_slice_(self.conv.conv, out_offset=c)

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        first = cache is None or not cache.get((self, "started"), False)
        if cache is not None:
            cache[(self, "started")] = True
        b, c, t, h, w = x.shape
        y = self.conv(x, cache).reshape(b, 2, c, t, h, w)
        y = y.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)  # frame j -> (2j, 2j+1)
        return y[:, :, 1:] if first else y


class Downsample(nn.Module):
    """Spatial stride 2, then (3D, if `time`) causal temporal stride 2.

    The temporal layer lives inside this module so that 2D and 3D parameter names line up for inflation.
    """

    def __init__(self, c: int, time: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.time = TimeDownsample(c) if time else None

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        x = self.conv(x) if x.dim() == 4 else _batch_to_frames(self.conv(_frames_to_batch(x)), x.shape[0])
        return x if self.time is None else self.time(x, cache)


class Upsample(nn.Module):
    """(3D, if `time`) causal temporal x2, then nearest spatial x2 and a 3x3 convolution."""

    def __init__(self, c: int, time: bool) -> None:
        super().__init__()
        self.time = TimeUpsample(c) if time else None
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        if self.time is not None:
            x = self.time(x, cache)
        flat = x if x.dim() == 4 else _frames_to_batch(x)
        out = self.conv(F.interpolate(flat, scale_factor=2.0, mode="nearest"))
        return out if x.dim() == 4 else _batch_to_frames(out, x.shape[0])


@torch.no_grad()
def per_frame_start_(net: nn.Module) -> dict[str, torch.Tensor]:
    """Turn a causal 3D network into a per-frame one, in place: every temporal kernel's past slices zero,
    temporal downsampling = keep the last frame of each pair, upsampling = repeat each latent frame.

    Returns {parameter name: gradient mask} (1 = may train) over the temporal weights: past slices,
    and the whole of each temporal resampler. An image stage (`VisualTokenizerModule.image_steps`)
    keeps them there, so the network stays exactly per-frame while it learns from single frames,
    the start inflation gives a 3D tokenizer (`inflate_state_dict`), reached without a 2D model.
    """
    resamplers = {}
    for m in net.modules():
        if isinstance(m, TimeUpsample):
            _dirac_last_slice_(m.conv.conv, out_offset=0)
            _dirac_last_slice_(m.conv.conv, out_offset=m.conv.conv.in_channels)
            resamplers[m.conv] = True
        elif isinstance(m, TimeDownsample):
            resamplers[m.conv] = True
    masks = {}
    names = {id(p): n for n, p in net.named_parameters()}
    for m in net.modules():
        if isinstance(m, CausalConv3d) and m.kt > 1:
            m.conv.weight[:, :, :-1].zero_()
            mask = torch.ones_like(m.conv.weight)
            mask[:, :, :-1] = 0
            if m in resamplers:
                mask.zero_()
                if m.conv.bias is not None:
                    masks[names[id(m.conv.bias)]] = torch.zeros_like(m.conv.bias)
            masks[names[id(m.conv.weight)]] = mask
    return masks


class Encoder(nn.Module):
    """Pixels [B, 3, (T,) H, W] -> latent [B, z, (T',) H/2^L, W/2^L], T' = 1 + (T-1)/time_stride.

    ch_mult: channel multiplier per level; each level but the last halves the resolution.
    time_downsample: per down-step, whether it also halves time (3D only).
    """

    def __init__(self, dims: int, in_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 z_channels: int, time_downsample: tuple[bool, ...]) -> None:
        super().__init__()
        self.dims = dims
        self.conv_in = _conv(dims, in_channels, ch)
        layers: list[nn.Module] = []
        c = ch
        for i, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(dims, c, ch * m))
                c = ch * m
            if i < len(ch_mult) - 1:
                layers.append(Downsample(c, time=dims == 3 and time_downsample[i]))
        layers += [ResBlock(dims, c, c)]
        self.layers = nn.ModuleList(layers)
        self.norm_out = FrameGroupNorm(_groups(c), c)
        self.conv_out = _conv(dims, c, z_channels)

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        h = _apply(self.conv_in, x, cache)
        for layer in self.layers:
            h = _apply(layer, h, cache)
        return _apply(self.conv_out, F.silu(self.norm_out(h)), cache)


class Decoder(nn.Module):
    """Latent [B, z, (T',) h, w] -> pixels [B, 3, (T,) h*2^L, w*2^L]; mirror of `Encoder`."""

    def __init__(self, dims: int, out_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 z_channels: int, time_downsample: tuple[bool, ...]) -> None:
        super().__init__()
        self.dims = dims
        c = ch * ch_mult[-1]
        self.conv_in = _conv(dims, z_channels, c)
        layers: list[nn.Module] = [ResBlock(dims, c, c)]
        for i in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(dims, c, ch * ch_mult[i]))
                c = ch * ch_mult[i]
            if i > 0:
                layers.append(Upsample(c, time=dims == 3 and time_downsample[i - 1]))
        self.layers = nn.ModuleList(layers)
        self.norm_out = FrameGroupNorm(_groups(c), c)
        self.conv_out = _conv(dims, c, out_channels)

    def forward(self, z: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        h = _apply(self.conv_in, z, cache)
        for layer in self.layers:
            h = _apply(layer, h, cache)
        return _apply(self.conv_out, F.silu(self.norm_out(h)), cache)


def inflate_state_dict(state_2d: dict[str, torch.Tensor], state_3d: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Inflate a 2D tokenizer's weights into a 3D tokenizer's state dict.

    A 4D kernel [O, I, kh, kw] goes into the temporally LAST slice of the matching 5D kernel
    [O, I, kt, kh, kw] (the slice a frame's own pixels meet under causal padding); the earlier
    slices keep the 3D model's fresh values. Every other tensor is copied as is. Returns the new
    state dict and the 3D keys that had no 2D counterpart (left freshly initialised).
    """
    out = dict(state_3d)
    mapped: set[str] = set()
    for key3, v3 in state_3d.items():
        # CausalConv3d wraps its nn.Conv3d as `.conv`; the 2D twin is a bare nn.Conv2d.
        candidates = [key3]
        if ".conv.weight" in key3 or ".conv.bias" in key3:
            candidates.append(key3.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias"))
        for key2 in candidates:
            if key2 not in state_2d:
                continue
            v2 = state_2d[key2]
            if v3.dim() == 5 and v2.dim() == 4:
                if v3.shape[:2] != v2.shape[:2] or v3.shape[3:] != v2.shape[2:]:
                    raise ValueError(f"cannot inflate {key2} {tuple(v2.shape)} into {key3} {tuple(v3.shape)}")
                new = v3.clone()
                new[:, :, -1] = v2
                out[key3] = new
            elif v3.shape == v2.shape:
                out[key3] = v2.clone()
            else:
                raise ValueError(f"shape mismatch inflating {key2} {tuple(v2.shape)} into {key3} {tuple(v3.shape)}")
            mapped.add(key3)
            break
    fresh = sorted(k for k in state_3d if k not in mapped)
    return out, fresh
