"""Audio tokenizers: a mel-spectrogram residual-VQ codec, and 8-bit mu-law as an invertible baseline.

Shapes: B batch, L samples, M mel bins, S mel frames, F token frames (S / downsample), Q codebook
levels, D latent dim.

    wave [B, L] -> log-mel [B, M, S] (torchaudio) -> conv encoder -> latent [B, F, D]
        -> residual VQ: codes [B, F, Q]      (the Q levels of one frame are the "group" that an AR
                                              model such as ERNIE 5.0 predicts together)
        -> conv decoder -> log-mel [B, M, S] -> wave by torchaudio's Griffin-Lim (to listen to)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from models.config import config_from_dict, fill_preset

from models.tokenizers.vq import ResidualVQ

__all__ = ["AUDIO_PRESETS", "AudioTokenizer", "AudioTokenizerConfig", "MuLawTokenizer"]


class MuLawTokenizer:
    """8-bit (by default) mu-law companding: one token per sample, trivially invertible."""

    def __init__(self, bits: int = 8) -> None:
        if not 1 <= bits <= 16:
            raise ValueError(f"mu-law bits must be in [1, 16], got {bits}")
        self.bits = bits

    @property
    def vocab_size(self) -> int:
        return 2 ** self.bits

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        return torchaudio.functional.mu_law_encoding(wave.clamp(-1, 1), self.vocab_size).long()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return torchaudio.functional.mu_law_decoding(tokens, self.vocab_size)


AUDIO_PRESETS: dict[str, dict] = {
    "tiny": dict(channels=32, num_res_blocks=1, latent_dim=16, num_quantizers=2, codebook_size=64),
    "small": dict(channels=96, num_res_blocks=2, latent_dim=32, num_quantizers=4, codebook_size=256),
}


@dataclass
class AudioTokenizerConfig:
    """Mel residual-VQ codec. Fields left `None` come from `preset`.

    downsample: mel frames per token frame (a power of 2); tokens/s = sample_rate / hop / downsample.
    log_mel_mean / log_mel_std: fixed normalisation of log(mel + 1e-5) (fixed, so it inverts exactly).
    """

    preset: str = "tiny"
    sample_rate: int = 16000
    n_fft: int = 512
    hop_length: int = 160
    n_mels: int = 64
    channels: Optional[int] = None
    num_res_blocks: Optional[int] = None
    latent_dim: Optional[int] = None
    downsample: int = 2
    num_quantizers: Optional[int] = None
    codebook_size: Optional[int] = None
    ema: bool = True
    log_mel_mean: float = -5.0
    log_mel_std: float = 4.0
    griffin_lim_iters: int = 32

    def __post_init__(self) -> None:
        fill_preset(self, AUDIO_PRESETS)
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ValueError(f"model.net.downsample must be a power of 2, got {self.downsample}")
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels", "channels", "latent_dim", "num_quantizers",
                     "codebook_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.net.{name} must be >= 1, got {getattr(self, name)}")
        if self.codebook_size < 2:
            raise ValueError(f"model.net.codebook_size must be >= 2, got {self.codebook_size}")
        if self.log_mel_std <= 0:
            raise ValueError(f"model.net.log_mel_std must be > 0, got {self.log_mel_std}")

    @property
    def codes_per_second(self) -> float:
        return self.sample_rate / self.hop_length / self.downsample

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AudioTokenizerConfig":
        return config_from_dict(cls, d)


class _Res1d(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.GroupNorm(1, c), nn.SiLU(), nn.Conv1d(c, c, 3, padding=1),
                                 nn.GroupNorm(1, c), nn.SiLU(), nn.Conv1d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class AudioTokenizer(nn.Module):
    """log-mel -> conv encoder -> residual VQ -> conv decoder -> log-mel (-> Griffin-Lim waveform)."""

    def __init__(self, cfg: AudioTokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate=cfg.sample_rate, n_fft=cfg.n_fft,
                                                        hop_length=cfg.hop_length, n_mels=cfg.n_mels, power=2.0)
        steps = cfg.downsample.bit_length() - 1
        enc: list[nn.Module] = [nn.Conv1d(cfg.n_mels, c, 3, padding=1)]
        for _ in range(steps):
            enc += [_Res1d(c) for _ in range(cfg.num_res_blocks)] + [nn.Conv1d(c, c, 4, stride=2, padding=1)]
        enc += [_Res1d(c) for _ in range(cfg.num_res_blocks)] + [nn.GroupNorm(1, c), nn.SiLU(),
                                                                 nn.Conv1d(c, cfg.latent_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv1d(cfg.latent_dim, c, 3, padding=1)]
        for _ in range(steps):
            dec += [_Res1d(c) for _ in range(cfg.num_res_blocks)] + [nn.ConvTranspose1d(c, c, 4, stride=2, padding=1)]
        dec += [_Res1d(c) for _ in range(cfg.num_res_blocks)] + [nn.GroupNorm(1, c), nn.SiLU(),
                                                                 nn.Conv1d(c, cfg.n_mels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.rvq = ResidualVQ(cfg.num_quantizers, cfg.codebook_size, cfg.latent_dim, l2_normalize=False,
                              ema=cfg.ema, commitment_weight=0.25)
        # Griffin-Lim is built on first use and kept in a plain list, never as a submodule: its buffers
        # would otherwise appear in state_dict only after the first mel_to_wave call, and checkpoints
        # saved after one (e.g. TensorBoard audio at validation end) would not load into a fresh model.
        self._inverse: list[nn.Module] = []

    @property
    def codes_per_second(self) -> float:
        return self.cfg.codes_per_second

    @property
    def vocab_size(self) -> int:
        """Codes per level (each of the Q levels has its own codebook of this size)."""
        return self.cfg.codebook_size

    # -- mel <-> normalised log-mel --------------------------------------------------------------
    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel [B, M, S], S padded up to a multiple of `downsample`."""
        mel = self.mel(wave.float())
        x = (torch.log(mel + 1e-5) - self.cfg.log_mel_mean) / self.cfg.log_mel_std
        pad = (-x.shape[-1]) % self.cfg.downsample
        return F.pad(x, (0, pad), mode="replicate") if pad else x

    def mel_to_wave(self, log_mel: torch.Tensor, num_samples: Optional[int] = None) -> torch.Tensor:
        """Waveform [B, L'] from a normalised log-mel by inverse mel scale + Griffin-Lim."""
        if not self._inverse or next(self._inverse[0].buffers()).device != log_mel.device:
            cfg = self.cfg
            self._inverse[:] = [nn.Sequential(
                torchaudio.transforms.InverseMelScale(n_stft=cfg.n_fft // 2 + 1, n_mels=cfg.n_mels,
                                                      sample_rate=cfg.sample_rate),
                torchaudio.transforms.GriffinLim(n_fft=cfg.n_fft, hop_length=cfg.hop_length, power=2.0,
                                                 n_iter=cfg.griffin_lim_iters),
            ).to(log_mel.device)]
        power = torch.exp(log_mel.float() * self.cfg.log_mel_std + self.cfg.log_mel_mean) - 1e-5
        wave = self._inverse[0](power.clamp_min(0))
        if num_samples is not None:
            wave = F.pad(wave, (0, max(0, num_samples - wave.shape[-1])))[..., :num_samples]
        return wave

    # -- codec ------------------------------------------------------------------------------------
    def forward(self, wave: torch.Tensor) -> dict:
        mel = self.log_mel(wave)
        z = self.encoder(mel).transpose(1, 2)  # [B, F, D]
        q = self.rvq(z)
        mel_hat = self.decoder(q.quantized.transpose(1, 2))
        return {"mel": mel, "mel_hat": mel_hat, "codes": q.indices, "vq_loss": q.loss,
                "perplexity": q.perplexity, "usage": q.usage, "latent": z}

    def first_level(self, latent: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Level 1's quantized vectors [B, F, D] with the straight-through gradient to the encoder's
        `latent` [B, F, D]: what a semantic loss on the first code trains (papers.md 4.3)."""
        q1 = self.rvq.levels[0].lookup(codes[..., 0])
        return latent + (q1 - latent).detach()

    @torch.no_grad()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """Codes [B, F, Q], int64 in [0, codebook_size)."""
        return self.rvq.encode(self.encoder(self.log_mel(wave)).transpose(1, 2))

    def decode(self, codes: torch.Tensor, num_levels: Optional[int] = None) -> torch.Tensor:
        """Normalised log-mel [B, M, S] from codes (optionally only the first `num_levels` levels)."""
        return self.decoder(self.rvq.decode(codes, num_levels).transpose(1, 2))

    @torch.no_grad()
    def decode_wave(self, codes: torch.Tensor, num_samples: Optional[int] = None) -> torch.Tensor:
        return self.mel_to_wave(self.decode(codes), num_samples)
