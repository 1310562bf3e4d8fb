"""The one JSONL reader of the DataModules: objects with their 1-based line numbers, errors naming file and line.

Lines are split on "\\n" only (a U+2028 inside a JSON string is not a line break); a leading UTF-8 BOM is
dropped; blank lines are skipped. A line that is not UTF-8, not JSON or not a JSON object is a ValueError
"<file>:<line>: ...". Callers check the fields they need and raise with `where(path, lineno)`.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

__all__ = ["iter_jsonl", "where"]


def where(path: str | os.PathLike, lineno: int) -> str:
    return f"{os.fspath(path)}:{lineno}"


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read data file {os.fspath(path)}: {e.strerror or e}") from e
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where(path, lineno)}: not valid UTF-8 (bad byte at column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where(path, lineno)}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where(path, lineno)}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row
