"""Do the visual tokenizer's tokens name what a caption names? (papers.md 4.2: the semantic branch; compare
`model.semantic.teacher=auto` with a plain tokenizer)

    python tools/visual_semantic_probe.py CKPT [--train-clips 1024] [--eval-clips 512] [--frames 9] [--out X.json]

Encodes fresh moving-shapes clips (train: seed 1000, held out: seed 2000; neither is the tokenizer's own
data; a 2D tokenizer sees each clip's first frame), takes the quantized latent (all scales) and trains a
linear probe of the main object's colour and shape and the background on the train clips, scoring it on
the held-out ones. Two feature sets: `latent` (every cell of every latent frame, flattened: where things
are, too) and `pooled` (the latent averaged over cells and frames: what is there, wherever it is). Beside
them, `chance`: always answering the train split's most frequent value. Prints JSON (--out writes it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from datamodules.captions import main_attributes  # noqa: E402
from datamodules.synthetic_shapes import clip_params  # noqa: E402
from lit_modules.visual_tokenizer import load_visual_tokenizer  # noqa: E402
from tools.eval_ernie5 import Probe, _emit, accuracy, majority  # noqa: E402
from tools.tokenizer_colour import fresh_clips  # noqa: E402

FIELDS = ("colour", "shape", "background")


def clip_labels(n: int, frames: int, size: int, seed: int) -> list[dict]:
    """The main object's colour and shape and the background of each fresh clip (`fresh_clips`' draws)."""
    return [main_attributes(p) for p in clip_params(n, frames, size, seed)]


def probe_attributes(tok, train_clips: int = 1024, eval_clips: int = 512, frames: int = 9, size: int = 32,
                     batch: int = 64) -> dict:
    frames = frames if tok.cfg.video else 1
    feats, labels = {}, {}
    for split, n, seed in (("train", train_clips, 1000), ("eval", eval_clips, 2000)):
        x = fresh_clips(n, frames, size, seed)  # [N, 3, T, H, W] in [-1, 1]
        with torch.no_grad():
            z = torch.cat([tok.tokens_to_features(tok.encode(x[s:s + batch] if tok.cfg.video else x[s:s + batch, :, 0]))
                           for s in range(0, n, batch)])  # [N, d, T', h, w]
        feats[split] = {"latent": z.flatten(1), "pooled": z.mean((2, 3, 4))}
        labels[split] = clip_labels(n, frames, size, seed)
    res = {"train_clips": train_clips, "eval_clips": eval_clips, "frames": frames,
           "chance": majority(labels["train"], labels["eval"], FIELDS)}
    for kind in ("latent", "pooled"):
        probe = Probe(feats["train"][kind], {f: [y[f] for y in labels["train"]] for f in FIELDS})
        res[kind] = accuracy(probe.predict(feats["eval"][kind]), labels["eval"])
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--train-clips", type=int, default=1024)
    p.add_argument("--eval-clips", type=int, default=512)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    tok = load_visual_tokenizer(args.ckpt)
    res = probe_attributes(tok, args.train_clips, args.eval_clips, args.frames, args.size)
    return _emit({"ckpt": str(args.ckpt), **res}, args.out)


if __name__ == "__main__":
    main()
