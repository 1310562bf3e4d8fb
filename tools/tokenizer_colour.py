"""Colour of a visual tokenizer's reconstructions, per number of scales decoded; prints one JSON object.

    python tools/tokenizer_colour.py TOKENIZER.ckpt [--clips 32] [--frames 9] [--size 32] [--seed 7] [--all-frames]

Encodes fresh moving-shapes clips (another data seed than training's 0; an image tokenizer gets
their first frames, or with --all-frames every frame of every clip as an image, the same frames a
video tokenizer sees) and reports `models/tokenizers/metrics.colour_metrics` of the reconstruction
from the first k scales, k = 1 .. K, plus RGB PSNR. A grey reconstruction has chroma_ratio 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.tokenizers.metrics import colour_metrics, psnr  # noqa: E402


def fresh_clips(clips: int, frames: int, size: int, seed: int) -> torch.Tensor:
    """Moving-shapes clips [B, 3, T, H, W] in [-1, 1], as the video DataModule gives them."""
    from datamodules.media import _uint8_to_unit
    from datamodules.synthetic_shapes import render_moving_shapes

    video, _ = render_moving_shapes(clips, frames, size, seed=seed)
    return _uint8_to_unit(video.permute(0, 4, 1, 2, 3))


def tokenizer_input(tok, clips: int, frames: int, size: int, seed: int, all_frames: bool = False) -> torch.Tensor:
    """Fresh clips as `tok` encodes them: [B, 3, T, H, W] for a video tokenizer; for an image tokenizer
    [B, 3, H, W] of the first frames, or of every frame with all_frames."""
    x = fresh_clips(clips, frames, size, seed)
    if not tok.cfg.video:
        x = x.transpose(1, 2).flatten(0, 1) if all_frames else x[:, :, 0]
    return x


@torch.no_grad()
def scale_metrics(tok, x: torch.Tensor) -> list[dict]:
    """Colour metrics and RGB PSNR of the reconstruction of x from the first k scales, k = 1 .. K."""
    tokens = tok.encode(x)
    rows = []
    for k in range(1, len(tokens) + 1):
        rec = tok.decode(tokens[:k])
        if x.dim() == 4:
            rec = rec[:, :, 0]
        rows.append({"k": k, **colour_metrics(rec, x), "psnr": psnr(rec, x)})
    return rows


def report(ckpt: str, clips: int = 32, frames: int = 9, size: int = 32, seed: int = 7,
           all_frames: bool = False) -> dict:
    from lit_modules.visual_tokenizer import load_visual_tokenizer

    tok = load_visual_tokenizer(ckpt)
    x = tokenizer_input(tok, clips, frames, size, seed, all_frames)
    out = {"checkpoint": ckpt, "video": tok.cfg.video, "clips": clips, "seed": seed,
           "frames": frames if tok.cfg.video or all_frames else 1, "scales": scale_metrics(tok, x)}
    out["final"] = out["scales"][-1]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--all-frames", action="store_true", help="image tokenizer: every frame, not the first")
    args = p.parse_args(argv)
    res = report(args.ckpt, args.clips, args.frames, args.size, args.seed, args.all_frames)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
