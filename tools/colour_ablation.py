"""Which part of the causal 3D tokenizer makes training from scratch lose colour (issue 10).

    python tools/colour_ablation.py [--steps 300] [--batch 8] [--time-stride 4] [--time-kernel 3]
        [--current-init 3d|2d] [--past-rate 1.0] [--image-frac 0] [--image-steps 0] [--temporal-warmup 0]
        [--lr 2e-3] [--seed 0] [--video 1] [--frame-ramp K]

A short plain training loop (the tokenizer module's loss: L1 + L2 + 0.25 commit + quant + 0.1
entropy, AdamW betas (0.9, 0.95), 50 warm-up steps, grad clip 1) on the embedded moving-shapes
clips (256 clips, data seed 0), evaluated every `--eval-every` steps on 32 fresh clips (seed 7):
chroma ratio (grey = 0, the input's = 1) and RGB PSNR. Prints one JSON line per evaluation and a
final JSON object. Knobs, all about the causal 3D convolutions (`CausalConv3d`, kernel kt x k x k):

- `--time-kernel 1`: every 3D convolution except the temporal down/upsampling sees only its own frame;
- `--current-init 2d`: the kernel's current-frame slice gets the initialisation of a 2D kernel
  (PyTorch's default uniform bound with the 2D fan-in, as inflation would give it) and the
  past slices start at zero; `3d` is PyTorch's default over the whole kt x k x k kernel;
- `--past-rate a`: the past slices are parametrised as a * w, so Adam moves them a times as fast
  (0 freezes them at their initial value times 0, i.e. no temporal context);
- `--image-frac f`: a fraction f of the steps trains on 1-frame clips (4x the batch, random frames);
- `--temporal-warmup K`: start as the per-frame network (past slices zero, temporal downsampling =
  frame subsampling, temporal upsampling = frame repetition) and keep every temporal weight frozen
  there for the first K steps, then train everything;
- `--ch C`, `--ch-mult M..`, `--dim D`: the encoder/decoder width per level and the code channels
  (preset `small`: 16, 1 2 4, 16), for the capacity question: a 3D down-step that also halves time
  must pass 8 voxels through the channels a 2D one uses for 4 pixels;
- `--static-steps K`: the first K steps train on still clips (a random frame of each clip repeated
  over all its frames): every layer, temporal ones included, trains, but there is no motion to code;
  evaluations then also report the chroma ratio on still versions of the held-out clips;
- `--frame-ramp K`: the reconstruction loss weighs each clip frame the latent frames start from
  (frames 0, tau, 2 tau, ...: what a per-frame start codes) by 1 and every other frame by
  min(1, step / K) (0 from the start: those frames never count; the loss is the weighted mean over
  frames), to ask whether the error on frames the network cannot code yet is what turns it grey;
- `--image-steps K`: the first K steps train on 1-frame clips only (4x the batch, random frames): the
  2D tokenizer's regime inside the 3D network, whose past slices see only the zero padding of a single
  frame; with `--temporal-warmup K` as well this is inflation in one run (a per-frame network trained
  on images, then every weight trained on clips);
- `--image-clips N`: the image steps' 4 x batch frames come from N random clips (4 x batch / N random
  frames of each) instead of one random clip per frame: the number of distinct clips per step, with
  the network, the frames per step and the step count unchanged.

Exploratory: one run is one seed; read differences smaller than the seed spread as noise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

import models.tokenizers.causal_conv as causal_conv  # noqa: E402
from models.tokenizers.metrics import colour_metrics, psnr  # noqa: E402
from models.tokenizers.visual import TokenizerConfig, VisualTokenizer  # noqa: E402


class PastScale(nn.Module):
    """Weight parametrisation [O, I, kt, k, k] -> past slices times `alpha`, current slice as is."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.cat([w[:, :, :-1] * self.alpha, w[:, :, -1:]], dim=2)


@contextlib.contextmanager
def time_kernel_one():
    """Build ResBlock / in / out convolutions with time kernel 1 (temporal resampling unchanged)."""
    original = causal_conv._conv

    def conv(dims, c_in, c_out, kernel=3, stride=1):
        if dims == 3:
            return causal_conv.CausalConv3d(c_in, c_out, kernel, time_kernel=1, stride=stride)
        return original(dims, c_in, c_out, kernel, stride)

    causal_conv._conv = conv
    try:
        yield
    finally:
        causal_conv._conv = original


