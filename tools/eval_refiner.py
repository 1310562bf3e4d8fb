"""Evaluate ERNIE 5.0's cascaded diffusion refiner on fresh moving-shapes frames, and on the
backbone's own generated images (the cascade).

    python tools/eval_refiner.py REFINER.ckpt [--num 64] [--steps 25] [--eta 1] [--seed 7] \\
        [--ernie5 ERNIE5.ckpt --prompts 32] [--strip docs/refiner.png] [--out result.json]

Held-out frames: the first frames of `--num` fresh clips (data seed `--seed`, not the training
data's 0) rendered at the refiner's output size are the targets. Their inputs are (a) the targets
area-downsampled (`area`) and (b) those low-resolution frames sent through the refiner's frozen
tokenizer (`tokenizer`, when it was trained with one, or `--tokenizer`): what the backbone would emit if it predicted
every token right. For each: PSNR / SSIM of the refined frames and of bicubic upsampling against
the targets, chroma ratio, sharpness ratio (mean gradient magnitude over the targets') and
consistency PSNR (refined, downsampled again, against its own input).

With `--ernie5`: images generated from the held-out image captions of that checkpoint's corpus, then
refined. There is no target, so it reports consistency PSNR, chroma ratio (refined over the
generated image) and sharpness against real frames of the same size, for refined and bicubic.
`--strip`: a PNG, one column per example; rows: area input (nearest), bicubic, refined, target; then
the tokenizer input (nearest), bicubic, refined; then, with `--ernie5`, generated (nearest), bicubic,
refined.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lit_modules.refiner import refinement_metrics, sharpness  # noqa: E402
from models.io import atomic_write_bytes, atomic_write_text, load_checkpoint  # noqa: E402
from models.refiner import refiner_from_checkpoint  # noqa: E402
from models.tokenizers.metrics import chroma, psnr  # noqa: E402


def held_out_frames(num: int, size: int, seed: int) -> torch.Tensor:
    """First frames [num, 3, size, size] in [-1, 1] of fresh moving-shapes clips."""
    from tools.tokenizer_colour import fresh_clips

    return fresh_clips(num, 1, size, seed)[:, :, 0]


def _round(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


@torch.no_grad()
def evaluate(ckpt: str, num: int = 64, steps: int = 25, seed: int = 7, ernie5: str | None = None,
             prompts: int = 32, strip: str | None = None, examples: int = 8, device: str = "cpu",
             batch: int = 32, eta: float = 1.0, tokenizer: str | None = None) -> dict:
    raw = load_checkpoint(ckpt, map_location=device, what="refiner checkpoint")
    net = refiner_from_checkpoint(raw, ckpt).to(device)
    tok_path = tokenizer or (raw.get("hyper_parameters", {}).get("degrade") or {}).get("tokenizer")
    s = net.cfg.scale
    size, tok = 64, None
    if tok_path and tok_path != "auto":
        from lit_modules.visual_tokenizer import load_visual_tokenizer

        tok = load_visual_tokenizer(tok_path).to(device)
        size = tok.cfg.scales[-1][0] * tok.cfg.spatial_factor * s
    gen = torch.Generator(device=device).manual_seed(seed)

    def refine(low: torch.Tensor) -> torch.Tensor:
        return torch.cat([net.sample(low[i:i + batch], steps, eta, generator=gen) for i in range(0, len(low), batch)])

    target = held_out_frames(num, size, seed).to(device)
    low_area = F.interpolate(target, scale_factor=1 / s, mode="area")
    inputs = {"area": low_area}
    if tok is not None:
        rt = tok.decode(tok.encode(low_area.unsqueeze(2) if tok.cfg.video else low_area)).clamp(-1, 1)
        inputs["tokenizer"] = rt[:, :, 0] if rt.dim() == 5 else rt
    result = {"checkpoint": ckpt, "steps": steps, "eta": eta, "num": num, "size": size, "scale": s, "tokenizer": tok_path,
              "held_out": {}}
    rows = []
    for name, low in inputs.items():
        refined, bicubic = refine(low), net.upsample(low)
        result["held_out"][name] = _round(refinement_metrics(refined, bicubic, target, low))
        k = min(examples, num)
        rows += [F.interpolate(low[:k], scale_factor=s, mode="nearest"), bicubic[:k], refined[:k]]
        rows += [target[:k]] if name == "area" else []
    if ernie5:
        from tools.eval_ernie5 import load

        module, dm = load(ernie5, device)
        caps = [c[0] for c in dm.corpus.splits["val"]["image_captions"]][:prompts]
        samples = []
        # the backbone's draws have their own generator: every refiner and setting sees the same samples
        gen_ar = torch.Generator(device=device).manual_seed(seed)
        for cap in caps:
            _, video = module.render(cap, "image", 1, gen_ar)
            samples.append(video[:, :, 0])
        low = torch.cat(samples).to(device)
        if low.shape[-1] * s != size:
            target = held_out_frames(num, low.shape[-1] * s, seed).to(device)
        refined, bicubic = refine(low), net.upsample(low)
        real_sharp = sharpness(target)
        down = F.interpolate(refined, scale_factor=1 / s, mode="area")
        result["generated"] = _round({
            "prompts": len(caps),
            "consistency_psnr": psnr(down, low),
            "chroma_ratio": chroma(refined) / max(chroma(low), 1e-8),
            "sharpness_vs_real": sharpness(refined) / real_sharp,
            "sharpness_vs_real_bicubic": sharpness(bicubic) / real_sharp,
        })
        k = min(examples, len(caps))
        rows += [F.interpolate(low[:k], scale_factor=s, mode="nearest"), bicubic[:k], refined[:k]]
        result["generated_captions"] = caps[:k]
    if strip:
        from torchvision.utils import make_grid, save_image

        k = rows[0].shape[0]
        grid = make_grid(torch.cat([r[:k] for r in rows]).add(1).div(2).clamp(0, 1).cpu(), nrow=k, padding=1,
                         pad_value=1.0)
        buf = io.BytesIO()
        save_image(grid, buf, format="png")
        atomic_write_bytes(strip, buf.getvalue())
        result["strip"] = strip
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="a refiner checkpoint (experiment=ernie5_refiner)")
    p.add_argument("--num", type=int, default=64, help="held-out frames")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--eta", type=float, default=1.0, help="0 = deterministic DDIM, 1 = ancestral sampling")
    p.add_argument("--seed", type=int, default=7, help="data seed of the held-out frames and sampling seed")
    p.add_argument("--tokenizer", default=None, help="the visual tokenizer of the `tokenizer` inputs (default: the "
                   "one the refiner was trained with, if any)")
    p.add_argument("--ernie5", default=None, help="an ERNIE 5.0 checkpoint whose generated images are refined")
    p.add_argument("--prompts", type=int, default=32, help="held-out captions rendered by --ernie5")
    p.add_argument("--strip", default=None, help="write a PNG of examples here")
    p.add_argument("--examples", type=int, default=8, help="columns of the strip")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    res = evaluate(args.ckpt, args.num, args.steps, args.seed, args.ernie5, args.prompts, args.strip,
                   args.examples, args.device, eta=args.eta, tokenizer=args.tokenizer)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return res


if __name__ == "__main__":
    main()
