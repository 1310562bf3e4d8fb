"""Batch types (language modelling, images/videos, audio) and their collate functions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["AudioBatch", "LMBatch", "VisualBatch", "collate_audio", "collate_lm", "collate_visual"]


@dataclass
class LMBatch:
    """Input tokens and next-token targets, both [B, T] int64."""

    tokens: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def pin_memory(self) -> LMBatch:
        """Pinned copy; the DataLoader calls this on custom batch types when pin_memory=True."""
        return LMBatch(self.tokens.pin_memory(), self.targets.pin_memory())

    def to(self, *args, **kwargs) -> LMBatch:
        """Move/cast both tensors like `Tensor.to`."""
        return LMBatch(self.tokens.to(*args, **kwargs), self.targets.to(*args, **kwargs))


def collate_lm(samples: Sequence[Mapping[str, torch.Tensor] | Sequence[torch.Tensor]]) -> LMBatch:
    """Stack samples given as {"tokens", "targets"} dicts or (tokens, targets) pairs into an LMBatch."""
    if len(samples) == 0:
        raise ValueError("collate_lm got an empty list of samples")
    if isinstance(samples[0], Mapping):
        tokens = [s["tokens"] for s in samples]
        targets = [s["targets"] for s in samples]
    else:
        tokens = [s[0] for s in samples]
        targets = [s[1] for s in samples]
    return LMBatch(
        tokens=torch.stack([torch.as_tensor(t) for t in tokens]).long(),
        targets=torch.stack([torch.as_tensor(t) for t in targets]).long(),
    )


def _labels_and_index(samples: Sequence[Mapping], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if len(samples) == 0:
        raise ValueError(f"{name} got an empty list of samples")
    labels = torch.as_tensor([int(s.get("label", -1)) for s in samples], dtype=torch.long)
    index = torch.as_tensor([int(s.get("index", -1)) for s in samples], dtype=torch.long)
    return labels, index


def _skipped(samples: Sequence[Mapping]) -> tuple:
    """The (path, kind, reason) entries the samples report, in sample order."""
    return tuple(entry for s in samples for entry in s.get("skipped", ()))


@dataclass
class VisualBatch:
    """Images [B, 3, H, W] or clips [B, 3, T, H, W], float32 in [-1, 1].

    labels: int64 [B], -1 = unlabelled. index: int64 [B], each sample's index in its dataset.
    skipped: (path, kind, reason) of every file a lazily decoding dataset passed over to fill this
        batch (kind "bad" or "short"); the DataModule counts them (data/bad_files).
    """

    pixels: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    skipped: tuple = ()

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def pin_memory(self) -> VisualBatch:
        """Pinned copy; the DataLoader calls this on custom batch types when pin_memory=True."""
        return VisualBatch(self.pixels.pin_memory(), self.labels.pin_memory(), self.index.pin_memory(),
                           self.skipped)

    def to(self, *args, **kwargs) -> VisualBatch:
        """Move like `Tensor.to`; a dtype applies to `pixels` only (labels and index stay int64)."""
        return VisualBatch(self.pixels.to(*args, **kwargs), _move_int(self.labels, args, kwargs),
                           _move_int(self.index, args, kwargs), self.skipped)


@dataclass
class AudioBatch:
    """Waveforms float32 [B, L] in [-1, 1] at `sample_rate` Hz.

    labels: int64 [B], -1 = unlabelled. index: int64 [B], each sample's index in its dataset.
    skipped: as in `VisualBatch`.
    """

    waveform: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    sample_rate: int
    skipped: tuple = ()

    def __len__(self) -> int:
        return self.waveform.shape[0]

    def pin_memory(self) -> AudioBatch:
        """Pinned copy; the DataLoader calls this on custom batch types when pin_memory=True."""
        return AudioBatch(self.waveform.pin_memory(), self.labels.pin_memory(), self.index.pin_memory(),
                          self.sample_rate, self.skipped)

    def to(self, *args, **kwargs) -> AudioBatch:
        """Move like `Tensor.to`; a dtype applies to `waveform` only (labels and index stay int64)."""
        return AudioBatch(self.waveform.to(*args, **kwargs), _move_int(self.labels, args, kwargs),
                          _move_int(self.index, args, kwargs), self.sample_rate, self.skipped)


def _move_int(t: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """`Tensor.to` for integer tensors: device and non_blocking are honoured, dtypes ignored."""
    device = kwargs.get("device")
    for a in args:
        if isinstance(a, (torch.device, str, int)):
            device = a
        elif isinstance(a, torch.Tensor):
            device = a.device
    return t if device is None else t.to(device, non_blocking=kwargs.get("non_blocking", False))


def collate_visual(samples: Sequence[Mapping[str, torch.Tensor | int]]) -> VisualBatch:
    """Stack {"pixels", "label", "index"} samples into a VisualBatch."""
    labels, index = _labels_and_index(samples, "collate_visual")
    pixels = torch.stack([torch.as_tensor(s["pixels"]) for s in samples]).float()
    return VisualBatch(pixels=pixels, labels=labels, index=index, skipped=_skipped(samples))


def collate_audio(samples: Sequence[Mapping[str, torch.Tensor | int]], sample_rate: int | None = None) -> AudioBatch:
    """Stack {"waveform", "label", "index"(, "sample_rate")} samples into an AudioBatch.

    sample_rate: used when the samples do not carry one.
    """
    labels, index = _labels_and_index(samples, "collate_audio")
    rate = samples[0].get("sample_rate", sample_rate)
    if rate is None:
        raise ValueError("collate_audio needs a sample_rate (in the samples or as an argument)")
    waveform = torch.stack([torch.as_tensor(s["waveform"]) for s in samples]).float()
    return AudioBatch(waveform=waveform, labels=labels, index=index, sample_rate=int(rate),
                      skipped=_skipped(samples))
