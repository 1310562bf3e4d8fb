"""Typed Hydra schemas of the media DataModules (`conf/data/{image,video,audio}.yaml`).

Field for field the DataModules' arguments, so a misspelt key (`data.num_frame=3`) or a wrong type
fails at compose time with the full key named. `register_data_schemas` is called from
`lit_modules.schemas.register_schemas`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore

__all__ = ["AudioDataSchema", "ImageDataSchema", "VideoDataSchema", "register_data_schemas"]


@dataclass
class ImageDataSchema:
    _target_: str = "datamodules.media.ImageDataModule"
    source: str = "synthetic"
    image_size: int = 32
    batch_size: int = 16
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    split_seed: int = 0
    seed: int = 0
    data_seed: int = 0
    num_workers: int = 0
    pin_memory: bool = False
    on_bad_file: str = "error"
    labels_from_dirs: bool = False
    num_classes: int = 12
    num_clips: int = 64
    num_frames: int = 8
    background: str = "mixed"


@dataclass
class VideoDataSchema:
    _target_: str = "datamodules.media.VideoDataModule"
    source: str = "synthetic"
    num_frames: int = 9
    fps: Optional[float] = None
    frame_stride: int = 1
    image_size: int = 32
    short_clip: str = "pad"
    batch_size: int = 8
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    split_seed: int = 0
    seed: int = 0
    data_seed: int = 0
    num_workers: int = 0
    pin_memory: bool = False
    on_bad_file: str = "error"
    labels_from_dirs: bool = False
    num_classes: int = 12
    num_clips: int = 256
    synthetic_frames: Optional[int] = None
    background: str = "mixed"


@dataclass
class AudioDataSchema:
    _target_: str = "datamodules.media.AudioDataModule"
    source: str = "synthetic"
    sample_rate: int = 16000
    clip_seconds: float = 1.0
    short_clip: str = "pad"
    batch_size: int = 16
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    split_seed: int = 0
    seed: int = 0
    data_seed: int = 0
    num_workers: int = 0
    pin_memory: bool = False
    on_bad_file: str = "error"
    labels_from_dirs: bool = False
    num_classes: int = 5
    num_clips: int = 256


def register_data_schemas(cs: ConfigStore) -> None:
    """Store the media data schemas as group "data": image_schema, video_schema, audio_schema."""
    cs.store(group="data", name="image_schema", node=ImageDataSchema)
    cs.store(group="data", name="video_schema", node=VideoDataSchema)
    cs.store(group="data", name="audio_schema", node=AudioDataSchema)
