"""Image, video and audio DataModules over embedded synthetic data or folders of media files.

decode="lazy" (the default for files): `setup()` only lists the files and makes the file-level
splits; each item is decoded when the DataLoader asks for it, in its worker processes, so memory
does not grow with the data set (about one file per worker, plus the prefetched batches).
Audio files are an exception only in that setup reads each file's header (no samples) to count
its clips; so are video files cut into several clips (clips_per_video != 1 or random_offset), whose
packets setup reads (nothing decoded) to count their frames. decode="eager" decodes every file
once in `setup()` and keeps it in memory (uint8 pixels, float32 audio), roughly num_items *
item_bytes, e.g. 10k clips of 9 x 64 x 64 RGB frames = 1.1 GB (several clips per video: the frames
their windows span, each frame once), in exchange for finding every bad file before the first step.
The embedded synthetic data sets are always generated in memory.

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
        explicitly named file with a wrong suffix) stops setup (eager) or the run, when a loader
        reaches it (lazy), with its path in the message; "skip" = it is left out (eager), or its
        item is replaced by the next item of the split, in index order and wrapping around, whose
        file decodes (lazy: the replacement depends only on the files, so a resumed run gets the
        same batches); either way it is listed in `bad_files` and counted in `num_bad_files` (logged
        by the LightningModule as data/bad_files) once the batch that passed over it is used.
    decode: "lazy" (decode per item, see above) or "eager" (decode everything in setup); files only.
    labels_from_dirs: label = the file's class folder (the first folder under a folder source, the
        parent folder for a file or glob source); classes are the sorted folder names. Otherwise
        file labels are -1.
    num_classes: classes of the synthetic data.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from datamodules.batch import collate_audio, collate_visual
from datamodules.media_io import (
    AUDIO_SUFFIXES,
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    MediaDecodeError,
    audio_num_samples,
    read_audio,
    read_image,
    read_video,
    video_frame_count,
)
from datamodules.resumable import ResumableDataModule
from datamodules.sampler import ResumableSampler
from datamodules.synthetic_audio import AUDIO_CLASSES, render_synthetic_audio
from datamodules.synthetic_shapes import NUM_SHAPE_CLASSES, class_names, clip_params, render_moving_shapes

__all__ = [
    "AUDIO_LABELS",
    "AudioDataModule",
    "EpochTaggedSampler",
    "ImageDataModule",
    "LazyMediaDataset",
    "MediaDataModule",
    "MediaDataset",
    "VideoClipDataset",
    "VideoDataModule",
    "audio_label_count",
    "clip_layout",
    "resolve_media_files",
    "split_groups",
    "window_offset",
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


class _ShortFile(Exception):
    """A file that short_clip=skip leaves out, found while loading (the message names it)."""


class LazyMediaDataset(Dataset):
    """Items decoded on access: item i is row `segments[i]` of `decode(files[i])` (a file's stacked items).

    A file that fails to decode (MediaDecodeError) stops loading with its path in the message
    (on_bad_file="error"), or its item is replaced by the next item, in index order and wrapping
    around, whose file decodes (on_bad_file="skip"). The replacement depends only on the files, not
    on the worker or on what was loaded before, so a resumed run gets the same batches. A clip that
    short_clip=skip leaves out (its file decodes to no items) is replaced the same way. A sample that
    stands in for others lists the files passed over under "skipped" as (path, kind, reason), kind
    "bad" or "short"; the collate functions carry them to the batch, where the DataModule counts them.
    Only the last decoded file is kept, so consecutive segments of one file decode it once.
    """

    def __init__(self, files: Sequence[str], segments: Sequence[int], labels: torch.Tensor, key: str,
                 convert: Callable[[torch.Tensor], torch.Tensor], decode: Callable[[Path], torch.Tensor],
                 extra: dict | None = None, on_bad_file: str = "error", modality: str = "media") -> None:
        if not len(files) == len(segments) == labels.shape[0]:
            raise ValueError(f"{len(files)} files, {len(segments)} segments and {labels.shape[0]} labels")
        self.files = list(files)
        self.segments = [int(k) for k in segments]
        self.labels = labels.long()
        self.key = key
        self.convert = convert  # module-level functions / partials: worker processes can pickle them
        self.decode = decode
        self.extra = dict(extra or {})
        self.on_bad_file = on_bad_file
        self.modality = modality
        self._passed: dict[str, tuple[str, str]] = {}  # path -> (kind, reason), found by this process
        self._last: tuple[str, torch.Tensor] | None = None
        self.epoch = 0  # used for a plain integer index (the loaders pass (index, epoch) where it matters)

    def __len__(self) -> int:
        return len(self.files)

    def _items(self, path: str) -> torch.Tensor:
        if self._last is not None and self._last[0] == path:
            return self._last[1]
        self._last = None  # free the previous file before decoding the next
        items = self.decode(Path(path))
        self._last = (path, items)
        return items

    def _fail(self, path: str, index: int, reason: str) -> tuple[str, str]:
        if self.on_bad_file == "error":
            raise MediaDecodeError(f"{reason} (bad {self.modality} file, found loading item {index}; "
                                   "set data.on_bad_file=skip to skip and count such files)")
        log.warning("skipping bad %s file: %s", self.modality, reason)
        return "bad", reason

    def _load(self, j: int, epoch: int) -> torch.Tensor:
        """The stored item j (epoch: see `__getitem__`); MediaDecodeError for a bad file, _ShortFile for
        a file that short_clip=skip leaves out."""
        path, seg = self.files[j], self.segments[j]
        items = self._items(path)
        if seg < items.shape[0]:
            return items[seg]
        if items.shape[0] == 0:
            raise _ShortFile(f"{path}: shorter than requested (short_clip=skip)")
        raise MediaDecodeError(f"{path}: decoded to {items.shape[0]} item(s), but its header promised at "
                               f"least {seg + 1}")

    def __getitem__(self, idx: int | tuple[int, int]) -> dict:
        # idx may be (index, epoch), as `EpochTaggedSampler` yields it: datasets whose items depend on
        # the epoch (random clip offsets) read it from there, as the index reaches worker processes.
        idx, epoch = idx if isinstance(idx, tuple) else (idx, self.epoch)
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} out of range for {n} items")
        idx %= n
        skipped: list[tuple[str, str, str]] = []
        for step in range(n):
            j = (idx + step) % n
            path = self.files[j]
            passed = self._passed.get(path)
            if passed is None:
                try:
                    item = self._load(j, int(epoch))
                except _ShortFile as e:
                    passed = ("short", str(e))
                except MediaDecodeError as e:
                    passed = self._fail(path, j, str(e))
                else:
                    sample = {self.key: self.convert(item), "label": int(self.labels[j]), "index": j, **self.extra}
                    if skipped:
                        sample["skipped"] = tuple(skipped)
                    return sample
                self._passed[path] = passed
            skipped.append((path, *passed))
        raise ValueError(f"every {self.modality} file of this split ({n} items) is bad or too short "
                         f"(first: {skipped[0][2]})")


class VideoClipDataset(LazyMediaDataset):
    """Clips cut from the frames of video files: item i is window `segments[i]` of `files[i]`.

    Window k of a file holds `num_frames` frames from frame offset + k * clip_stride, where offset =
    `window_offset(seed, epoch, file_ids[i], spans[i])` (always 0 where spans[i] is 1, as in val/test).
    The epoch comes with the index, (index, epoch), from `EpochTaggedSampler` (so it reaches worker
    processes with each index); a plain integer index uses `self.epoch`.
    frames: path -> the file's kept frames, uint8 [t, 3, H, W] (decode="eager"; a short padded file is
    stored padded). None (decode="lazy"): an item decodes its file's frames up to its window's end,
    `decode(path, n)`; the last file's frames are kept for the next item of the same file. A file that
    decodes to fewer frames than counted is a bad file, replaced as in `LazyMediaDataset`.
    """

    def __init__(self, files: Sequence[str], segments: Sequence[int], labels: torch.Tensor, key: str,
                 convert: Callable[[torch.Tensor], torch.Tensor], decode: Callable[[Path, int], torch.Tensor], *,
                 file_ids: Sequence[int], spans: Sequence[int], num_frames: int, clip_stride: int,
                 short_clip: str, seed: int, frames: dict[str, torch.Tensor] | None = None,
                 extra: dict | None = None, on_bad_file: str = "error", modality: str = "video") -> None:
        super().__init__(files, segments, labels, key, convert, decode, extra, on_bad_file, modality)
        if not len(file_ids) == len(spans) == len(self.files):
            raise ValueError(f"{len(self.files)} files, {len(file_ids)} file ids and {len(spans)} spans")
        self.file_ids = [int(i) for i in file_ids]
        self.spans = [int(s) for s in spans]
        self.num_frames = num_frames
        self.clip_stride = clip_stride
        self.short_clip = short_clip
        self.seed = seed
        self.frames = frames
        self._cached: tuple[str, int, torch.Tensor] | None = None  # (path, frames asked for, frames)

    @property
    def epoch_dependent(self) -> bool:
        """Whether any window moves with the epoch (random_offset, train split)."""
        return any(s > 1 for s in self.spans)

    def window_start(self, j: int, epoch: int) -> int:
        """First frame of item j's window in `epoch`."""
        offset = window_offset(self.seed, epoch, self.file_ids[j], self.spans[j])
        return offset + self.segments[j] * self.clip_stride

    def _file_frames(self, path: str, need: int) -> torch.Tensor:
        if self.frames is not None:
            return self.frames[path]
        cached = self._cached
        if cached is not None and cached[0] == path and cached[1] >= need:
            return cached[2]
        self._cached = None  # free the previous file before decoding the next
        frames = self.decode(Path(path), need)
        if frames.shape[0] < self.num_frames:
            fitted = fit_clip_length(frames, self.num_frames, self.short_clip)
            if fitted is None:
                raise _ShortFile(f"{path}: shorter than requested (short_clip=skip)")
            frames = fitted
        self._cached = (path, need, frames)
        return frames

    def _load(self, j: int, epoch: int) -> torch.Tensor:
        path = self.files[j]
        start = self.window_start(j, epoch)
        end = start + self.num_frames
        frames = self._file_frames(path, end)
        if frames.shape[0] < end:
            raise MediaDecodeError(f"{path}: decoded to {frames.shape[0]} frame(s), but its frame count "
                                   f"promised at least {end} (clip {self.segments[j]})")
        return frames[start:end]


