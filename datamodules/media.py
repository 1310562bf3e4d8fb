"""Image, video and audio DataModules over embedded synthetic data or folders of media files.

Everything is decoded once in `setup()` and kept in memory (uint8 pixels, float32 audio): the data
sets this lab trains on are small, and decoding up front is what lets a bad file stop (or be
skipped) before the first step instead of crashing a worker mid-epoch. Memory is roughly
num_items * item_bytes, e.g. 10k clips of 9 x 64 x 64 RGB frames = 1.1 GB.

Common arguments (all three DataModules):
    source: "synthetic" (embedded generators) or a folder (searched recursively; files with other
        suffixes and hidden files are ignored), a single file, or a glob.
    batch_size: GLOBAL batch size; each of the world_size processes loads batch_size // world_size.
    val_fraction, test_fraction: held-out fractions of the files (synthetic: clips), split by a
        seeded shuffle of their index (`split_seed`); frames or audio segments of one file/clip
        always land in the same split. test_fraction 0 = the test loader reuses the val split.
    seed: the train order is a pure function of (seed, epoch); `state_dict()` stores the position.
    data_seed: seed of the synthetic generator.
    on_bad_file: "error" = the first bad file (empty, truncated, wrong format, undecodable, or an
        explicitly named file with a wrong suffix) stops setup with its path in the message;
        "skip" = it is left out, listed in `bad_files` and counted in `num_bad_files` (logged by
        the LightningModule as data/bad_files).
    labels_from_dirs: label = the file's class folder (the first folder under a folder source, the
        parent folder for a file or glob source); classes are the sorted folder names. Otherwise
        file labels are -1.
    num_classes: classes of the synthetic data.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
import random
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from datamodules.batch import collate_audio, collate_visual
from datamodules.media_io import (
    AUDIO_SUFFIXES,
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    MediaDecodeError,
    read_audio,
    read_image,
    read_video,
)
from datamodules.resumable import ResumableDataModule
from datamodules.sampler import ResumableSampler
from datamodules.synthetic_audio import AUDIO_CLASSES, render_synthetic_audio
from datamodules.synthetic_shapes import NUM_SHAPE_CLASSES, class_names, render_moving_shapes

__all__ = [
    "AudioDataModule",
    "ImageDataModule",
    "MediaDataModule",
    "MediaDataset",
    "VideoDataModule",
    "resolve_media_files",
    "split_groups",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# files, labels, splits
# ---------------------------------------------------------------------------


def resolve_media_files(source: str, suffixes: Sequence[str]) -> tuple[list[Path], Path | None]:
    """Files of a folder / glob (those with a wanted suffix, sorted) or the single named file.

    Returns the files and the folder they were searched under (None for a glob or a file).
    A single named file is returned whatever its suffix: the caller reports a wrong one as a bad file.
    """
    suffixes = tuple(s.lower() for s in suffixes)
    expanded = os.path.expanduser(source)
    if glob.has_magic(expanded):
        files = [Path(m) for m in sorted(glob.glob(expanded, recursive=True))
                 if not os.path.isdir(m) and Path(m).suffix.lower() in suffixes]
        if not files:
            raise FileNotFoundError(f"data source glob {source!r} matched no {'/'.join(suffixes)} files")
        return files, None
    path = Path(expanded)
    if path.is_dir():
        files = sorted(
            f for f in path.rglob("*")
            if f.suffix.lower() in suffixes
            and not f.is_dir()
            and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
        if not files:
            raise FileNotFoundError(f"no {'/'.join(suffixes)} files under data source directory {path}")
        return files, path
    if path.exists() or path.is_symlink():
        return [path], None
    raise FileNotFoundError(
        f"data source {source!r} does not exist (expected 'synthetic', a file, a directory or a glob)"
    )


def class_folder(path: Path, root: Path | None) -> str:
    """Class name of a file: its first folder under `root`, or its parent folder's name."""
    if root is None:
        return path.parent.name
    parts = path.relative_to(root).parts
    if len(parts) < 2:
        raise ValueError(
            f"data.labels_from_dirs=true needs every file inside a class sub-folder of {root}, "
            f"but {path} is directly in it"
        )
    return parts[0]


