"""Shared helper of the architecture config dataclasses."""

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