def _init_like_2d(conv: nn.Conv3d, rows: slice) -> None:
    """Output rows `rows` of the current-frame slice: a fresh 2D-style init (2D fan-in bound)."""
    w = conv.weight
    cur = torch.empty_like(w[rows, :, -1])
    nn.init.kaiming_uniform_(cur, a=math.sqrt(5))  # PyTorch's Conv2d default
    w[rows, :, -1] = cur
    if conv.bias is not None:
        bound = 1.0 / math.sqrt(w.shape[1] * w.shape[3] * w.shape[4])
        nn.init.uniform_(conv.bias[rows], -bound, bound)


def build(args) -> VisualTokenizer:
    cfg = TokenizerConfig(preset="small", video=bool(args.video), time_stride=args.time_stride, ch=args.ch,
                          ch_mult=args.ch_mult, dim=args.dim)
    with time_kernel_one() if args.time_kernel == 1 else contextlib.nullcontext():
        net = VisualTokenizer(cfg)
    # rows of each temporal resampling conv that start as the identity on their own frame
    identity_rows = {}
    for m in net.modules():
        if isinstance(m, causal_conv.TimeDownsample):
            identity_rows[m.conv] = slice(0, m.conv.conv.out_channels)
        elif isinstance(m, causal_conv.TimeUpsample):
            c = m.conv.conv.in_channels
            identity_rows[m.conv] = slice(c, 2 * c)
    for m in net.modules():
        if not isinstance(m, causal_conv.CausalConv3d) or m.kt == 1:
            continue
        conv = m.conv
        with torch.no_grad():
            if args.current_init == "2d":
                ident = identity_rows.get(m)
                if ident is None:
                    _init_like_2d(conv, slice(0, conv.out_channels))
                elif ident.start > 0:
                    _init_like_2d(conv, slice(0, ident.start))
                conv.weight[:, :, :-1].zero_()
            if 0 < args.past_rate != 1.0:
                conv.weight[:, :, :-1].div_(args.past_rate)  # same function at init, slower past slices
        if args.past_rate != 1.0:
            parametrize.register_parametrization(conv, "weight", PastScale(args.past_rate))
    if args.temporal_warmup > 0:
        _per_frame_start(net)
    return net


def _per_frame_start(net: VisualTokenizer) -> None:
    """`per_frame_start_`, with each masked parameter marked for the warm-up (`_warmup_mask`)."""
    params = dict(net.named_parameters())
    for name, mask in causal_conv.per_frame_start_(net).items():
        params[name]._warmup_mask = mask


def frame_weights(frames: int, tau: int, step: int, ramp: int) -> torch.Tensor:
    """Loss weight per clip frame for `--frame-ramp`: 1 on frames 0, tau, 2 tau, ..., min(1, step / ramp)
    on the others (0 when ramp is 0: they never count)."""
    other = min(1.0, step / ramp) if ramp > 0 else 0.0
    return torch.tensor([1.0 if t % tau == 0 else other for t in range(frames)])