def split_groups(
    num_groups: int, val_fraction: float, split_seed: int, test_fraction: float = 0.0
) -> tuple[list[int], list[int], list[int]]:
    """Seeded split of group indices into sorted (train, val, test) lists.

    With test_fraction 0 it equals `datamodules.text.split_documents` (same shuffle).
    """
    if not 0.0 <= val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"val_fraction and test_fraction must be in [0, 1), got {val_fraction}, {test_fraction}")
    num_val = 0 if val_fraction == 0 else max(1, round(num_groups * val_fraction))
    num_test = 0 if test_fraction == 0 else max(1, round(num_groups * test_fraction))
    if num_groups - num_val - num_test < 1:
        raise ValueError(
            f"need at least {num_val + num_test + 1} files/clips for the train/val/test split, got {num_groups}"
        )
    perm = list(range(num_groups))
    random.Random(split_seed).shuffle(perm)
    val, test = perm[:num_val], perm[num_val : num_val + num_test]
    return sorted(perm[num_val + num_test :]), sorted(val), sorted(test)


# ---------------------------------------------------------------------------
# in-memory dataset
# ---------------------------------------------------------------------------


def _uint8_to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def image_sample(x: torch.Tensor) -> torch.Tensor:
    """Stored uint8 [3, H, W] -> float32 [3, H, W] in [-1, 1]."""
    return _uint8_to_unit(x)


def video_sample(x: torch.Tensor) -> torch.Tensor:
    """Stored uint8 [T, 3, H, W] -> float32 [3, T, H, W] in [-1, 1] (channels first, as Conv3d wants)."""
    return _uint8_to_unit(x.permute(1, 0, 2, 3))


def audio_sample(x: torch.Tensor) -> torch.Tensor:
    """Stored float32 [L] -> itself."""
    return x


class MediaDataset(Dataset):
    """Stacked items with labels; item i is {key: convert(items[i]), "label", "index": i, **extra}."""

    def __init__(self, items: torch.Tensor, labels: torch.Tensor, key: str,
                 convert: Callable[[torch.Tensor], torch.Tensor], extra: dict | None = None) -> None:
        if items.shape[0] != labels.shape[0]:
            raise ValueError(f"{items.shape[0]} items but {labels.shape[0]} labels")
        self.items = items
        self.labels = labels.long()
        self.key = key
        self.convert = convert  # a module-level function, so worker processes can pickle it
        self.extra = dict(extra or {})

    def __len__(self) -> int:
        return self.items.shape[0]

    def __getitem__(self, idx: int) -> dict:
        return {self.key: self.convert(self.items[idx]), "label": int(self.labels[idx]), "index": int(idx),
                **self.extra}


# ---------------------------------------------------------------------------
# shared DataModule
# ---------------------------------------------------------------------------


