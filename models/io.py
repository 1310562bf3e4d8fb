"""The one atomic file writer every checkpoint, cache, tokenizer and media file goes through, and the
one safe reader that checkpoints and tokenizers are loaded with.

A run killed mid-write, or a reader on another rank, must never see a half-written file, and the
previous file at the path must survive a failed write: the content goes to a temporary file in the
same directory (so the final `os.replace` is a rename on one file system, atomic on POSIX), is
fsync'ed, renamed over the target, and the directory is fsync'ed so the rename itself is durable.
A failed write removes its temporary file and leaves the target untouched.

Reading (`load_checkpoint`) never unpickles arbitrary objects: a checkpoint someone else wrote may
hold a pickle whose objects run code when rebuilt, so every file goes through
`torch.load(weights_only=True)` (tensors, containers, numbers, strings and the few types torch
allow-lists), and a file that needs anything else is refused with `UnsafeCheckpointError` naming it.
Every checkpoint this project writes loads that way; nothing needs an allow-list. A distributed
(FSDP2) checkpoint directory is read by torch.distributed.checkpoint with plain `pickle.load` (its
`.metadata` file) and `torch.load(weights_only=False)` (its non-tensor entries); `check_dcp_checkpoint`
reads both first, the metadata with an unpickler that knows only the metadata's own types (the one
allow-list here) and every non-tensor entry weights only.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["UnsafeCheckpointError", "atomic_torch_save", "atomic_write", "atomic_write_bytes", "atomic_write_text",
           "check_dcp_checkpoint", "load_checkpoint", "refuse_unsafe_pickle"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], keep_suffix: bool = False) -> Path:
    """Call `write(tmp_path)` to fill a temporary file, then fsync it and rename it over `path`.

    keep_suffix: the temporary name ends in the target's suffix (for writers that pick a format by it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp{path.suffix}" if keep_suffix else ".tmp"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(directory: str | os.PathLike) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save through `atomic_write`."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


class UnsafeCheckpointError(ValueError):
    """A file that `torch.load(weights_only=True)` cannot read: not a checkpoint, or one holding pickled
    objects whose rebuilding could run arbitrary code. The project refuses it instead of unpickling it."""


def _weights_only_reason(error: BaseException) -> str:
    """What torch's weights-only unpickler refused (a global or an opcode), without its advice to re-run unsafely."""
    text = " ".join(str(error).split())
    for marker in ("Unsupported global:", "Trying to load unsupported GLOBAL", "Unsupported operand"):
        if marker in text:
            reason = text[text.index(marker):]
            return reason.split(". ")[0].rstrip(".")
    return text.splitlines()[0][:300] if text else type(error).__name__


def _refusal(path: str | os.PathLike, what: str, error: BaseException) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refusing to load {what} {path}: it is not a plain tensor checkpoint ({_weights_only_reason(error)}). "
        "Either it is not a checkpoint at all, or it holds pickled objects whose unpickling could run arbitrary "
        "code, which this project never unpickles (it loads files with torch.load(weights_only=True))"
    )


@contextlib.contextmanager
def refuse_unsafe_pickle(path: str | os.PathLike, what: str = "checkpoint") -> Iterator[None]:
    """Turn a weights-only unpickling failure raised inside the block into `UnsafeCheckpointError` naming `path`.

    For loaders the project does not call `torch.load` in itself (Lightning's `load_from_checkpoint`,
    `Trainer.fit(ckpt_path=..., weights_only=True)`), which raise torch's bare `pickle.UnpicklingError`.
    """
    try:
        yield
    except pickle.UnpicklingError as e:
        raise _refusal(path, what, e) from e


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", what: str = "checkpoint",
                    mmap: bool = False) -> Any:
    """`torch.load(path, map_location, weights_only=True)` with errors that name the file.

    A missing path raises FileNotFoundError, a directory IsADirectoryError, a file that needs more than
    weights-only unpickling `UnsafeCheckpointError`, any other unreadable file (truncated archive, I/O
    error) ValueError; each names `what` and `path`. mmap: map the tensors' storage instead of reading
    it (zip-format files only).
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory, expected a single checkpoint file")
    try:
        with refuse_unsafe_pickle(path, what):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e


# The globals a torch.distributed.checkpoint `.metadata` pickle is made of (torch 2.11 - 2.14): the
# metadata dataclasses, torch.Size, dtypes and layouts, and the Path the writer recorded.
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                ("pathlib", "PureWindowsPath")}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                            torch.memory_format)):
            return getattr(torch, name)
        if module == _DCP_METADATA_MODULE and not name.startswith("__"):
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == module:  # the module's own classes (dataclasses, enums)
                return obj
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} is not a checkpoint-metadata type")


def _dcp_metadata(directory: Path) -> Any:
    """The directory's `.metadata`, unpickled with `_DCPMetadataUnpickler`; a refusal names the file."""
    path = directory / ".metadata"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {directory} is not a distributed checkpoint directory")
    try:
        return _DCPMetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as e:  # noqa: BLE001 - anything but a clean metadata pickle is refused
        raise _refusal(path, "distributed checkpoint metadata", e) from e


def check_dcp_checkpoint(directory: str | os.PathLike) -> None:
    """Refuse a distributed (FSDP2) checkpoint directory that torch.distributed.checkpoint would unpickle code from.

    Call before handing the directory to torch.distributed.checkpoint: its `.metadata` must hold only
    checkpoint metadata, and every non-tensor entry (stored as a `torch.save` blob that DCP loads with
    weights_only=False) must load weights only. Reads no tensor data. Raises FileNotFoundError (no
    `.metadata`) or `UnsafeCheckpointError`, naming the directory or file.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    directory = Path(directory)
    metadata = _dcp_metadata(directory)
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        raise UnsafeCheckpointError(f"{directory / '.metadata'} is not distributed checkpoint metadata "
                                    f"(got {type(metadata).__name__})")
    blobs = {k: None for k, v in entries.items() if isinstance(v, BytesStorageMetadata)}
    if not blobs:
        return

    refused: list[UnsafeCheckpointError] = []

    class WeightsOnlyBlobPlanner(dcp.DefaultLoadPlanner):
        """Loads the non-tensor entries weights only (torch's own planner uses weights_only=False).

        A refusal is recorded, not raised: DCP would wrap it in a CheckpointException."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            import torch

            fqn = read_item.dest_index.fqn
            try:
                self.state_dict[fqn] = torch.load(value, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - anything but a weights-only blob is refused
                refused.append(_refusal(directory, f"distributed checkpoint entry {fqn!r} of", e))

    planner = WeightsOnlyBlobPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": reading on one process is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(blobs, storage_reader=dcp.FileSystemReader(directory), planner=planner, no_dist=True)
    if refused:
        raise refused[0]
