"""Inflate a trained 2D (image) tokenizer into the causal 3D (video) tokenizer.

    python tools/inflate_tokenizer.py IMAGE_TOKENIZER.ckpt OUT.pt [--time-stride 4]

Each 2D kernel goes to the temporally last slice of its 3D kernel; the earlier slices and the
temporal down/upsampling layers are freshly initialised (seeded by --seed), the latter as the
identity on a single frame, so the inflated tokenizer tokenizes images exactly as the 2D one did.
Start video training from it with

    python train.py experiment=video_tokenizer model.init_ckpt=OUT.pt

(or let the training module inflate on the fly: `model.inflate_from=IMAGE_TOKENIZER.ckpt`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.tokenizers.checkpoint import load_media_tokenizer, save_tokenizer_export  # noqa: E402
from models.tokenizers.visual import TokenizerConfig, inflate_2d_to_3d  # noqa: E402


def inflate_checkpoint(src: str, out: str, time_stride: int | None = None, seed: int = 0) -> dict:
    """Write the inflated 3D tokenizer to `out`; returns a summary (config, freshly initialised tensors)."""
    image_tok, info = load_media_tokenizer(src, expect_kind="visual")
    cfg = dict(info["config"])
    if cfg.get("video"):
        raise ValueError(f"{src} already holds a video (3D) tokenizer")
    cfg["video"] = True
    if time_stride is not None:
        cfg["time_stride"] = time_stride
    elif cfg.get("time_stride", 1) == 1:
        cfg["time_stride"] = None  # take the preset's temporal stride
    video_cfg = TokenizerConfig.from_dict(cfg)
    torch.manual_seed(seed)
    video_tok, fresh = inflate_2d_to_3d(image_tok, video_cfg)
    save_tokenizer_export(out, video_tok, "visual", video_cfg.to_dict())
    return {"source": src, "out": out, "config": video_cfg.to_dict(), "fresh": fresh}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image_ckpt", help="a 2D tokenizer checkpoint (model.net.video=false)")
    p.add_argument("out", help="where to write the 3D tokenizer (.pt)")
    p.add_argument("--time-stride", type=int, default=None, help="temporal compression (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised temporal weights")
    args = p.parse_args(argv)
    summary = inflate_checkpoint(args.image_ckpt, args.out, args.time_stride, args.seed)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"} | {"time_stride": summary["config"]["time_stride"]},
                     indent=2))
    return summary


if __name__ == "__main__":
    main()