class MediaDataModule(ResumableDataModule):
    """Splits, loaders, world-size checks, exact resume and the bad-file policy for media data.

    Subclasses set `modality`, `suffixes`, `sample_key`, `_convert` and implement `_synthetic_groups`,
    `_file_items` and `_item_shape` (and `_item_dtype`, `_dataset_extra`, `_collate_fn` if needed). A *group* is one file or synthetic clip: it yields zero or more stacked items
    (frames of a clip, segments of a recording) that share its label and its split.
    """

    modality = "media"
    suffixes: tuple[str, ...] = ()
    sample_key = "pixels"
    _convert: Callable[[torch.Tensor], torch.Tensor] = staticmethod(image_sample)

    def __init__(
        self,
        source: str = "synthetic",
        batch_size: int = 8,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        seed: int = 0,
        data_seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_bad_file: str = "error",
        labels_from_dirs: bool = False,
        num_classes: int = 1,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
            raise ValueError(f"data.test_fraction must be in [0, 1 - val_fraction), got {test_fraction}")
        if on_bad_file not in ("error", "skip"):
            raise ValueError(f"data.on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.source = str(source)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.seed = seed
        self.data_seed = data_seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.on_bad_file = on_bad_file
        self.labels_from_dirs = labels_from_dirs
        self.num_classes = num_classes
        self.class_names: list[str] = []

        self.train_dataset: MediaDataset | None = None
        self.val_dataset: MediaDataset | None = None
        self.test_dataset: MediaDataset | None = None
        # Per split: the file path (or "synthetic:<clip>") of every item, for tracing a sample back.
        self.item_sources: dict[str, list[str]] = {}
        self.bad_files: list[str] = []
        self.bad_file_reasons: dict[str, str] = {}
        self.num_short_skipped = 0  # clips/recordings shorter than wanted and dropped (short_clip=skip)
        self._train_sampler: ResumableSampler | None = None
        self._pending_sampler_state: dict | None = None

    @property
    def is_synthetic(self) -> bool:
        return self.source == "synthetic"

    @property
    def num_bad_files(self) -> int:
        """Files left out by on_bad_file=skip in the last setup (0 for synthetic data)."""
        return len(self.bad_files)

    # -- subclass hooks ------------------------------------------------------------

    def _synthetic_groups(self) -> tuple[list[torch.Tensor], list[int], list[str]]:
        """Stacked items per synthetic clip, the clip labels, and the class names."""
        raise NotImplementedError

    def _file_items(self, path: Path) -> torch.Tensor:
        """Stacked items of one file (possibly none); MediaDecodeError for a bad file."""
        raise NotImplementedError

    def _item_shape(self) -> tuple[int, ...]:
        """Shape of one stored item, used for empty splits."""
        raise NotImplementedError

    def _item_dtype(self) -> torch.dtype:
        return torch.uint8

    def _dataset_extra(self) -> dict:
        """Constant fields added to every sample (e.g. the sample rate)."""
        return {}

    # -- distributed context -------------------------------------------------------


    # -- building ------------------------------------------------------------------

    def _check_suffix(self, path: Path) -> None:
        if path.suffix.lower() not in self.suffixes:
            raise MediaDecodeError(
                f"{path}: unsupported suffix {path.suffix or '(none)'!r} for {self.modality} data "
                f"(expected one of {', '.join(self.suffixes)})"
            )

    def _load_files(self) -> tuple[list[torch.Tensor | None], list[int], list[str]]:
        """Decode every file (None for a skipped bad file); labels and names of the groups."""
        files, root = resolve_media_files(self.source, self.suffixes)
        if self.labels_from_dirs:
            folders = [class_folder(f, root) for f in files]
            names = sorted(set(folders))
            labels = [names.index(c) for c in folders]
            self.class_names = names
            self.num_classes = len(names)
        else:
            labels = [-1] * len(files)
            self.class_names = []
            self.num_classes = 0
        groups: list[torch.Tensor | None] = []
        for path in files:
            try:
                self._check_suffix(path)
                groups.append(self._file_items(path))
            except MediaDecodeError as e:
                if self.on_bad_file == "error":
                    raise MediaDecodeError(
                        f"{e} (bad {self.modality} file; set data.on_bad_file=skip to leave such files out)"
                    ) from e
                log.warning("skipping bad %s file: %s", self.modality, e)
                self.bad_files.append(str(path))
                self.bad_file_reasons[str(path)] = str(e)
                groups.append(None)
        if self.bad_files and len(self.bad_files) == len(files):
            raise ValueError(
                f"all {len(files)} {self.modality} files of data source {self.source!r} are bad "
                f"(first: {self.bad_file_reasons[self.bad_files[0]]})"
            )
        if self.bad_files:
            log.warning("left out %d bad %s file(s) of %d", len(self.bad_files), self.modality, len(files))
        return groups, labels, [str(f) for f in files]

    def _build(self) -> None:
        self.bad_files, self.bad_file_reasons, self.num_short_skipped = [], {}, 0
        if self.is_synthetic:
            groups, labels, names = self._synthetic_groups()
            self.class_names = names
            self.num_classes = len(names)
            group_names = [f"synthetic:{i}" for i in range(len(groups))]
        else:
            groups, labels, group_names = self._load_files()
        train_ids, val_ids, test_ids = split_groups(len(groups), self.val_fraction, self.split_seed,
                                                    self.test_fraction)
        datasets = {}
        for split, ids in (("train", train_ids), ("val", val_ids), ("test", test_ids)):
            parts, part_labels, sources = [], [], []
            for i in ids:
                items = groups[i]
                if items is None or items.shape[0] == 0:
                    continue
                parts.append(items)
                part_labels.append(torch.full((items.shape[0],), labels[i], dtype=torch.long))
                sources.extend([group_names[i]] * items.shape[0])
            if parts:
                items = torch.cat(parts)
                item_labels = torch.cat(part_labels)
            else:
                items = torch.zeros((0, *self._item_shape()), dtype=self._item_dtype())
                item_labels = torch.zeros(0, dtype=torch.long)
            datasets[split] = MediaDataset(items, item_labels, self.sample_key, type(self)._convert,
                                           self._dataset_extra())
            self.item_sources[split] = sources
        if self.num_short_skipped:
            log.warning("skipped %d %s(s) shorter than requested (short_clip=skip)",
                        self.num_short_skipped, self.modality)
        if len(datasets["train"]) == 0:
            raise ValueError(
                f"the train split of data source {self.source!r} is empty after leaving out bad files "
                f"and short clips; add data or lower data.val_fraction"
            )
        if len(datasets["val"]) == 0 and self.val_fraction > 0:
            log.warning("the val split of data source %r is empty: validation will be skipped", self.source)
        self.train_dataset = datasets["train"]
        self.val_dataset = datasets["val"]
        # No separate test fraction: test on the held-out val split, like the text data.
        self.test_dataset = datasets["test"] if self.test_fraction > 0 else datasets["val"]
        if self.test_fraction == 0:
            self.item_sources["test"] = self.item_sources["val"]

    def prepare_data(self) -> None:
        """Nothing to download or cache: every rank decodes its data in `setup`."""

    def setup(self, stage: str | None = None) -> None:
        """Check the batch size against the world size, then decode everything once (idempotent)."""
        self.per_rank_batch_size()
        if self.train_dataset is None:
            self._build()

    # -- loaders -------------------------------------------------------------------

    def _require_setup(self) -> None:
        if self.train_dataset is None or self.val_dataset is None or self.test_dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before requesting dataloaders")

    def train_dataloader(self) -> DataLoader:
        """Shuffled, rank-sharded, exactly resumable loader with the per-rank batch size."""
        self._require_setup()
        sampler = self._make_train_sampler(
            len(self.train_dataset),
            f"train split has {len(self.train_dataset)} {self.modality} items, fewer than one global "
            f"batch (data.batch_size={self.batch_size}); lower data.batch_size or add data",
        )
        return self._loader(self.train_dataset, sampler, self.per_rank_batch_size(), drop_last=True)

    def val_dataloader(self) -> DataLoader:
        """Sequential loader over this rank's shard of the val split."""
        self._require_setup()
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        """The test split (data.test_fraction > 0), else the val split."""
        self._require_setup()
        return self._eval_loader(self.test_dataset)

    def _eval_loader(self, dataset: MediaDataset) -> DataLoader:
        sampler = self._make_eval_sampler(len(dataset))
        return self._loader(dataset, sampler, self.per_rank_batch_size(), drop_last=False)

    def _loader(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=self._collate_fn(),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )

    def _collate_fn(self) -> Callable:
        return collate_visual

def _check_short_clip(short_clip: str) -> None:
    if short_clip not in ("pad", "skip"):
        raise ValueError(f"data.short_clip must be 'pad' or 'skip', got {short_clip!r}")


def _resize_crop(size: int) -> v2.Compose:
    # Shorter side to `size`, then the central size x size square; works on [..., C, H, W] uint8.
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------


class ImageDataModule(MediaDataModule):
    """`VisualBatch` of images: pixels float32 [B, 3, image_size, image_size] in [-1, 1].

    Files (png, jpg/jpeg, webp) are resized (shorter side) and centre-cropped to image_size.
    Synthetic: every frame of `num_clips` moving-shapes clips of `num_frames` frames is an image,
    labelled with its clip's class (shape x motion, of which a still frame shows the shape).
    """

    modality = "image"
    suffixes = IMAGE_SUFFIXES
    sample_key = "pixels"
    _convert = staticmethod(image_sample)

    def __init__(
        self,
        source: str = "synthetic",
        image_size: int = 32,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        seed: int = 0,
        data_seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_bad_file: str = "error",
        labels_from_dirs: bool = False,
        num_classes: int = NUM_SHAPE_CLASSES,
        num_clips: int = 64,
        num_frames: int = 8,
        background: str = "mixed",
    ) -> None:
        super().__init__(source, batch_size, val_fraction, test_fraction, split_seed, seed, data_seed,
                         num_workers, pin_memory, on_bad_file, labels_from_dirs, num_classes)
        self.save_hyperparameters()
        if image_size < 4:
            raise ValueError(f"data.image_size must be >= 4, got {image_size}")
        if num_clips < 1 or num_frames < 1:
            raise ValueError(f"data.num_clips and data.num_frames must be >= 1, got {num_clips}, {num_frames}")
        self.image_size = image_size
        self.num_clips = num_clips
        self.num_frames = num_frames
        self.background = background
        self.transform = _resize_crop(image_size)

    def _item_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    def _synthetic_groups(self):
        videos, labels = render_moving_shapes(self.num_clips, self.num_frames, self.image_size, self.data_seed,
                                              self.num_classes, self.background)
        groups = list(videos.permute(0, 1, 4, 2, 3).contiguous().unbind(0))  # clip -> [T, 3, H, W]
        return groups, labels.tolist(), class_names(self.num_classes)

    def _file_items(self, path: Path) -> torch.Tensor:
        img = read_image(path)
        if img.shape[-2:] != (self.image_size, self.image_size):
            img = self.transform(img)
        return img.unsqueeze(0).contiguous()


# ---------------------------------------------------------------------------
# video
# ---------------------------------------------------------------------------


class VideoDataModule(MediaDataModule):
    """`VisualBatch` of clips: pixels float32 [B, 3, num_frames, image_size, image_size] in [-1, 1].

    Each file (mp4, webm, avi, gif, mkv, mov) gives one clip: its first `num_frames` frames after
    resampling to `fps` (None = native rate, every `frame_stride`-th frame), resized (shorter side)
    and centre-cropped to image_size. short_clip: a clip with fewer frames is padded by repeating its
    last frame ("pad") or left out and counted in `num_short_skipped` ("skip").
    Synthetic: `num_clips` moving-shapes clips of `synthetic_frames` frames (default: just enough for
    num_frames at frame_stride, i.e. (num_frames - 1) * frame_stride + 1); fps does not apply.
    """

    modality = "video"
    suffixes = VIDEO_SUFFIXES
    sample_key = "pixels"
    _convert = staticmethod(video_sample)

    def __init__(
        self,
        source: str = "synthetic",
        num_frames: int = 9,
        fps: float | None = None,
        frame_stride: int = 1,
        image_size: int = 32,
        short_clip: str = "pad",
        batch_size: int = 8,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        seed: int = 0,
        data_seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_bad_file: str = "error",
        labels_from_dirs: bool = False,
        num_classes: int = NUM_SHAPE_CLASSES,
        num_clips: int = 256,
        synthetic_frames: int | None = None,
        background: str = "mixed",
    ) -> None:
        super().__init__(source, batch_size, val_fraction, test_fraction, split_seed, seed, data_seed,
                         num_workers, pin_memory, on_bad_file, labels_from_dirs, num_classes)
        self.save_hyperparameters()
        _check_short_clip(short_clip)
        if num_frames < 1:
            raise ValueError(f"data.num_frames must be >= 1, got {num_frames}")
        if frame_stride < 1:
            raise ValueError(f"data.frame_stride must be >= 1, got {frame_stride}")
        if fps is not None and fps <= 0:
            raise ValueError(f"data.fps must be > 0 or null, got {fps}")
        if image_size < 4:
            raise ValueError(f"data.image_size must be >= 4, got {image_size}")
        if synthetic_frames is not None and synthetic_frames < 1:
            raise ValueError(f"data.synthetic_frames must be >= 1 or null, got {synthetic_frames}")
        if num_clips < 1:
            raise ValueError(f"data.num_clips must be >= 1, got {num_clips}")
        self.num_frames = num_frames
        self.fps = fps
        self.frame_stride = frame_stride
        self.image_size = image_size
        self.short_clip = short_clip
        self.num_clips = num_clips
        self.synthetic_frames = synthetic_frames
        self.background = background
        self.transform = _resize_crop(image_size)

    def _item_shape(self) -> tuple[int, ...]:
        return (self.num_frames, 3, self.image_size, self.image_size)

    def _fit_length(self, clip: torch.Tensor) -> torch.Tensor | None:
        """[t, ...] -> [num_frames, ...]: cut, pad with the last frame, or None (skipped)."""
        t = clip.shape[0]
        if t >= self.num_frames:
            return clip[: self.num_frames]
        if self.short_clip == "skip":
            self.num_short_skipped += 1
            return None
        return torch.cat([clip, clip[-1:].expand(self.num_frames - t, *clip.shape[1:])])

    def _synthetic_groups(self):
        total = self.synthetic_frames or (self.num_frames - 1) * self.frame_stride + 1
        videos, labels = render_moving_shapes(self.num_clips, total, self.image_size, self.data_seed,
                                              self.num_classes, self.background)
        videos = videos[:, :: self.frame_stride].permute(0, 1, 4, 2, 3)  # [N, t, 3, H, W]
        groups = []
        for clip in videos.unbind(0):
            fitted = self._fit_length(clip)
            groups.append(fitted.unsqueeze(0).contiguous() if fitted is not None
                          else clip.new_zeros((0, *self._item_shape())))
        return groups, labels.tolist(), class_names(self.num_classes)

    def _file_items(self, path: Path) -> torch.Tensor:
        frames, _ = read_video(path, self.num_frames, fps=self.fps, stride=self.frame_stride)
        clip = frames.permute(0, 3, 1, 2)  # [t, 3, H, W]
        if clip.shape[-2:] != (self.image_size, self.image_size):
            clip = self.transform(clip)
        fitted = self._fit_length(clip)
        if fitted is None:
            log.info("skipping %s: %d frames, fewer than data.num_frames=%d", path, clip.shape[0], self.num_frames)
            return clip.new_zeros((0, *self._item_shape()))
        return fitted.unsqueeze(0).contiguous()


# ---------------------------------------------------------------------------
# audio
# ---------------------------------------------------------------------------


class AudioDataModule(MediaDataModule):
    """`AudioBatch`: waveform float32 [B, clip_seconds * sample_rate] in [-1, 1], mono.

    Files (wav, flac, ogg) are mixed to mono, resampled to sample_rate and cut into consecutive
    clips of clip_seconds; the remainder after the last full clip is dropped. A file shorter than
    one clip is zero-padded ("pad") or left out and counted in `num_short_skipped` ("skip").
    Synthetic: `num_clips` clips of the five synthetic sound classes (the first num_classes of them).
    """

    modality = "audio"
    suffixes = AUDIO_SUFFIXES
    sample_key = "waveform"
    _convert = staticmethod(audio_sample)

    def __init__(
        self,
        source: str = "synthetic",
        sample_rate: int = 16000,
        clip_seconds: float = 1.0,
        short_clip: str = "pad",
        batch_size: int = 16,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        seed: int = 0,
        data_seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_bad_file: str = "error",
        labels_from_dirs: bool = False,
        num_classes: int = len(AUDIO_CLASSES),
        num_clips: int = 256,
    ) -> None:
        super().__init__(source, batch_size, val_fraction, test_fraction, split_seed, seed, data_seed,
                         num_workers, pin_memory, on_bad_file, labels_from_dirs, num_classes)
        self.save_hyperparameters()
        _check_short_clip(short_clip)
        if sample_rate < 1000:
            raise ValueError(f"data.sample_rate must be >= 1000, got {sample_rate}")
        self.clip_len = int(round(clip_seconds * sample_rate))
        if self.clip_len < 1:
            raise ValueError(f"data.clip_seconds * data.sample_rate must give >= 1 sample, got {clip_seconds}")
        if num_clips < 1:
            raise ValueError(f"data.num_clips must be >= 1, got {num_clips}")
        self.sample_rate = sample_rate
        self.clip_seconds = clip_seconds
        self.short_clip = short_clip
        self.num_clips = num_clips

    def _item_shape(self) -> tuple[int, ...]:
        return (self.clip_len,)

    def _item_dtype(self) -> torch.dtype:
        return torch.float32

    def _dataset_extra(self) -> dict:
        return {"sample_rate": self.sample_rate}

    def _collate_fn(self) -> Callable:
        return collate_audio

    def _synthetic_groups(self):
        waves, labels, names = render_synthetic_audio(self.num_clips, self.clip_len / self.sample_rate,
                                                      self.sample_rate, self.data_seed, self.num_classes)
        return list(waves.unsqueeze(1).unbind(0)), labels.tolist(), names

    def _file_items(self, path: Path) -> torch.Tensor:
        wave = read_audio(path, self.sample_rate).clamp_(-1.0, 1.0)
        n_full = wave.shape[0] // self.clip_len
        if n_full >= 1:
            return wave[: n_full * self.clip_len].reshape(n_full, self.clip_len).clone()
        if self.short_clip == "skip":
            self.num_short_skipped += 1
            log.info("skipping %s: %.3fs, shorter than data.clip_seconds=%s", path,
                     wave.shape[0] / self.sample_rate, self.clip_seconds)
            return wave.new_zeros(0, self.clip_len)
        return torch.nn.functional.pad(wave, (0, self.clip_len - wave.shape[0])).unsqueeze(0)