class EpochTaggedSampler(Sampler):
    """Yields (index, epoch) for each index of a `ResumableSampler`'s order.

    The epoch is the one whose order is drawn (read when the DataLoader calls iter()); it travels with
    each index to the worker processes, so a dataset whose items depend on the epoch gets them right with
    any num_workers, without shared state. set_epoch, len and resuming go to the wrapped sampler.
    """

    def __init__(self, sampler: ResumableSampler) -> None:
        self.sampler = sampler

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = iter(self.sampler)  # applies a pending resume, which may set the epoch
        epoch = self.sampler.epoch
        return iter([(i, epoch) for i in indices])


# ---------------------------------------------------------------------------
# shared DataModule
# ---------------------------------------------------------------------------


class MediaDataModule(ResumableDataModule):
    """Splits, loaders, world-size checks, exact resume and the bad-file policy for media data.

    Subclasses set `modality`, `suffixes`, `sample_key`, `_convert` and implement `_synthetic_groups`,
    `_file_decoder` and `_item_shape` (and `_file_item_count`, `_item_dtype`, `_dataset_extra`,
    `_collate_fn` if needed). A *group* is one file or synthetic clip: it yields zero or more stacked items
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
        decode: str = "lazy",
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
        if decode not in ("lazy", "eager"):
            raise ValueError(f"data.decode must be 'lazy' or 'eager', got {decode!r}")
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
        self.decode = decode
        self.class_names: list[str] = []

        self.train_dataset: MediaDataset | LazyMediaDataset | None = None
        self.val_dataset: MediaDataset | LazyMediaDataset | None = None
        self.test_dataset: MediaDataset | LazyMediaDataset | None = None
        # Per split: the file path (or "synthetic:<clip>") of every item, for tracing a sample back.
        self.item_sources: dict[str, list[str]] = {}
        self.bad_files: list[str] = []
        self.bad_file_reasons: dict[str, str] = {}
        self.num_short_skipped = 0  # clips/recordings shorter than wanted and dropped (short_clip=skip)
        self._short_files: set[str] = set()
        self._restored_skips: list[tuple[str, str, str]] = []  # from a checkpoint (lazily found files)
        self._train_sampler: ResumableSampler | None = None
        self._pending_sampler_state: dict | None = None

    @property
    def is_synthetic(self) -> bool:
        return self.source == "synthetic"

    @property
    def is_lazy(self) -> bool:
        """Files decoded per item (decode="lazy"); synthetic data is always in memory."""
        return self.decode == "lazy" and not self.is_synthetic

    @property
    def num_bad_files(self) -> int:
        """Distinct files left out by on_bad_file=skip: found in setup, or (lazy) by the batches used so far."""
        return len(self.bad_files)

    # -- subclass hooks ------------------------------------------------------------

    def _synthetic_groups(self) -> tuple[list[torch.Tensor], list[int], list[str]]:
        """Stacked items per synthetic clip, the clip labels, and the class names."""
        raise NotImplementedError

    def _file_decoder(self) -> Callable[[Path], torch.Tensor]:
        """Picklable function: path -> stacked items of the file (none for a short clip that
        short_clip=skip leaves out); MediaDecodeError for a bad file."""
        raise NotImplementedError

    def _file_items(self, path: Path) -> torch.Tensor:
        """Stacked items of one file (possibly none); MediaDecodeError for a bad file."""
        return self._file_decoder()(path)

    def _file_item_count(self, path: Path) -> int:
        """Items `_file_items(path)` gives, known without decoding the file (lazy setup)."""
        return 1

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

    def _list_files(self) -> tuple[list[Path], list[int]]:
        """The source's files and their labels (sets class_names and num_classes)."""
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
        return files, labels

    def _bad_in_setup(self, path: Path, e: MediaDecodeError) -> None:
        if self.on_bad_file == "error":
            raise MediaDecodeError(
                f"{e} (bad {self.modality} file; set data.on_bad_file=skip to leave such files out)"
            ) from e
        log.warning("skipping bad %s file: %s", self.modality, e)
        self.bad_files.append(str(path))
        self.bad_file_reasons[str(path)] = str(e)

    def _check_not_all_bad(self, num_files: int) -> None:
        if self.bad_files and len(self.bad_files) == num_files:
            raise ValueError(
                f"all {num_files} {self.modality} files of data source {self.source!r} are bad "
                f"(first: {self.bad_file_reasons[self.bad_files[0]]})"
            )
        if self.bad_files:
            log.warning("left out %d bad %s file(s) of %d", len(self.bad_files), self.modality, num_files)

    def _scan_files(self, read: Callable[[Path], Any], size: Callable[[Any], int]) -> tuple[list, list[int], list[str]]:
        """`read` every listed file (None for a skipped bad file; `size` of a result 0 = a short file
        counted and left out); labels and names of the groups."""
        files, labels = self._list_files()
        results: list = []
        for path in files:
            try:
                self._check_suffix(path)
                result = read(path)
            except MediaDecodeError as e:
                self._bad_in_setup(path, e)
                result = None
            if result is not None and size(result) == 0:
                self._short_files.add(str(path))
                self.num_short_skipped += 1
            results.append(result)
        self._check_not_all_bad(len(files))
        return results, labels, [str(f) for f in files]

    def _load_files(self) -> tuple[list[torch.Tensor | None], list[int], list[str]]:
        """Eager setup: decode every file (None for a skipped bad file); labels and names of the groups."""
        return self._scan_files(self._file_items, lambda items: items.shape[0])

    def _count_files(self) -> tuple[list[int | None], list[int], list[str]]:
        """Lazy setup: items per file without decoding it (None for a skipped bad file); labels; names."""
        return self._scan_files(self._file_item_count, int)

    def _build(self) -> None:
        self.bad_files, self.bad_file_reasons, self.num_short_skipped = [], {}, 0
        self._short_files = set()
        if self.is_synthetic:
            groups, labels, names = self._synthetic_groups()
            self.class_names = names
            self.num_classes = len(names)
            group_names = [f"synthetic:{i}" for i in range(len(groups))]
        elif self.is_lazy:
            groups, labels, group_names = self._count_files()
        else:
            groups, labels, group_names = self._load_files()
        self._record_skipped(self._restored_skips)
        train_ids, val_ids, test_ids = split_groups(len(groups), self.val_fraction, self.split_seed,
                                                    self.test_fraction)
        datasets = {}
        for split, ids in (("train", train_ids), ("val", val_ids), ("test", test_ids)):
            datasets[split], self.item_sources[split] = self._split_dataset(split, ids, groups, labels, group_names)
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

    def _split_dataset(self, split: str, ids: list[int], groups: list, labels: list[int],
                       names: list[str]) -> tuple[Dataset, list[str]]:
        """The dataset of one split's groups `ids`, and the source of each of its items.

        groups: per group, its stacked items (eager, synthetic) or its item count (lazy); None = bad file.
        """
        if self.is_lazy:
            dataset = self._lazy_dataset([i for i in ids if groups[i]], groups, labels, names)
            return dataset, list(dataset.files)
        parts, part_labels, sources = [], [], []
        for i in ids:
            items = groups[i]
            if items is None or items.shape[0] == 0:
                continue
            parts.append(items)
            part_labels.append(torch.full((items.shape[0],), labels[i], dtype=torch.long))
            sources.extend([names[i]] * items.shape[0])
        if parts:
            items = torch.cat(parts)
            item_labels = torch.cat(part_labels)
        else:
            items = torch.zeros((0, *self._item_shape()), dtype=self._item_dtype())
            item_labels = torch.zeros(0, dtype=torch.long)
        return MediaDataset(items, item_labels, self.sample_key, type(self)._convert, self._dataset_extra()), sources

    def _lazy_dataset(self, ids: list[int], counts: list[int | None], labels: list[int],
                      names: list[str]) -> LazyMediaDataset:
        files = [names[i] for i in ids for _ in range(counts[i])]
        segments = [k for i in ids for k in range(counts[i])]
        item_labels = torch.tensor([labels[i] for i in ids for _ in range(counts[i])], dtype=torch.long)
        return LazyMediaDataset(files, segments, item_labels, self.sample_key, type(self)._convert,
                                self._file_decoder(), self._dataset_extra(), self.on_bad_file, self.modality)

    # -- files found bad or short while loading (lazy) ---------------------------------

    def _record_skipped(self, entries: Iterable[tuple[str, str, str]]) -> None:
        """Count the (path, kind, reason) entries of files passed over; each file counts once."""
        for path, kind, reason in entries:
            if kind == "bad":
                if path not in self.bad_file_reasons:
                    self.bad_files.append(path)
                    self.bad_file_reasons[path] = reason
            elif path not in self._short_files:
                self._short_files.add(path)
                self.num_short_skipped += 1

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Count the files a lazily decoded batch passed over (in the main process, as batches are used)."""
        skipped = getattr(batch, "skipped", ())
        if skipped:
            self._record_skipped(skipped)
        return batch

    def state_dict(self) -> dict:
        """The sampler position, plus the files found bad or short so far (so the counts carry on)."""
        state = super().state_dict()
        if state and (self.bad_file_reasons or self._short_files):
            state["skipped_files"] = {"bad": dict(self.bad_file_reasons), "short": sorted(self._short_files)}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        skipped = state_dict.get("skipped_files") or {}
        self._restored_skips = ([(p, "bad", r) for p, r in skipped.get("bad", {}).items()]
                                + [(p, "short", "") for p in skipped.get("short", [])])
        self._record_skipped(self._restored_skips)

    def prepare_data(self) -> None:
        """Nothing to download or cache: every rank lists (lazy) or decodes (eager) its data in `setup`."""

    def setup(self, stage: str | None = None) -> None:
        """Check the batch size against the world size, then list the files (lazy) or decode
        everything (eager, synthetic) once (idempotent)."""
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

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
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


# Per-file decoders: module-level functions (bound with functools.partial), so a lazily decoding
# dataset pickles into DataLoader worker processes without its DataModule.


def decode_image_file(path: Path, image_size: int) -> torch.Tensor:
    """One image file -> uint8 [1, 3, image_size, image_size] (shorter side resized, centre-cropped)."""
    img = read_image(path)
    if img.shape[-2:] != (image_size, image_size):
        img = _resize_crop(image_size)(img)
    return img.unsqueeze(0).contiguous()


def fit_clip_length(clip: torch.Tensor, num_frames: int, short_clip: str) -> torch.Tensor | None:
    """[t, ...] -> [num_frames, ...]: cut, pad with the last frame, or None (short_clip=skip)."""
    t = clip.shape[0]
    if t >= num_frames:
        return clip[:num_frames]
    if short_clip == "skip":
        return None
    return torch.cat([clip, clip[-1:].expand(num_frames - t, *clip.shape[1:])])


def decode_video_file(path: Path, num_frames: int, fps: float | None, frame_stride: int, image_size: int,
                      short_clip: str) -> torch.Tensor:
    """One video file -> uint8 [1, num_frames, 3, image_size, image_size], or [0, ...] for a short clip
    that short_clip=skip leaves out."""
    frames, _ = read_video(path, num_frames, fps=fps, stride=frame_stride)
    clip = frames.permute(0, 3, 1, 2)  # [t, 3, H, W]
    if clip.shape[-2:] != (image_size, image_size):
        clip = _resize_crop(image_size)(clip)
    fitted = fit_clip_length(clip, num_frames, short_clip)
    if fitted is None:
        log.info("skipping %s: %d frames, fewer than data.num_frames=%d", path, clip.shape[0], num_frames)
        return clip.new_zeros((0, num_frames, 3, image_size, image_size))
    return fitted.unsqueeze(0).contiguous()


def decode_video_frames(path: Path, num_frames: int | None, fps: float | None, frame_stride: int,
                        image_size: int) -> torch.Tensor:
    """The first `num_frames` kept frames of a video file (all when None; fewer if it is shorter), after
    fps resampling / frame_stride -> uint8 [t, 3, image_size, image_size] (resized, centre-cropped)."""
    frames, _ = read_video(path, num_frames, fps=fps, stride=frame_stride)
    clip = frames.permute(0, 3, 1, 2)  # [t, 3, H, W]
    if clip.shape[-2:] != (image_size, image_size):
        clip = _resize_crop(image_size)(clip)
    return clip.contiguous()


def clip_layout(num_kept: int, num_frames: int, clip_stride: int, clips_per_video: int,
                short_clip: str) -> tuple[int, int]:
    """(clips, spare frames) of a video with num_kept frames (after fps / frame_stride): windows of
    num_frames frames starting every clip_stride frames, at most clips_per_video of them (0 = all that
    fit); spare = the frames after the last window, the room a random offset may use. A video shorter
    than one clip gives one padded clip (short_clip=pad) or none (skip)."""
    if num_kept <= 0:
        return 0, 0
    if num_kept < num_frames:
        return (0 if short_clip == "skip" else 1), 0
    n = 1 + (num_kept - num_frames) // clip_stride
    if clips_per_video > 0:
        n = min(n, clips_per_video)
    return n, num_kept - num_frames - (n - 1) * clip_stride


def window_offset(seed: int, epoch: int, file_index: int, span: int) -> int:
    """Offset in [0, span) of a file's windows in an epoch: a hash of (seed, epoch, file index), so it
    is the same in every process and in a resumed run, and uses no global random state."""
    if span <= 1:
        return 0
    digest = hashlib.blake2b(f"{int(seed)}:{int(epoch)}:{int(file_index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % span


def audio_clip_count(num_samples: int, clip_len: int, short_clip: str) -> int:
    """Clips of clip_len samples `decode_audio_file` cuts from num_samples samples."""
    n_full = num_samples // clip_len
    return n_full if n_full >= 1 or short_clip == "skip" else 1


def decode_audio_file(path: Path, sample_rate: int, clip_len: int, short_clip: str) -> torch.Tensor:
    """One audio file -> float32 [n, clip_len]: consecutive clips (tail dropped); a file shorter than one
    clip is zero-padded (short_clip=pad) or gives none (skip)."""
    wave = read_audio(path, sample_rate).clamp_(-1.0, 1.0)
    n_full = wave.shape[0] // clip_len
    if n_full >= 1:
        return wave[: n_full * clip_len].reshape(n_full, clip_len).clone()
    if short_clip == "skip":
        log.info("skipping %s: %.3fs, shorter than one clip of %.3fs", path, wave.shape[0] / sample_rate,
                 clip_len / sample_rate)
        return wave.new_zeros(0, clip_len)
    return torch.nn.functional.pad(wave, (0, clip_len - wave.shape[0])).unsqueeze(0)


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------


class ImageDataModule(MediaDataModule):
    """`VisualBatch` of images: pixels float32 [B, 3, image_size, image_size] in [-1, 1].

    Files (png, jpg/jpeg, webp) are resized (shorter side) and centre-cropped to image_size.
    Synthetic: every frame of `num_clips` moving-shapes clips of `num_frames` frames is an image,
    labelled with its clip's class (shape x motion, of which a still frame shows the shape), or with
    `labels=attributes` by its main object's colour and shape and its background as one mixed-radix
    class (`captions.attribute_label`; the class names are `captions.attribute_names()`), the targets of
    the visual tokenizer's semantic teacher (`experiment=visual_teacher`).
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
        decode: str = "lazy",
        labels_from_dirs: bool = False,
        num_classes: int = NUM_SHAPE_CLASSES,
        num_clips: int = 64,
        num_frames: int = 8,
        background: str = "mixed",
        labels: str = "class",
    ) -> None:
        super().__init__(source, batch_size, val_fraction, test_fraction, split_seed, seed, data_seed,
                         num_workers, pin_memory, on_bad_file, labels_from_dirs, num_classes, decode=decode)
        self.save_hyperparameters()
        if image_size < 4:
            raise ValueError(f"data.image_size must be >= 4, got {image_size}")
        if num_clips < 1 or num_frames < 1:
            raise ValueError(f"data.num_clips and data.num_frames must be >= 1, got {num_clips}, {num_frames}")
        if labels not in ("class", "attributes"):
            raise ValueError(f"data.labels must be 'class' or 'attributes', got {labels!r}")
        if labels == "attributes" and source != "synthetic":
            raise ValueError("data.labels=attributes reads the synthetic clips' parameters; it needs data.source=synthetic")
        self.image_size = image_size
        self.num_clips = num_clips
        self.num_frames = num_frames
        self.background = background
        self.labels = labels
        self.shape_classes = num_classes  # what the clips are drawn with (num_classes becomes the label count)

    def _item_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    def _synthetic_groups(self):
        videos, labels = render_moving_shapes(self.num_clips, self.num_frames, self.image_size, self.data_seed,
                                              self.shape_classes, self.background)
        groups = list(videos.permute(0, 1, 4, 2, 3).contiguous().unbind(0))  # clip -> [T, 3, H, W]
        if self.labels == "attributes":
            from datamodules.captions import attribute_label, attribute_names

            params = clip_params(self.num_clips, self.num_frames, self.image_size, self.data_seed, self.shape_classes,
                                 self.background)
            return groups, [attribute_label(p) for p in params], attribute_names()
        return groups, labels.tolist(), class_names(self.shape_classes)

    def _file_decoder(self) -> Callable[[Path], torch.Tensor]:
        return partial(decode_image_file, image_size=self.image_size)


