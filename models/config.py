"""Shared helpers of the architecture config dataclasses."""

from __future__ import annotations

from dataclasses import fields
from typing import TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], d: dict, where: str = "model.net") -> T:
    """`cls(**d)`, but an unknown key is an error naming it (and the known ones) under `where`."""
    known = {f.name for f in fields(cls)}
    bad = sorted(set(d) - known)
    if bad:
        raise ValueError(f"unknown {where} keys {bad}; known: {sorted(known)}")
    return cls(**d)


def fill_preset(cfg, presets: dict, where: str = "model.net") -> None:
    """Set every field of `cfg` that is None to its value in `presets[cfg.preset]` (lists copied);
    an unknown preset is an error naming `{where}.preset`."""
    if cfg.preset not in presets:
        raise ValueError(f"{where}.preset must be one of {sorted(presets)}, got {cfg.preset!r}")
    for k, v in presets[cfg.preset].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, list(v) if isinstance(v, list) else v)
