"""Token caches: a data set encoded once by a frozen tokenizer, as sharded files plus a manifest.

Layout of a cache directory:
    manifest.json          tokenizer {kind, config, digest, checkpoint_sha256}, data {config,
                           fingerprint, class_names}, and per split the shards written so far
    train-00000.pt ...     {"tokens": [per scale: visual uint8 bits [n, T', h, w, d] or int64
                           indices [n, T', h, w]] | audio int64 codes [n, F, Q], "labels": [n],
                           "index": [n], optional "features": float32 latents [n, d, T', H, W]}

Every shard and every manifest update is written to a temp file and renamed, so an interrupted
run leaves only whole shards, and a re-run resumes after the last one the manifest lists. A cache is
served only to a tokenizer whose weight digest equals the manifest's (`TokenDataModule`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


from models.io import atomic_torch_save, atomic_write
from models.tokenizers.checkpoint import file_sha256

__all__ = ["CACHE_VERSION", "TokenCacheWriter", "data_fingerprint", "read_manifest", "verify_shard"]

log = logging.getLogger(__name__)

CACHE_VERSION = 1
MANIFEST = "manifest.json"

# Data-config fields that change how batches are drawn, never what the items are.
_NON_CONTENT_KEYS = {"batch_size", "seed", "num_workers", "pin_memory", "_target_", "cache_dir"}


def data_fingerprint(data_config: dict, item_sources: Optional[dict] = None) -> str:
    """Hash of what defines the items (data config without loader-only keys, plus item provenance)."""
    content = {k: v for k, v in sorted(data_config.items()) if k not in _NON_CONTENT_KEYS}
    h = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode())
    if item_sources:
        h.update(json.dumps(item_sources, sort_keys=True).encode())
    return h.hexdigest()[:20]


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)

    atomic_write(cache_dir / MANIFEST, write)


def read_manifest(cache_dir: str | os.PathLike) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no token cache at {cache_dir} (missing {MANIFEST}); build it with tools/tokenize_dataset.py")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"token cache manifest {path} is unreadable: {e}") from e
    if manifest.get("version") != CACHE_VERSION:
        raise ValueError(f"token cache {cache_dir} has format version {manifest.get('version')}, expected {CACHE_VERSION}; rebuild it")
    return manifest


def verify_shard(cache_dir: Path, entry: dict) -> Path:
    """The shard's path, after checking it exists and its bytes hash to what the manifest recorded."""
    path = Path(cache_dir) / entry["file"]
    if not path.is_file():
        raise ValueError(f"token cache shard {path} listed in the manifest is missing")
    if file_sha256(path) != entry["sha256"]:
        raise ValueError(f"token cache shard {path} is corrupt (its sha256 differs from the manifest's)")
    return path


@dataclass
class TokenCacheWriter:
    """Writes shards of one split and keeps the manifest current; resumes a partial cache.

    manifest_base: the tokenizer and data entries; a cache dir whose existing manifest differs in
    either is refused (pass overwrite=True to start it again).
    """

    cache_dir: Path
    manifest_base: dict
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir)
        path = self.cache_dir / MANIFEST
        if path.is_file() and not self.overwrite:
            old = read_manifest(self.cache_dir)
            for key in ("tokenizer", "data"):
                if old[key] != self.manifest_base[key]:
                    what = "tokenizer digest" if key == "tokenizer" else "data fingerprint"
                    raise ValueError(
                        f"{self.cache_dir} already holds a token cache with another {key} "
                        f"({what} {old[key].get('digest') or old[key].get('fingerprint')} vs "
                        f"{self.manifest_base[key].get('digest') or self.manifest_base[key].get('fingerprint')}); "
                        "use another directory or --overwrite"
                    )
            self.manifest = old
        else:
            if path.is_file():
                for f in self.cache_dir.glob("*.pt"):
                    f.unlink()
            self.manifest = {"version": CACHE_VERSION, **self.manifest_base, "splits": {}}
            write_manifest(self.cache_dir, self.manifest)

    def done_shards(self, split: str, num_items: int, shard_size: int) -> int:
        """Shards of `split` already written and intact (a shard that fails its hash is redone)."""
        entry = self.manifest["splits"].get(split)
        if entry is None or entry["num_items"] != num_items or entry["shard_size"] != shard_size:
            self.manifest["splits"][split] = {"num_items": num_items, "shard_size": shard_size, "shards": [],
                                              "complete": num_items == 0}
            write_manifest(self.cache_dir, self.manifest)
            return 0
        good = 0
        for shard in entry["shards"]:
            try:
                verify_shard(self.cache_dir, shard)
            except ValueError as e:
                log.warning("%s: rewriting from shard %d", e, good)
                break
            good += 1
        if good < len(entry["shards"]):
            entry["shards"] = entry["shards"][:good]
            entry["complete"] = False
            write_manifest(self.cache_dir, self.manifest)
        return good

    def write_shard(self, split: str, i: int, payload: dict[str, Any], num_shards: int) -> None:
        name = f"{split}-{i:05d}.pt"
        atomic_torch_save(payload, self.cache_dir / name)
        entry = self.manifest["splits"][split]
        entry["shards"].append({"file": name, "items": int(payload["labels"].shape[0]),
                                "sha256": file_sha256(self.cache_dir / name)})
        entry["complete"] = len(entry["shards"]) == num_shards
        write_manifest(self.cache_dir, self.manifest)