# ---------------------------------------------------------------------------
# video
# ---------------------------------------------------------------------------


class VideoDataModule(MediaDataModule):
    """`VisualBatch` of clips: pixels float32 [B, 3, num_frames, image_size, image_size] in [-1, 1].

    Each file (mp4, webm, avi, gif, mkv, mov) gives one clip by default: its first `num_frames` frames
    after resampling to `fps` (None = native rate, every `frame_stride`-th frame), resized (shorter side)
    and centre-cropped to image_size. short_clip: a clip with fewer frames is padded by repeating its
    last frame ("pad") or left out and counted in `num_short_skipped` ("skip"; decode="lazy" finds
    it when the clip is loaded and serves the next item in its place, like a skipped bad file).

    Several clips per file (files only; frames below are kept frames, after fps / frame_stride):
        clips_per_video: at most this many clips per file (0 = as many as fit); clip k holds frames
            [offset + k * clip_stride, offset + k * clip_stride + num_frames). 1 = today's single clip.
        clip_stride: frames between the starts of consecutive clips of a file; None = num_frames
            (adjacent, non-overlapping windows); smaller overlaps, larger leaves gaps.
        random_offset: in the train split, offset = a hash of (seed, epoch, file index) in
            [0, min(clip_stride, spare + 1)), spare = the frames after the file's last window, so the
            number of clips per file (and the data set length) never changes; each epoch sees other
            windows and a resumed run (same seed and epoch) exactly the same ones. val/test: offset 0.
    A file shorter than one clip gives one padded clip or none (short_clip), as above. Every clip of a
    file has its label and its split. With these options the items are a `VideoClipDataset`: eager keeps
    each file's kept frames once, up to the last frame a window can reach (clips_per_video 0: the whole
    file; frames between windows when clip_stride > num_frames, too) and cuts windows as views, so
    overlapping clips cost no extra memory; lazy counts each file's frames in setup (from its packets,
    nothing decoded; a file that cannot be opened is found bad there) and decodes, per item, the file's
    frames up to the window's end (kept for the next clip of the same file). The train loader's sampler
    is then an `EpochTaggedSampler`: indices arrive as (index, epoch), which carries the epoch to the
    worker processes with each index.
    Synthetic: `num_clips` moving-shapes clips of `synthetic_frames` frames (default: just enough for
    num_frames at frame_stride, i.e. (num_frames - 1) * frame_stride + 1); fps and the clip options do
    not apply.
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
        decode: str = "lazy",
        labels_from_dirs: bool = False,
        num_classes: int = NUM_SHAPE_CLASSES,
        num_clips: int = 256,
        synthetic_frames: int | None = None,
        background: str = "mixed",
        clips_per_video: int = 1,
        clip_stride: int | None = None,
        random_offset: bool = False,
    ) -> None:
        super().__init__(source, batch_size, val_fraction, test_fraction, split_seed, seed, data_seed,
                         num_workers, pin_memory, on_bad_file, labels_from_dirs, num_classes, decode=decode)
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
        if clips_per_video < 0:
            raise ValueError(f"data.clips_per_video must be >= 0 (0 = as many as fit), got {clips_per_video}")
        if clip_stride is not None and clip_stride < 1:
            raise ValueError(f"data.clip_stride must be >= 1 or null, got {clip_stride}")
        self.clips_per_video = clips_per_video
        self.clip_stride = clip_stride if clip_stride is not None else num_frames
        self.random_offset = bool(random_offset)
        self.num_frames = num_frames
        self.fps = fps
        self.frame_stride = frame_stride
        self.image_size = image_size
        self.short_clip = short_clip
        self.num_clips = num_clips
        self.synthetic_frames = synthetic_frames
        self.background = background

    def _item_shape(self) -> tuple[int, ...]:
        return (self.num_frames, 3, self.image_size, self.image_size)

    def _fit_length(self, clip: torch.Tensor) -> torch.Tensor | None:
        """[t, ...] -> [num_frames, ...]: cut, pad with the last frame, or None (skipped and counted)."""
        fitted = fit_clip_length(clip, self.num_frames, self.short_clip)
        if fitted is None:
            self.num_short_skipped += 1
        return fitted

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

    def _file_decoder(self) -> Callable[[Path], torch.Tensor]:
        return partial(decode_video_file, num_frames=self.num_frames, fps=self.fps, frame_stride=self.frame_stride,
                       image_size=self.image_size, short_clip=self.short_clip)

    # -- several / offset windows per file (clips_per_video != 1 or random_offset) ----------------

    @property
    def uses_windows(self) -> bool:
        """Files are cut into windows by `VideoClipDataset` (else: one clip from the first frame, as
        `decode_video_file` gives it)."""
        return not self.is_synthetic and (self.clips_per_video != 1 or self.random_offset)

    def _layout(self, num_kept: int) -> tuple[int, int]:
        return clip_layout(num_kept, self.num_frames, self.clip_stride, self.clips_per_video, self.short_clip)

    def _frames_needed(self) -> int | None:
        """Kept frames that can reach a window (None = all): decoding stops there."""
        if self.clips_per_video == 0:
            return None
        spare = self.clip_stride - 1 if self.random_offset else 0
        return (self.clips_per_video - 1) * self.clip_stride + self.num_frames + spare

    def _file_items(self, path: Path) -> torch.Tensor:
        """Eager: with windows, the file's kept frames [t, 3, H, W] (padded to num_frames when short and
        short_clip=pad, none when skip); else its one clip."""
        if not self.uses_windows:
            return super()._file_items(path)
        frames = decode_video_frames(path, self._frames_needed(), self.fps, self.frame_stride, self.image_size)
        if frames.shape[0] < self.num_frames:
            fitted = fit_clip_length(frames, self.num_frames, self.short_clip)
            if fitted is None:
                log.info("skipping %s: %d frames, fewer than data.num_frames=%d", path, frames.shape[0],
                         self.num_frames)
                return frames[:0]
            frames = fitted.contiguous()
        return frames

    def _count_files(self) -> tuple[list[int | None], list[int], list[str]]:
        """Lazy: with windows, the frame count of every file (from its packets), else one item per file."""
        if not self.uses_windows:
            return super()._count_files()
        return self._scan_files(partial(video_frame_count, fps=self.fps, frame_stride=self.frame_stride),
                                lambda count: self._layout(count)[0])

    def _split_dataset(self, split: str, ids: list[int], groups: list, labels: list[int],
                       names: list[str]) -> tuple[Dataset, list[str]]:
        if not self.uses_windows:
            return super()._split_dataset(split, ids, groups, labels, names)
        moving = self.random_offset and split == "train"
        files, segments, file_ids, spans, item_labels = [], [], [], [], []
        kept: dict[str, torch.Tensor] | None = None if self.is_lazy else {}
        for i in ids:
            group = groups[i]
            if group is None:  # a bad file, left out
                continue
            num_clips, spare = self._layout(group if self.is_lazy else group.shape[0])
            span = min(self.clip_stride, spare + 1) if moving else 1
            for k in range(num_clips):
                files.append(names[i])
                segments.append(k)
                file_ids.append(i)
                spans.append(span)
                item_labels.append(labels[i])
            if kept is not None and num_clips:
                kept[names[i]] = group
        decode = partial(decode_video_frames, fps=self.fps, frame_stride=self.frame_stride,
                         image_size=self.image_size)
        dataset = VideoClipDataset(
            files, segments, torch.tensor(item_labels, dtype=torch.long), self.sample_key, type(self)._convert,
            decode, file_ids=file_ids, spans=spans, num_frames=self.num_frames, clip_stride=self.clip_stride,
            short_clip=self.short_clip, seed=self.seed, frames=kept, extra=self._dataset_extra(),
            on_bad_file=self.on_bad_file, modality=self.modality)
        return dataset, list(files)

    def _loader(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, drop_last: bool) -> DataLoader:
        if isinstance(dataset, VideoClipDataset) and dataset.epoch_dependent:
            sampler = EpochTaggedSampler(sampler)  # the window offsets follow the sampler's epoch
        return super()._loader(dataset, sampler, batch_size, drop_last)


# ---------------------------------------------------------------------------
# audio
# ---------------------------------------------------------------------------


AUDIO_LABELS = ("class", "voice", "class_voice")


def audio_label_count(labels: str, num_classes: int, speakers: int) -> int:
    """How many labels the audio DataModule's `labels` gives: the sound classes, the voices, or
    one per (class, voice) pair. Raises, naming the keys, for an unknown kind or voices without speakers."""
    if labels not in AUDIO_LABELS:
        raise ValueError(f"data.labels must be one of {AUDIO_LABELS}, got {labels!r}")
    if labels == "class":
        return int(num_classes)
    if int(speakers) < 1:
        raise ValueError(f"data.labels={labels!r} labels the voices: it needs data.speakers >= 1, got {speakers}")
    return int(speakers) if labels == "voice" else int(num_classes) * int(speakers)


class AudioDataModule(MediaDataModule):
    """`AudioBatch`: waveform float32 [B, clip_seconds * sample_rate] in [-1, 1], mono.

    Files (wav, flac, ogg) are mixed to mono, resampled to sample_rate and cut into consecutive
    clips of clip_seconds; the remainder after the last full clip is dropped. A file shorter than
    one clip is zero-padded ("pad") or left out and counted in `num_short_skipped` ("skip").
    decode="lazy": setup counts each file's clips from its header; a clip decodes its whole file
    (kept while the next clip of the same file is loaded).
    Synthetic: `num_clips` clips of the five synthetic sound classes (the first num_classes of them);
    `speakers` N > 0 renders them in a bank of N voices (`synthetic_audio.voice_params`; 0 = the plain
    clips), as the multimodal corpus does with its `speakers`, so a tokenizer can learn the voices
    ERNIE 5.0's speaker token conditions on.
    `labels` (synthetic): "class" = the sound class (default); "voice" = the voice (needs `speakers`);
    "class_voice" = both as one label, class * speakers + voice (`audio_label_count` gives how many), so a
    teacher trained on them (`experiment=audio_teacher data.labels=class_voice data.speakers=4`) names
    the voice as well as the sound.
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
        decode: str = "lazy",
        labels_from_dirs: bool = False,
        num_classes: int = len(AUDIO_CLASSES),
        num_clips: int = 256,
        speakers: int = 0,
        labels: str = "class",
    ) -> None:
        super().__init__(source, batch_size, val_fraction, test_fraction, split_seed, seed, data_seed,
                         num_workers, pin_memory, on_bad_file, labels_from_dirs, num_classes, decode=decode)
        self.save_hyperparameters()
        _check_short_clip(short_clip)
        if not isinstance(speakers, int) or isinstance(speakers, bool) or speakers < 0:
            raise ValueError(f"data.speakers must be an integer >= 0, got {speakers!r}")
        if speakers and source != "synthetic":
            raise ValueError(f"data.speakers={speakers} renders the synthetic sounds in voices; with "
                             f"data.source={source!r} the voices are the files' own: set data.speakers=0")
        audio_label_count(labels, num_classes, speakers)  # voices need speakers, which need the synthetic source
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
        self.speakers = speakers
        self.labels = labels

    def _item_shape(self) -> tuple[int, ...]:
        return (self.clip_len,)

    def _item_dtype(self) -> torch.dtype:
        return torch.float32

    def _dataset_extra(self) -> dict:
        return {"sample_rate": self.sample_rate}

    def _collate_fn(self) -> Callable:
        return collate_audio

    def _synthetic_groups(self):
        waves, labels, names, params = render_synthetic_audio(
            self.num_clips, self.clip_len / self.sample_rate, self.sample_rate, self.data_seed, self.num_classes,
            return_params=True, voices=self.speakers)
        labels = labels.tolist()
        if self.labels != "class":
            voices = [p["voice"] for p in params]
            voice_names = [f"voice{v}" for v in range(self.speakers)]
            if self.labels == "voice":
                labels, names = voices, voice_names
            else:
                labels = [c * self.speakers + v for c, v in zip(labels, voices)]
                names = [f"{c}/{v}" for c in names for v in voice_names]
        return list(waves.unsqueeze(1).unbind(0)), labels, names

    def _file_decoder(self) -> Callable[[Path], torch.Tensor]:
        return partial(decode_audio_file, sample_rate=self.sample_rate, clip_len=self.clip_len,
                       short_clip=self.short_clip)

    def _file_item_count(self, path: Path) -> int:
        # From the header alone; a file whose samples fall short of it is found bad when decoded.
        return audio_clip_count(audio_num_samples(path, self.sample_rate), self.clip_len, self.short_clip)
