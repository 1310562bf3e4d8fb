"""Load frozen media tokenizers from checkpoints, and fingerprint them (pure torch, no Lightning).

A checkpoint holds a `tokenizer` entry `{"kind": "visual" | "audio", "config": {...}}` and either
its own `state_dict` (an export, e.g. tools/inflate_tokenizer.py) or a training checkpoint's
`state_dict` whose keys start with `net.` (the LightningModules store the network as `self.net`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.io import atomic_torch_save, load_checkpoint

__all__ = ["build_tokenizer_from_entry", "file_sha256", "load_media_tokenizer", "save_tokenizer_export",
           "tokenizer_digest"]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_digest(tokenizer: nn.Module, kind: str, config: dict) -> str:
    """Content hash of a tokenizer (kind, config, every weight and buffer): what caches are keyed by.

    Unlike the checkpoint file's hash it does not change when the same weights are saved again.
    """
    h = hashlib.sha256(f"{kind}:{sorted(config.items())!r}".encode())
    state = tokenizer.state_dict()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            t = t.float()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:20]


def build_tokenizer_from_entry(kind: str, config: dict) -> nn.Module:
    if kind == "visual":
        from models.tokenizers.visual import TokenizerConfig, VisualTokenizer

        return VisualTokenizer(TokenizerConfig.from_dict(dict(config)))
    if kind == "audio":
        from models.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig

        cfg = AudioTokenizerConfig.from_dict(dict(config)) if hasattr(AudioTokenizerConfig, "from_dict") \
            else AudioTokenizerConfig(**dict(config))
        return AudioTokenizer(cfg)
    raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'visual' or 'audio')")


def load_media_tokenizer(path: str | os.PathLike, expect_kind: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A frozen eval-mode tokenizer and its info `{kind, config, digest, checkpoint_sha256, path}`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer checkpoint {path} does not exist")
    ckpt = load_checkpoint(path, what="tokenizer checkpoint")  # weights only: never unpickles code
    if not isinstance(ckpt, dict) or "tokenizer" not in ckpt:
        raise ValueError(f"{path} is not a media tokenizer checkpoint (no 'tokenizer' entry)")
    entry = ckpt["tokenizer"]
    kind = entry.get("kind", "visual")
    if expect_kind is not None and kind != expect_kind:
        raise ValueError(f"{path} holds a {kind} tokenizer, expected {expect_kind}")
    tok = build_tokenizer_from_entry(kind, entry["config"])
    if "state_dict" in entry:
        state = entry["state_dict"]
    else:
        state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        tok.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the stored tokenizer config: {e}") from e
    tok.eval().requires_grad_(False)
    info = {"kind": kind, "config": dict(entry["config"]), "digest": tokenizer_digest(tok, kind, dict(entry["config"])),
            "checkpoint_sha256": file_sha256(path), "path": str(path)}
    return tok, info


def save_tokenizer_export(path: str | os.PathLike, tokenizer: nn.Module, kind: str, config: dict) -> None:
    """Write a standalone tokenizer file (config + weights) atomically (`models.io.atomic_torch_save`)."""
    payload = {"tokenizer": {"kind": kind, "config": dict(config), "state_dict": tokenizer.state_dict()}}
    atomic_torch_save(payload, path)
