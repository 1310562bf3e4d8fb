"""Lightning DataModules and the data pieces they are built from."""

from datamodules.batch import AudioBatch, LMBatch, VisualBatch, collate_audio, collate_lm, collate_visual
from datamodules.media import AudioDataModule, ImageDataModule, MediaDataModule, VideoDataModule
from datamodules.media_io import MediaDecodeError, read_audio, read_image, read_video, write_audio, write_video
from datamodules.sampler import ResumableSampler
from datamodules.synthetic_audio import render_synthetic_audio
from datamodules.synthetic_bios import BiographyCorpus, generate_biographies
from datamodules.synthetic_shapes import render_moving_shapes
from datamodules.text import PackedDataset, TextDataModule, build_corpus

__all__ = [
    "AudioBatch",
    "AudioDataModule",
    "BiographyCorpus",
    "ImageDataModule",
    "LMBatch",
    "MediaDataModule",
    "MediaDecodeError",
    "PackedDataset",
    "ResumableSampler",
    "TextDataModule",
    "VideoDataModule",
    "VisualBatch",
    "build_corpus",
    "collate_audio",
    "collate_lm",
    "collate_visual",
    "generate_biographies",
    "read_audio",
    "read_image",
    "read_video",
    "render_moving_shapes",
    "render_synthetic_audio",
    "write_audio",
    "write_video",
]
