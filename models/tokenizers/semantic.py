"""Semantic teachers for the audio tokenizer's first RVQ level (papers.md 4.3) and for the visual
tokenizer's semantic branch (papers.md 4.2).

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

ERNIE 5.0's visual tokenizer adds "a semantic branch with a semantic regularization loss from a vision
foundation model". A visual teacher maps frames [B, 3, H, W] to a feature map [B, D, h, w]
(`feature_map`). Offline there is no pretrained vision model, so the runnable teacher is an
`ImageAttributeClassifier` (`experiment=visual_teacher`): a small convolutional net whose pooled feature
map names the main object's colour and shape and the background of the embedded moving-shapes frames
(one head per attribute). Its semantics are those few attributes, where a foundation model's are open.
A foundation model on local disk is a teacher too: a Hugging Face ViT, DINOv2, CLIP or SigLIP vision
encoder directory (`VisionFoundationTeacher`: its patch tokens on the patch grid; needs `transformers`).

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

__all__ = ["AttributeClassifierConfig", "AudioFrameClassifier", "FrameClassifierConfig", "ImageAttributeClassifier",
           "SemanticConfig", "VISION_MODEL_TYPES", "VisionFoundationTeacher", "WhisperTeacher", "load_teacher",
           "pool_to"]


@dataclass
class SemanticConfig:
    """A tokenizer's semantic distillation (`model.semantic`). teacher: a teacher path for `load_teacher`
    (null = no distillation; `auto` is filled by train.py's `requires`, which builds the family's teacher
    experiment). weight: of the 1 - cosine term."""

    teacher: Optional[str] = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"model.semantic.weight must be >= 0, got {self.weight}")
        if self.teacher == "auto":
            raise ValueError("model.semantic.teacher=auto is filled by train.py's `requires` (experiment="
                             "audio_teacher or visual_teacher); outside train.py give a teacher path, or null")


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


@dataclass
class AttributeClassifierConfig:
    """The image attribute classifier: `layers` 3x3 conv blocks of `channels` (the first `downsample` of them
    with stride 2) -> a `dim` feature map -> global average pool -> one linear head per attribute, of the
    sizes `heads` (e.g. colour 12, shape 3, background 5: `datamodules.captions.ATTRIBUTES`)."""

    in_channels: int = 3
    channels: int = 64
    layers: int = 4
    downsample: int = 2
    dim: int = 64
    heads: tuple = (12, 3, 5)
    head_names: tuple = ("colour", "shape", "background")

    def __post_init__(self) -> None:
        self.heads, self.head_names = tuple(int(h) for h in self.heads), tuple(str(n) for n in self.head_names)
        for name in ("in_channels", "channels", "layers", "dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.net.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.downsample <= self.layers:
            raise ValueError(f"model.net.downsample must be in [0, model.net.layers={self.layers}], got {self.downsample}")
        if not self.heads or min(self.heads) < 2 or len(self.heads) != len(self.head_names):
            raise ValueError(f"model.net.heads must be class counts >= 2, one per model.net.head_names, got "
                             f"{list(self.heads)} for {list(self.head_names)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {**d, "heads": list(self.heads), "head_names": list(self.head_names)}

    @classmethod
    def from_dict(cls, d: dict) -> "AttributeClassifierConfig":
        return config_from_dict(cls, d)


class ImageAttributeClassifier(nn.Module):
    """Images [B, 3, H, W] in [-1, 1] -> feature map [B, dim, H / 2^downsample, W / 2^downsample]
    (`feature_map`) and, pooled, one logit vector per attribute head (`forward`)."""

    def __init__(self, cfg: AttributeClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c = cfg.in_channels
        for i in range(cfg.layers):
            layers += [nn.Conv2d(c, cfg.channels, 3, stride=2 if i < cfg.downsample else 1, padding=1),
                       nn.GroupNorm(1, cfg.channels), nn.SiLU()]
            c = cfg.channels
        layers.append(nn.Conv2d(c, cfg.dim, 1))
        self.net = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(cfg.dim, n) for n in cfg.heads)

    @property
    def dim(self) -> int:
        return self.cfg.dim

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float())

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        pooled = self.feature_map(images).mean((2, 3))
        return [head(pooled) for head in self.heads]


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


# Hugging Face vision encoders whose last hidden state ends with one token per patch, row-major
VISION_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers", "clip", "clip_vision_model", "siglip",
                      "siglip_vision_model")


class VisionFoundationTeacher(nn.Module):
    """A Hugging Face vision encoder (ViT, DINOv2, CLIP or SigLIP vision tower) from a local directory, as
    the visual tokenizer's semantic teacher: frames [B, 3, H, W] in [-1, 1] are resized to the encoder's
    image size and normalised with its processor's mean / std (`preprocessor_config.json`; ImageNet's when
    absent); the feature map [B, D, h, w] is the last hidden state's patch tokens (the trailing h * w
    tokens, after any CLS and register tokens) on the patch grid. Nothing is downloaded."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        try:
            from transformers import AutoModel
        except ImportError as e:  # an optional dependency: only this teacher needs it
            raise ImportError(f"the vision teacher {path} needs `transformers` (pip install transformers)") from e
        path = Path(path)
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.encoder = getattr(model, "vision_model", model)  # CLIP / SigLIP: the vision tower
        cfg = self.encoder.config
        self.image_size, self.patch_size = int(cfg.image_size), int(cfg.patch_size)
        self.grid = self.image_size // self.patch_size
        self.dim = int(cfg.hidden_size)
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            spec = json.loads(pre.read_text())
            mean, std = spec.get("image_mean", mean), spec.get("image_std", std)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False, antialias=True)
        x = ((x + 1) / 2 - self.mean) / self.std
        hidden = self.encoder(pixel_values=x).last_hidden_state  # [B, (cls / registers +) grid^2, D]
        patches = hidden[:, -self.grid * self.grid:]
        return patches.transpose(1, 2).reshape(x.shape[0], self.dim, self.grid, self.grid)


