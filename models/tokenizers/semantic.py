"""Semantic teachers for the audio tokenizer's first RVQ level (papers.md 4.3).

ERNIE 5.0's codec distils its first code from Whisper encoder outputs, average-pooled to the codec's
frame rate, so that level 1 carries linguistic / phonetic content and the later levels the residual
acoustics. A teacher maps waveforms [B, L] to frame features [B, T, D]; `pool_to(features, F)` averages
them onto the codec's F frames. Two teachers load from a path (`load_teacher`):

- a Hugging Face Whisper checkpoint directory (`config.json` with `model_type: whisper`): its encoder on
  the feature extractor's log-mel (padded to Whisper's 30 s window; only the frames of the clip are
  kept, 50 per second). Needs `transformers`, and the weights on local disk (nothing is downloaded).
- an `AudioFrameClassifier` checkpoint written by this project (`experiment=audio_teacher`): a small
  convolutional net over log-mel frames, trained to name the sound class of every frame of the embedded
  synthetic audio. Offline there is no Whisper, so this is the runnable stand-in: the semantics it
  distils are the synthetic sounds' class, where Whisper's are speech.

Pure PyTorch (no Lightning); a teacher is frozen and in eval mode.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from models.config import config_from_dict

__all__ = ["AudioFrameClassifier", "FrameClassifierConfig", "WhisperTeacher", "load_teacher", "pool_to"]


def pool_to(features: torch.Tensor, frames: int) -> torch.Tensor:
    """Average features [B, T, D] over time onto `frames` frames (adaptive average pooling)."""
    return F.adaptive_avg_pool1d(features.transpose(1, 2), frames).transpose(1, 2)


@dataclass
class FrameClassifierConfig:
    """The frame classifier: log-mel (n_mels, hop_length) -> `layers` conv blocks of `channels` ->
    features of `dim` per mel frame -> `num_classes` logits."""

    sample_rate: int = 16000
    n_fft: int = 512
    hop_length: int = 160
    n_mels: int = 64
    channels: int = 64
    layers: int = 3
    dim: int = 64
    num_classes: int = 5

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels", "channels", "layers", "dim", "num_classes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.net.{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FrameClassifierConfig":
        return config_from_dict(cls, d)


class AudioFrameClassifier(nn.Module):
    """Waveform -> per-frame features [B, T, dim] (`features`) and class logits [B, T, classes]."""

    def __init__(self, cfg: FrameClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate=cfg.sample_rate, n_fft=cfg.n_fft,
                                                        hop_length=cfg.hop_length, n_mels=cfg.n_mels, power=2.0)
        layers: list[nn.Module] = []
        c = cfg.n_mels
        for _ in range(cfg.layers):
            layers += [nn.Conv1d(c, cfg.channels, 5, padding=2), nn.GroupNorm(1, cfg.channels), nn.SiLU()]
            c = cfg.channels
        layers.append(nn.Conv1d(c, cfg.dim, 1))
        self.net = nn.Sequential(*layers)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    @property
    def frame_rate(self) -> float:
        return self.cfg.sample_rate / self.cfg.hop_length

    @property
    def dim(self) -> int:
        return self.cfg.dim

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        x = torch.log(self.mel(wave.float()) + 1e-5)
        return self.net((x + 5.0) / 4.0).transpose(1, 2)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(wave))


class WhisperTeacher(nn.Module):
    """A Hugging Face Whisper encoder from a local directory, as a frame-feature teacher (50 frames / s)."""

    frame_rate = 50.0

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        try:
            from transformers import WhisperFeatureExtractor, WhisperModel
        except ImportError as e:  # an optional dependency: only this teacher needs it
            raise ImportError(f"the Whisper teacher {path} needs `transformers` (pip install transformers)") from e
        self.extractor = WhisperFeatureExtractor.from_pretrained(str(path), local_files_only=True)
        self.encoder = WhisperModel.from_pretrained(str(path), local_files_only=True).get_encoder()
        self.sample_rate = int(self.extractor.sampling_rate)
        self.dim = int(self.encoder.config.d_model)

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """Waveforms [B, L] at the extractor's rate -> encoder states [B, T, D], T = the clip's frames."""
        feats = self.extractor([w.float().cpu().numpy() for w in wave], sampling_rate=self.sample_rate,
                               return_tensors="pt").input_features.to(wave.device)
        hidden = self.encoder(feats).last_hidden_state
        keep = max(1, round(wave.shape[-1] / self.sample_rate * self.frame_rate))
        return hidden[:, :keep]


def load_teacher(path: str | Path, expect_rate: Optional[int] = None) -> nn.Module:
    """A frozen, eval-mode teacher from a Whisper directory or an `AudioFrameClassifier` checkpoint (a
    training checkpoint of `experiment=audio_teacher` or an export); `expect_rate` checks its sample rate."""
    p = Path(path)
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file() or json.loads(cfg.read_text()).get("model_type") != "whisper":
            raise ValueError(f"semantic teacher {p}: a directory must hold a Whisper checkpoint (config.json with "
                             "model_type whisper)")
        teacher: nn.Module = WhisperTeacher(p)
        rate = teacher.sample_rate
    else:
        from models.io import load_checkpoint

        blob = load_checkpoint(p, what="semantic teacher")
        info = blob.get("teacher")
        if not isinstance(info, dict) or info.get("kind") != "frame_classifier":
            raise ValueError(f"semantic teacher {p} is neither a Whisper directory nor an audio_teacher checkpoint")
        teacher = AudioFrameClassifier(FrameClassifierConfig.from_dict(info["config"]))
        state = blob["state_dict"]
        if set(state) != set(teacher.state_dict()):  # a Lightning checkpoint: the module holds it as `net`
            state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        teacher.load_state_dict(state)
        rate = teacher.cfg.sample_rate
    if expect_rate is not None and int(rate) != int(expect_rate):
        raise ValueError(f"semantic teacher {p} takes {rate} Hz audio, the tokenizer {expect_rate} Hz")
    return teacher.eval().requires_grad_(False)
