"""A PNG picture of what the video numbers mean: real clips, their tokenizer reconstructions and
generated samples per class, one row of frames each.

    python tools/clip_strip.py OUT.png --tokenizer TOKENIZER.ckpt [--videoar VIDEOAR.ckpt] \\
        [--clips 3] [--classes 0 1 2] [--seed 7]

Rows, top to bottom: for each of `--clips` fresh moving-shapes clips (data seed `--seed`, not the
training data's 0), the clip and its reconstruction from all scales; then, with `--videoar`, one
generated clip per class in `--classes` (class-conditional, the model's default sampling). Frames
run left to right. The PNG is written atomically.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.io import atomic_write_bytes  # noqa: E402


@torch.no_grad()
def clip_strip(out: str, tokenizer: str | None = None, videoar: str | None = None, clips: int = 3,
               classes: tuple[int, ...] = (0, 1, 2), seed: int = 7, device: str = "cpu") -> dict:
    from torchvision.utils import make_grid, save_image

    from lit_modules.visual_tokenizer import load_visual_tokenizer
    from tools.tokenizer_colour import fresh_clips

    module = None
    if videoar:
        from generate import load_videoar

        module = load_videoar(videoar, device)
        tok = module.tokenizer
    elif tokenizer:
        tok = load_visual_tokenizer(tokenizer).to(device)
    else:
        raise ValueError("give --tokenizer or --videoar (whose tokenizer is used)")
    if not tok.cfg.video:
        raise ValueError(f"{tokenizer}: a video (3D) tokenizer is needed for clip strips")
    size = tok.cfg.scales[-1][0] * tok.cfg.spatial_factor
    frames = 1 + 2 * tok.cfg.time_stride
    real = fresh_clips(clips, frames, size, seed).to(device)
    recon = tok.decode(tok.encode(real)).clamp(-1, 1)
    rows = []
    for i in range(clips):
        rows += [real[i], recon[i]]
    if module is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
        labels = torch.tensor(list(classes), device=device)
        _, fake = module.generate_clips(labels, tok.cfg.latent_frames(frames), gen)
        rows += list(fake.clamp(-1, 1))
    # each row [3, T, H, W] -> T frames; one grid with T columns
    frames_all = torch.cat([r.transpose(0, 1) for r in rows]).add(1).div(2).cpu()
    grid = make_grid(frames_all, nrow=frames, padding=1, pad_value=1.0)
    buf = io.BytesIO()
    save_image(grid, buf, format="png")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return {"out": out, "rows": len(rows), "frames": frames, "size": size}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--tokenizer")
    p.add_argument("--videoar")
    p.add_argument("--clips", type=int, default=3)
    p.add_argument("--classes", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    res = clip_strip(args.out, args.tokenizer, args.videoar, args.clips, tuple(args.classes), args.seed, args.device)
    print(res)
    return res


if __name__ == "__main__":
    main()