def load_teacher(path: str | Path, expect_rate: Optional[int] = None) -> nn.Module:
    """A frozen, eval-mode teacher: a local Hugging Face directory (a Whisper checkpoint for the audio
    tokenizer, a vision encoder of `VISION_MODEL_TYPES` for the visual one), or an `AudioFrameClassifier` /
    `ImageAttributeClassifier` checkpoint (a training checkpoint of `experiment=audio_teacher` /
    `visual_teacher` or an export); `expect_rate` (audio) checks its sample rate."""
    p = Path(path)
    if p.is_dir():
        cfg = p / "config.json"
        model_type = json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
        if model_type == "whisper":
            teacher: nn.Module = WhisperTeacher(p)
            rate = teacher.sample_rate
        elif model_type in VISION_MODEL_TYPES:
            if expect_rate is not None:
                raise ValueError(f"semantic teacher {p} is a vision encoder ({model_type}); the audio tokenizer "
                                 "needs an audio one")
            return VisionFoundationTeacher(p).eval().requires_grad_(False)
        else:
            raise ValueError(f"semantic teacher {p}: a directory must hold a Whisper checkpoint or a vision encoder "
                             f"(config.json with model_type whisper or one of {', '.join(VISION_MODEL_TYPES)}), "
                             f"got model_type {model_type!r}")
    else:
        from models.io import load_checkpoint

        blob = load_checkpoint(p, what="semantic teacher")
        info = blob.get("teacher")
        kinds = {"frame_classifier": (AudioFrameClassifier, FrameClassifierConfig),
                 "attribute_classifier": (ImageAttributeClassifier, AttributeClassifierConfig)}
        if not isinstance(info, dict) or info.get("kind") not in kinds:
            raise ValueError(f"semantic teacher {p} is neither a Whisper directory nor an audio_teacher or "
                             "visual_teacher checkpoint")
        net_cls, cfg_cls = kinds[info["kind"]]
        teacher = net_cls(cfg_cls.from_dict(info["config"]))
        state = blob["state_dict"]
        if set(state) != set(teacher.state_dict()):  # a Lightning checkpoint: the module holds it as `net`
            state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        teacher.load_state_dict(state)
        rate = getattr(teacher.cfg, "sample_rate", None)
        if expect_rate is not None and rate is None:
            raise ValueError(f"semantic teacher {p} is a visual teacher; the audio tokenizer needs an audio one")
    if expect_rate is not None and int(rate) != int(expect_rate):
        raise ValueError(f"semantic teacher {p} takes {rate} Hz audio, the tokenizer {expect_rate} Hz")
    return teacher.eval().requires_grad_(False)
