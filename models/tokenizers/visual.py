"""The visual tokenizer: causal 3D (video) or 2D (image) conv autoencoder + multi-scale residual quantizer.

Shapes: B batch, T pixel frames, T' latent frames (= 1 + (T - 1) / time_stride), d code dim,
K scales. Videos are [B, 3, T, H, W] in [-1, 1]; an image [B, 3, H, W] is a 1-frame video.

Tokens are a list over scales k of [B, T', h_k, w_k, d] uint8 bits (bitwise) or [B, T', h_k, w_k]
indices (VQ): quantization runs on each latent frame on its own (temporal-independent), so frame t's
tokens never depend on later frames.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from models.config import config_from_dict, fill_preset

from models.tokenizers.causal_conv import Decoder, Encoder, inflate_state_dict
from models.tokenizers.multiscale import MultiScaleQuantizer, QuantizerConfig, flip_bits, parse_scales

__all__ = ["PRESETS", "TokenizerConfig", "VisualTokenizer", "inflate_2d_to_3d"]

# Named sizes. `tiny` is for tests; `small` trains on CPU in minutes on 32x32 clips (8x8 latent);
# `base` is the paper's shape: 16x spatial, 4x temporal compression.
PRESETS: dict[str, dict] = {
    "tiny": dict(ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, time_stride=2, dim=8, scales=[1, 2, 4]),
    "small": dict(ch=16, ch_mult=[1, 2, 4], num_res_blocks=1, time_stride=4, dim=16, scales=[1, 2, 4, 6, 8]),
    "base": dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, time_stride=4, dim=32,
                 scales=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16]),
}


@dataclass
class TokenizerConfig:
    """Architecture of the visual tokenizer. Fields left `None` come from `preset`.

    video: True = causal 3D (frames), False = 2D image tokenizer (inflatable into the 3D one).
    time_stride: temporal compression tau (a power of 2, 3D only): 1 + tau*n frames -> 1 + n latents.
    dim: code channels: bits per token (bitwise) or the codebook vector size (VQ).
    scales: token-map sizes per latent frame (coarse to fine); the last equals the latent grid.
    """

    preset: str = "tiny"
    video: bool = True
    in_channels: int = 3
    ch: Optional[int] = None
    ch_mult: Optional[list] = None
    num_res_blocks: Optional[int] = None
    time_stride: Optional[int] = None
    dim: Optional[int] = None
    scales: Optional[list] = None
    quantizer: str = "bits"          # bits | vq
    codebook_size: int = 1024
    vq_l2_normalize: bool = False
    vq_ema: bool = True
    phi: str = "shared"
    entropy_temperature: float = 0.25

    def __post_init__(self) -> None:
        fill_preset(self, PRESETS)
        self.ch_mult = [int(m) for m in self.ch_mult]
        if len(self.ch_mult) < 1 or min(self.ch_mult) < 1:
            raise ValueError(f"model.net.ch_mult must be a non-empty list of positive ints, got {self.ch_mult}")
        steps = len(self.ch_mult) - 1
        ts = int(self.time_stride)
        if ts < 1 or ts & (ts - 1) or ts > 2 ** steps:
            raise ValueError(f"model.net.time_stride must be a power of 2 <= 2^(len(ch_mult)-1) = {2 ** steps}, got {ts}")
        if not self.video:
            self.time_stride = 1
        try:
            self.scales = [list(hw) for hw in parse_scales(self.scales)]
        except ValueError as e:
            raise ValueError(f"model.net.scales: {e}") from e
        self.quantizer_config()  # validates the quantizer fields

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def time_downsample(self) -> tuple[bool, ...]:
        """Which down-steps halve time: the first log2(tau) (early, where frames are most expensive)."""
        n = int(self.time_stride).bit_length() - 1
        return tuple(i < n for i in range(len(self.ch_mult) - 1))

    def quantizer_config(self) -> QuantizerConfig:
        try:
            return QuantizerConfig(dim=self.dim, scales=self.scales, kind=self.quantizer,
                                   codebook_size=self.codebook_size, vq_l2_normalize=self.vq_l2_normalize,
                                   vq_ema=self.vq_ema, phi=self.phi, entropy_temperature=self.entropy_temperature)
        except ValueError as e:
            raise ValueError(f"model.net: {e}") from e

    def latent_frames(self, num_frames: int) -> int:
        if (num_frames - 1) % self.time_stride:
            raise ValueError(f"a clip of {num_frames} frames is not 1 + k * time_stride ({self.time_stride})")
        return 1 + (num_frames - 1) // self.time_stride

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerConfig":
        return config_from_dict(cls, d)


class VisualTokenizer(nn.Module):
    """Encoder -> per-latent-frame multi-scale quantizer -> decoder."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dims = 3 if cfg.video else 2
        args = (cfg.ch, tuple(cfg.ch_mult), cfg.num_res_blocks, cfg.dim, cfg.time_downsample)
        self.encoder = Encoder(dims, cfg.in_channels, *args)
        self.decoder = Decoder(dims, cfg.in_channels, *args)
        self.quantizer = MultiScaleQuantizer(cfg.quantizer_config())

    @property
    def scales(self) -> list[tuple[int, int]]:
        return self.quantizer.scales

    @property
    def bitwise(self) -> bool:
        return self.quantizer.bitwise

    def set_scales(self, scales) -> None:
        """Use another scale schedule (e.g. for another resolution), of at most as many scales as trained.

        Scale k keeps its learned code magnitude (and per-scale phi); only the grid sizes change, so a
        tokenizer trained with (1, 2, 4, 6, 8) on 32x32 frames can tokenize 16x16 frames with (1, 2, 3, 4).
        """
        new = parse_scales(scales)
        trained = len(self.cfg.scales)
        if len(new) > trained:
            raise ValueError(f"{len(new)} scales requested, the tokenizer was trained with {trained}")
        self.quantizer.scales = list(new)

    # -- shape plumbing: latent [B, d, T', H, W] <-> per-frame maps [B*T', d, H, W] -----------------

    def _as_video(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if x.dim() == 4:
            return x.unsqueeze(2), True
        if x.dim() != 5:
            raise ValueError(f"expected an image [B, C, H, W] or a video [B, C, T, H, W], got {tuple(x.shape)}")
        return x, False

    @staticmethod
    def _frames(z: torch.Tensor) -> torch.Tensor:
        b, d, t, h, w = z.shape
        return z.transpose(1, 2).reshape(b * t, d, h, w)

    @staticmethod
    def _unframes(f: torch.Tensor, b: int) -> torch.Tensor:
        n, d, h, w = f.shape
        return f.reshape(b, n // b, d, h, w).transpose(1, 2)

    # -- encoder / decoder -----------------------------------------------------------------------

    def encode_features(self, video: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        """Continuous latent [B, d, T', H', W'] (images: T' = 1). `cache` streams chunks (3D only)."""
        x, _ = self._as_video(video)
        if not self.cfg.video:
            if x.shape[2] != 1:
                raise ValueError("the 2D image tokenizer takes images or 1-frame videos")
            return self.encoder(x[:, :, 0]).unsqueeze(2)
        if cache is None:
            self.cfg.latent_frames(x.shape[2])
        return self.encoder(x, cache)

    def decode_features(self, z: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        """Latent [B, d, T', H', W'] -> video [B, 3, T, H, W]."""
        if not self.cfg.video:
            return self._unframes(self.decoder(self._frames(z)), z.shape[0])
        return self.decoder(z, cache)

    # -- tokens --------------------------------------------------------------------------------------

    def forward(self, video: torch.Tensor, num_scales: Optional[int] = None) -> dict:
        """Training pass: reconstruction (same rank as the input) plus quantizer losses and stats."""
        x, was_image = self._as_video(video)
        z = self.encode_features(x)
        b = z.shape[0]
        q = self.quantizer(self._frames(z), num_scales)
        recon = self.decode_features(self._unframes(q["f_hat"], b))
        if was_image:
            recon = recon[:, :, 0]
        q["recon"] = recon
        q["tokens"] = [t.reshape(b, -1, *t.shape[1:]) for t in q["tokens"]]
        return q

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> list[torch.Tensor]:
        """Tokens per scale: [B, T', h_k, w_k, d] bits (or [B, T', h_k, w_k] indices)."""
        return self.features_to_tokens(self.encode_features(video))

    @torch.no_grad()
    def features_to_tokens(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Quantize a continuous latent [B, d, T', H', W'] frame by frame into tokens per scale."""
        b = z.shape[0]
        return [t.reshape(b, -1, *t.shape[1:]) for t in self.quantizer.encode(self._frames(z))]

    def tokens_to_features(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Quantized latent [B, d, T', H', W'] from (a prefix of the scales of) the tokens."""
        b = tokens[0].shape[0]
        flat = [t.reshape(-1, *t.shape[2:]) for t in tokens]
        return self._unframes(self.quantizer.decode(flat), b)

    @torch.no_grad()
    def decode(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Video [B, 3, T, H, W] from tokens; passing only the first k scales gives a coarser video."""
        return self.decode_features(self.tokens_to_features(tokens))

    @torch.no_grad()
    def encode_chunked(self, video: torch.Tensor, chunk_latents: int = 1) -> list[torch.Tensor]:
        """Tokens of a long clip encoded chunk by chunk through the causal cache (equals `encode`).

        The first chunk is frame 0 plus `(chunk_latents - 1) * tau` frames; later chunks are
        `chunk_latents * tau` frames.
        """
        if not self.cfg.video:
            return self.encode(video)
        tau = self.cfg.time_stride
        self.cfg.latent_frames(video.shape[2])
        cache: dict = {}
        feats = []
        start, size = 0, 1 + (chunk_latents - 1) * tau
        while start < video.shape[2]:
            feats.append(self.encoder(video[:, :, start:start + size], cache))
            start, size = start + size, chunk_latents * tau
        return self.features_to_tokens(torch.cat(feats, dim=2))

    def flip(self, bits: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Bitwise self-correction's corruption: flip each bit with probability p."""
        return flip_bits(bits, p, generator)


def inflate_2d_to_3d(image_tokenizer: VisualTokenizer, video_cfg: TokenizerConfig) -> tuple[VisualTokenizer, list[str]]:
    """A 3D tokenizer initialised from a trained 2D one (MAGVIT-v2 / VideoAR inflation).

    2D kernels go to the temporally last slice of the 3D kernels; earlier slices and the temporal
    down/upsampling layers keep their fresh initialisation (the latter are the identity on one frame).
    Returns the video tokenizer and the names of the freshly initialised tensors.
    """
    if image_tokenizer.cfg.video:
        raise ValueError("inflate_2d_to_3d expects a 2D (video=false) tokenizer")
    if not video_cfg.video:
        raise ValueError("inflate_2d_to_3d needs a video=true target config")
    video = VisualTokenizer(video_cfg)
    state, fresh = inflate_state_dict(image_tokenizer.state_dict(), video.state_dict())
    video.load_state_dict(state)
    return video, fresh
