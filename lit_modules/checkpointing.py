"""Atomic checkpoint writing, for single-file and distributed (FSDP2) checkpoints.

A run killed while saving must leave the previous checkpoint at the same path loadable, so nothing
is ever written in place: a file goes to a temporary name in the same directory and is renamed
over the target (`os.replace` is atomic on POSIX); a distributed checkpoint directory is written
beside the target and swapped in.

Reading is weights only (`models.io`): `ckpt_path=` resume and `trainer.test(ckpt_path=...)` never
unpickle arbitrary code, whatever `weights_only` Lightning is given; a checkpoint that would is refused
with `models.io.UnsafeCheckpointError` naming the file.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

from models.io import atomic_torch_save, check_dcp_checkpoint, fsync_dir, load_checkpoint, refuse_unsafe_pickle

__all__ = ["AtomicCheckpointIO", "AtomicModelParallelStrategy", "atomic_torch_save"]


def _refuse_full_unpickling(weights_only: Optional[bool], path: _PATH) -> None:
    if weights_only is False:
        raise ValueError(f"weights_only=False asked for loading {path}: this project loads checkpoints weights only "
                         "and never unpickles arbitrary code (pass weights_only=True or leave it unset)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose writes are atomic and whose reads are weights only (`models.io.load_checkpoint`)."""

    def save_checkpoint(self, checkpoint: dict, path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: _PATH, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """map_location None: tensors go back to the devices they were saved from (Lightning's default)."""
        _refuse_full_unpickling(weights_only, path)
        if "://" in str(path):  # a remote (fsspec) path: Lightning's reader, still weights only
            with refuse_unsafe_pickle(path):
                return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint(path, map_location=map_location)


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy, with distributed checkpoints swapped in atomically.

    A distributed checkpoint is a directory, and two directories cannot be exchanged atomically by
    rename. So `PATH` becomes a symlink to a sibling directory `.PATH.<id>.d`: every rank writes a
    fresh directory, then rank zero re-points the link with one atomic rename and deletes the old
    directory. Loading `PATH` follows the link.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_distributed_checkpoint", True)
        super().__init__(*args, **kwargs)
        self.checkpoint_io = AtomicCheckpointIO()  # used for single-file (consolidated) saves

    def save_checkpoint(self, checkpoint: dict, filepath: _PATH, storage_options: Optional[Any] = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        target = Path(self.broadcast(str(path.with_name(f".{path.name}.{uuid.uuid4().hex}.d"))))
        super().save_checkpoint(checkpoint, target, storage_options)
        self.barrier("atomic_checkpoint_written")
        if self.global_rank == 0:
            old = path.resolve() if path.is_symlink() else None
            if path.exists() and not path.is_symlink():
                # A real file/directory from elsewhere: move it aside, it is replaced below.
                legacy = path.with_name(f".{path.name}.{uuid.uuid4().hex}.old")
                os.replace(path, legacy)
                old = legacy
            link = path.with_name(f".{path.name}.{uuid.uuid4().hex}.lnk")
            os.symlink(target.name, link)
            os.replace(link, path)
            fsync_dir(path.parent)
            if old is not None and old != target:
                _remove(old)
        self.barrier("atomic_checkpoint_swapped")

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Weights only; a distributed checkpoint directory is first checked by `models.io.check_dcp_checkpoint`
        (torch.distributed.checkpoint itself unpickles its metadata and non-tensor entries without limits)."""
        _refuse_full_unpickling(weights_only, checkpoint_path)
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():
            check_dcp_checkpoint(path)
        with refuse_unsafe_pickle(path):
            return super().load_checkpoint(path, weights_only=True)

    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self.is_global_zero:
            _remove(Path(filepath))


def _remove(path: Path) -> None:
    """Remove a checkpoint file, directory, or link together with the directory it points to."""
    if path.is_symlink():
        target = path.resolve()
        path.unlink()
        path = target
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
