"""Encode a data set with a frozen tokenizer checkpoint into a sharded token cache.

    python tools/tokenize_dataset.py TOKENIZER.ckpt OUT_DIR data=video data.num_clips=256
    python tools/tokenize_dataset.py AUDIO_TOKENIZER.ckpt OUT_DIR data=audio --shard-size 128

Trailing `key=value` arguments are Hydra overrides of conf/train.yaml (only the `data` group is
used), so a cache is built from exactly the data a training run would see. Shards are written
atomically and listed in OUT_DIR/manifest.json as they complete; re-running the same command after
an interruption skips the complete shards. Train AR models on the cache with `data=tokens
data.cache_dir=OUT_DIR data.tokenizer_ckpt=TOKENIZER.ckpt`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from datamodules.token_cache import TokenCacheWriter, data_fingerprint  # noqa: E402
from models.tokenizers.checkpoint import load_media_tokenizer  # noqa: E402

log = logging.getLogger("tokenize_dataset")


def compose_data_config(overrides: list[str]):
    """The `data` node of conf/train.yaml under these overrides, resolved."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lit_modules.schemas import register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=overrides)
    GlobalHydra.instance().clear()
    return OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))


@torch.no_grad()
def encode_batch(tokenizer, kind: str, batch, features: bool) -> dict:
    if kind == "visual":
        z = tokenizer.encode_features(batch.pixels)
        out = {"tokens": tokenizer.features_to_tokens(z)}
        if features:
            out["features"] = z.float()
        return out
    codes = tokenizer.encode(batch.waveform)
    return {"tokens": [codes.long()]}


def tokenize(tokenizer_ckpt: str, out_dir: str, overrides: list[str], shard_size: int = 64, batch_size: int = 16,
             splits: tuple[str, ...] = ("train", "val", "test"), features: bool = True, overwrite: bool = False,
             stop_after_shards: int | None = None) -> dict:
    """Build (or resume) the cache; returns a summary {split: {items, shards, written, skipped}}."""
    if shard_size < 1 or batch_size < 1:
        raise ValueError("--shard-size and --batch-size must be >= 1")
    tokenizer, info = load_media_tokenizer(tokenizer_ckpt)
    data_cfg = compose_data_config(overrides)
    dm = hydra.utils.instantiate(data_cfg, _convert_="all")
    dm.setup("fit")
    if info["kind"] == "visual" and not hasattr(dm, "train_dataset"):
        raise ValueError("a visual tokenizer needs an image or video data config")
    manifest_base = {
        "tokenizer": {k: info[k] for k in ("kind", "config", "digest", "checkpoint_sha256")},
        "data": {"config": OmegaConf.to_container(data_cfg), "class_names": list(getattr(dm, "class_names", [])),
                 "num_classes": int(getattr(dm, "num_classes", 0)),
                 "fingerprint": data_fingerprint(OmegaConf.to_container(data_cfg), getattr(dm, "item_sources", None))},
        "features": bool(features and info["kind"] == "visual"),
    }
    writer = TokenCacheWriter(Path(out_dir), manifest_base, overwrite=overwrite)
    collate = dm._collate_fn()
    summary: dict = {}
    written_total = 0
    for split in splits:
        dataset = getattr(dm, f"{split}_dataset", None)
        if dataset is None:
            continue
        if split == "test" and dataset is getattr(dm, "val_dataset", None):
            continue  # no separate test split: the val shards serve both
        n = len(dataset)
        num_shards = math.ceil(n / shard_size)
        done = writer.done_shards(split, n, shard_size)
        summary[split] = {"items": n, "shards": num_shards, "skipped": done, "written": 0}
        for i in range(done, num_shards):
            if stop_after_shards is not None and written_total >= stop_after_shards:
                summary["stopped_early"] = True
                return summary
            ids = list(range(i * shard_size, min(n, (i + 1) * shard_size)))
            loader = DataLoader(Subset(dataset, ids), batch_size=batch_size, shuffle=False, collate_fn=collate)
            parts: dict[str, list] = {}
            labels, index = [], []
            for batch in loader:
                enc = encode_batch(tokenizer, info["kind"], batch, manifest_base["features"])
                for key, val in enc.items():
                    parts.setdefault(key, []).append(val)
                labels.append(batch.labels)
                index.append(batch.index)
            payload = {"tokens": [torch.cat([p[k] for p in parts["tokens"]]) for k in range(len(parts["tokens"][0]))],
                       "labels": torch.cat(labels), "index": torch.cat(index)}
            if "features" in parts:
                payload["features"] = torch.cat(parts["features"])
            writer.write_shard(split, i, payload, num_shards)
            summary[split]["written"] += 1
            written_total += 1
            log.info("%s: shard %d/%d (%d items)", split, i + 1, num_shards, len(ids))
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tokenizer_ckpt")
    p.add_argument("out_dir")
    p.add_argument("overrides", nargs="*", help="Hydra overrides selecting the data, e.g. data=video data.num_clips=64")
    p.add_argument("--shard-size", type=int, default=64, help="items per shard file")
    p.add_argument("--batch-size", type=int, default=16, help="items encoded per forward pass")
    p.add_argument("--splits", default="train,val,test")
    p.add_argument("--no-features", action="store_true", help="visual: do not store the continuous latents "
                   "(VideoAR's cross-frame error correction re-quantizes them)")
    p.add_argument("--overwrite", action="store_true", help="discard a cache built with another tokenizer/data")
    p.add_argument("--stop-after-shards", type=int, default=None, help=argparse.SUPPRESS)  # simulates an interruption
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = tokenize(args.tokenizer_ckpt, args.out_dir, args.overrides, args.shard_size, args.batch_size,
                       tuple(s for s in args.splits.split(",") if s), not args.no_features, args.overwrite,
                       args.stop_after_shards)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