def image_batch(train: torch.Tensor, n: int, num_clips: int | None, gen: torch.Generator):
    """n single frames (B, C, 1, H, W) for an image step and the clip each came from: one random clip per
    frame (`num_clips` None, the draw order the earlier runs used) or `num_clips` random clips, n / num_clips
    random frames of each."""
    if num_clips:
        idx = torch.randint(0, train.shape[0], (num_clips,), generator=gen).repeat_interleave(n // num_clips)
    else:
        idx = torch.randint(0, train.shape[0], (n,), generator=gen)
    return train[idx, :, torch.randint(0, train.shape[2], (n,), generator=gen)].unsqueeze(2), idx


def clips(n: int, seed: int) -> torch.Tensor:
    from datamodules.media import _uint8_to_unit
    from datamodules.synthetic_shapes import render_moving_shapes

    video, _ = render_moving_shapes(n, 9, 32, seed=seed)
    return _uint8_to_unit(video.permute(0, 4, 1, 2, 3))


def run(args) -> dict:
    torch.manual_seed(args.seed)
    train, held = clips(args.train_clips, 0), clips(args.eval_clips, 7)
    net = build(args)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    history, t0 = [], time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            net.eval()
            with torch.no_grad():
                x = held if args.video else held[:, :, 0]
                rec = net(x)["recon"]
                m = colour_metrics(rec, x)
                extra = {}
                if args.static_steps:  # the same model on still versions of the held-out clips
                    still = held[:, :, :1].expand_as(held).contiguous()
                    extra["chroma_ratio_still"] = round(colour_metrics(net(still)["recon"], still)["chroma_ratio"], 3)
            net.train()
            history.append({"step": step, "chroma_ratio": round(m["chroma_ratio"], 3), **extra,
                            "psnr": round(psnr(rec, x), 2), "psnr_cbcr": round(m["psnr_cbcr"], 2),
                            "elapsed_s": round(time.time() - t0, 1)})
            print(json.dumps(history[-1]), flush=True)
        if step == args.steps:
            break
        x = train[torch.randint(0, train.shape[0], (args.batch,), generator=gen)]
        if not args.video:
            x = x[:, :, int(torch.randint(0, x.shape[2], (1,), generator=gen))]
        elif step < args.static_steps:  # a still clip: one random frame of each clip, repeated
            f = torch.randint(0, x.shape[2], (args.batch,), generator=gen)
            x = x[torch.arange(args.batch), :, f].unsqueeze(2).expand_as(x).contiguous()
        elif step < args.image_steps or (args.image_frac > 0 and float(torch.rand(1, generator=gen)) < args.image_frac):
            x, _ = image_batch(train, 4 * args.batch, args.image_clips, gen)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 50)
        out = net(x)
        rec = out["recon"]
        if args.frame_ramp is not None and x.shape[2] > 1:
            w = frame_weights(x.shape[2], args.time_stride, step, args.frame_ramp).to(x)
            per_frame = ((rec - x).abs() + (rec - x).pow(2)).mean(dim=(0, 1, 3, 4))
            recon_loss = (w * per_frame).sum() / w.sum()
        else:
            recon_loss = (rec - x).abs().mean() + F.mse_loss(rec, x)
        loss = recon_loss + 0.25 * out["commit_loss"] + out["quant_loss"] + 0.1 * out["entropy_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step < args.temporal_warmup:
            for p in net.parameters():
                mask = getattr(p, "_warmup_mask", None)
                if mask is not None and p.grad is not None:
                    p.grad.mul_(mask)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    config = {k: v for k, v in vars(args).items() if k not in ("eval_every", "eval_clips")}
    return {"config": config, "torch": torch.__version__, "final": history[-1], "history": history}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-clips", type=int, default=256)
    p.add_argument("--eval-clips", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video", type=int, default=1, choices=(0, 1))
    p.add_argument("--time-stride", type=int, default=4)
    p.add_argument("--time-kernel", type=int, default=3, choices=(1, 3))
    p.add_argument("--current-init", default="3d", choices=("3d", "2d"))
    p.add_argument("--past-rate", type=float, default=1.0)
    p.add_argument("--image-frac", type=float, default=0.0)
    p.add_argument("--temporal-warmup", type=int, default=0)
    p.add_argument("--image-steps", type=int, default=0)
    p.add_argument("--image-clips", type=int, default=None,
                   help="image steps draw their 4 x batch frames from N clips (default: one clip per frame)")
    p.add_argument("--static-steps", type=int, default=0,
                   help="the first K steps train on still clips (one random frame repeated): motion removed")
    p.add_argument("--frame-ramp", type=int, default=None,
                   help="weigh frames off the latent grid (t %% tau != 0) by min(1, step / K); 0 = never")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--ch", type=int, default=None, help="base channels (preset small: 16)")
    p.add_argument("--ch-mult", type=int, nargs="+", default=None, help="per-level multipliers (small: 1 2 4)")
    p.add_argument("--dim", type=int, default=None, help="code channels (small: 16)")
    args = p.parse_args(argv)
    if args.past_rate < 0:
        p.error("--past-rate must be >= 0")
    if args.image_steps and not args.video:
        p.error("--image-steps needs --video 1")
    if args.image_clips is not None and (args.image_clips < 1 or (4 * args.batch) % args.image_clips):
        p.error("--image-clips must be a positive divisor of 4 x --batch")
    if args.image_clips and not (args.image_steps or args.image_frac):
        p.error("--image-clips needs --image-steps or --image-frac")
    if args.temporal_warmup and (args.past_rate != 1.0 or args.time_kernel == 1):
        p.error("--temporal-warmup takes neither --past-rate nor --time-kernel 1")
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return result


if __name__ == "__main__":
    main()
