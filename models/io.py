"""The one atomic file writer every checkpoint, cache, tokenizer and media file goes through.

A run killed mid-write, or a reader on another rank, must never see a half-written file, and the
previous file at the path must survive a failed write: the content goes to a temporary file in the
same directory (so the final `os.replace` is a rename on one file system, atomic on POSIX), is
fsync'ed, renamed over the target, and the directory is fsync'ed so the rename itself is durable.
A failed write removes its temporary file and leaves the target untouched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_torch_save", "atomic_write", "atomic_write_bytes", "atomic_write_text"]


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
