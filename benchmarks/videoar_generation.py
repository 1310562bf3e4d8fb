"""VideoAR generation cost: KV-cached vs uncached next-scale decoding, and next-scale vs raster decoding.

1. KV cache: `VideoAR.generate(use_cache=True)` (one pass per (frame, scale) block over the new
   block only, keys/values of earlier blocks cached) against `use_cache=False` (every pass re-runs
   the whole prefix under the block-causal mask). Same model, same generator seed: the sampled tokens
   must be identical and the logits equal up to float32 rounding (goal <= 1e-5); goal speed-up >= 3x.
2. Next-scale vs raster: the same trunk (layers, embeddings, RoPE positions, sequence length)
   decoding the same number of video tokens one token per forward pass (KV-cached, one query token
   per step, its input the embedding of the previous token's sampled bits). Next-scale needs
   frames x scales passes, raster frames x tokens-per-frame.

Timings alternate A and B in one process (order flipped every pair); ratios are medians of per-pair
ratios; a cached-vs-cached pair gives the A/A noise floor. Forward passes are counted with a hook on
the trunk's final norm (called once per trunk forward). The model is untrained (its weights are
jittered so that logits and samples vary): cost and equality do not depend on training.

    python benchmarks/videoar_generation.py            # prints one JSON object
    python benchmarks/videoar_generation.py --quick    # smoke run (tiny presets)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.timing import alternate  # noqa: E402
from models.layers.mask import AttentionMask  # noqa: E402
from models.tokenizers.visual import TokenizerConfig, VisualTokenizer  # noqa: E402
from models.videoar import VideoAR, VideoARConfig, sample_bits  # noqa: E402

GOAL_SPEEDUP = 3.0
GOAL_LOGIT_DIFF = 1e-5


def bench_pair(fn_fast: Callable[[], object], fn_slow: Callable[[], object], repeats: int, device: torch.device,
               warmup: int = 1) -> dict:
    """fast and slow alternately (order flipped every pair); speedup = median over pairs of t_slow / t_fast."""
    ta, tb = alternate(fn_fast, fn_slow, repeats, device, warmup)
    ratios = [b / a for a, b in zip(ta, tb)]
    return {"speedup": statistics.median(ratios), "speedup_spread": [min(ratios), max(ratios)],
            "ms_fast": 1e3 * statistics.median(ta), "ms_slow": 1e3 * statistics.median(tb)}


class PassCounter:
    """Counts trunk forwards (each ends in `model.trunk.norm`) while installed."""

    def __init__(self, model: VideoAR) -> None:
        self.model, self.calls, self.handle = model, 0, None

    def _hook(self, *_):
        self.calls += 1

    def __enter__(self) -> "PassCounter":
        self.calls = 0
        self.handle = self.model.trunk.norm.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@torch.no_grad()
def raster_generate(model: VideoAR, labels: torch.Tensor, num_frames: int,
                    generator: torch.Generator | None = None, temperature: float = 1.0,
                    guidance: float | None = None) -> torch.Tensor:
    """Token-by-token raster decoding on VideoAR's trunk: one forward pass per video token.

    Visits the same video tokens as next-scale decoding (frame, scale, row, col order) with the same
    RoPE positions, scale embeddings and condition prefix; each step feeds one query token (the
    previous token's sampled bits through `word_embed`, as +-1, plus the next token's scale
    embedding; the first is <SOS>) through `model.trunk` against the KV cache of all earlier tokens.
    guidance (constant CFG, as in `generate`): conditional and null-class rows in one batch of 2B.
    Returns bits uint8 [B, L_video, d]. A cost model of raster AR decoding, not a trained sampler.
    """
    B, dev = labels.shape[0], labels.device
    n, d = model.cfg.cond_len, model.cfg.bits
    cfg_on = guidance is not None and guidance != 1.0
    lab = torch.cat([labels, torch.full_like(labels, model.null_class)]) if cfg_on else labels
    pos = model.positions(num_frames, dev)
    prefix, sos = model.condition(lab)
    caches = model.trunk.new_cache(lab.shape[0], n + model.cfg.frame_tokens * num_frames)
    visible = AttentionMask.full()  # the newest token sees every cached one
    model.trunk(prefix, pos[:n], visible, caches)
    scale_vecs = model.scale_emb(model.scale_ids(num_frames, dev))  # [L, C]
    L = scale_vecs.shape[0]
    out = torch.empty(B, L, d, dtype=torch.uint8, device=dev)
    x = (sos + scale_vecs[0])[:, None, :]
    for i in range(L):
        p = n + i
        hid = model.trunk(x, pos[p:p + 1], visible, caches).hidden
        logits = model.head(hid).view(hid.shape[0], 1, d, 2).float()
        if cfg_on:
            logits = logits[B:] + guidance * (logits[:B] - logits[B:])
        bits = sample_bits(logits, temperature, generator=generator)  # [B, 1, d]
        out[:, i] = bits[:, 0]
        if i + 1 < L:
            feat = bits.float() * 2 - 1
            x = model.word_embed(torch.cat([feat, feat]) if cfg_on else feat) + scale_vecs[i + 1]
    return out


def build(preset: str, num_classes: int, device: torch.device, seed: int) -> tuple[VisualTokenizer, VideoAR]:
    torch.manual_seed(seed)
    tok = VisualTokenizer(TokenizerConfig(preset=preset)).eval().to(device)
    torch.manual_seed(seed + 1)
    cfg = VideoARConfig(preset=preset, bits=tok.cfg.dim, scales=tok.cfg.scales, num_classes=num_classes, cond_len=1)
    model = VideoAR(cfg).eval().to(device)
    with torch.no_grad():  # untrained: break the zero-init symmetry of head bias / <SOS> so logits vary
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return tok, model


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny presets, 3 frames, 2 repeats (a smoke run)")
    p.add_argument("--preset", default=None, help="tokenizer and VideoAR preset (default: small; tiny with --quick)")
    p.add_argument("--frames", type=int, default=None, help="latent frames (default 8; 3 with --quick)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (None/1 = off: one pass, batch B)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0 = leave torch's default). Default 1: these ops are too small for OpenMP "
                        "to pay off, and on a shared, oversubscribed CPU every parallel region waits for a "
                        "descheduled thread (measured ~40x slower linears with 2 threads at load 5 on 2 cores)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    threads_before = torch.get_num_threads()
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads_before)  # main() may run inside a test process


def _run(args: argparse.Namespace, device: torch.device) -> dict:
    preset = args.preset or ("tiny" if args.quick else "small")
    frames = args.frames or (3 if args.quick else 8)
    repeats = 2 if args.quick else args.repeats
    load_before = os.getloadavg()[0]

    tok, model = build(preset, num_classes=10, device=device, seed=args.seed)
    labels = torch.arange(args.batch, device=device) % 10
    K = model.K
    frame_tokens = model.cfg.frame_tokens
    video_tokens = frames * frame_tokens

    def gen(use_cache: bool, return_logits: bool = True):
        g = torch.Generator(device=device).manual_seed(args.seed + 7)
        return model.generate(tok.quantizer, labels, frames, guidance=args.guidance, generator=g,
                              use_cache=use_cache, return_logits=return_logits)

    def raster():
        g = torch.Generator(device=device).manual_seed(args.seed + 7)
        return raster_generate(model, labels, frames, generator=g, guidance=args.guidance)

    # -- correctness and pass counts (untimed) --------------------------------------------------
    with PassCounter(model) as c_cached:
        tok_c, logit_c = gen(True)
    with PassCounter(model) as c_uncached:
        tok_u, logit_u = gen(False)
    with PassCounter(model) as c_raster:
        raster_bits = raster()
    tokens_equal = all(torch.equal(a, b) for a, b in zip(tok_c, tok_u))
    max_diff = max((a - b).abs().max().item() for a, b in zip(logit_c, logit_u))
    max_logit = max(a.abs().max().item() for a in logit_c)
    assert raster_bits.shape == (args.batch, video_tokens, model.cfg.bits)

    # -- timings ---------------------------------------------------------------------------------
    cache_pair = bench_pair(lambda: gen(True), lambda: gen(False), repeats, device)
    raster_pair = bench_pair(lambda: gen(True), raster, repeats, device)
    aa = bench_pair(lambda: gen(True), lambda: gen(True), repeats, device)

    # forward passes = decoding steps; the cached paths also run the condition prefix once (trunk_calls)
    ns_passes = frames * K
    raster_passes = video_tokens
    kv = {
        "ms_cached": cache_pair["ms_fast"], "ms_uncached": cache_pair["ms_slow"],
        "speedup_uncached_over_cached": cache_pair["speedup"], "speedup_spread": cache_pair["speedup_spread"],
        "goal_speedup": GOAL_SPEEDUP, "meets_speedup_goal": cache_pair["speedup"] >= GOAL_SPEEDUP,
        "forward_passes": {"cached": c_cached.calls - 1, "uncached": c_uncached.calls},
        "expected_forward_passes": ns_passes,
        "trunk_calls": {"cached": c_cached.calls, "uncached": c_uncached.calls,
                        "note": "cached = 1 prefix pass + decoding passes"},
        "tokens_equal": tokens_equal, "max_abs_logit_diff": max_diff, "max_abs_logit": max_logit,
        "goal_max_abs_logit_diff": GOAL_LOGIT_DIFF, "meets_logit_goal": max_diff <= GOAL_LOGIT_DIFF,
        "logits_dtype": str(logit_c[0].dtype).replace("torch.", ""),
    }
    ns_vs_raster = {
        "forward_passes": {"next_scale": ns_passes, "raster": raster_passes},
        "measured_forward_passes": {"next_scale": c_cached.calls - 1, "raster": c_raster.calls - 1},
        "forward_pass_ratio_raster_over_next_scale": raster_passes / ns_passes,
        "ms_next_scale_cached": raster_pair["ms_fast"], "ms_raster_cached": raster_pair["ms_slow"],
        "speedup_raster_over_next_scale": raster_pair["speedup"], "speedup_spread": raster_pair["speedup_spread"],
        "video_tokens_per_s": {"next_scale": args.batch * video_tokens / (raster_pair["ms_fast"] / 1e3),
                               "raster": args.batch * video_tokens / (raster_pair["ms_slow"] / 1e3)},
        "raster_model": "one query token per forward through model.trunk, KV-cached, same layers / positions / "
                        "sequence length; input = word_embed(previous bits as +-1) + scale embedding",
    }
    out = {
        "benchmark": "videoar_generation",
        "metric": "wall time of VideoAR.generate (KV-cached vs uncached) and of raster decoding on the same trunk; "
                  "median of per-pair ratios, A and B alternated",
        "kv_cache": kv,
        "next_scale_vs_raster": ns_vs_raster,
        "aa_cached_over_cached": {"ratio": aa["speedup"], "spread": aa["speedup_spread"],
                                  "ms_a": aa["ms_fast"], "ms_b": aa["ms_slow"]},
        "config": {"quick": args.quick, "preset": preset, "frames": frames, "scales": [list(s) for s in model.scales],
                   "tokens_per_frame": frame_tokens, "video_tokens": video_tokens, "bits": model.cfg.bits,
                   "batch": args.batch, "guidance": args.guidance, "cond_len": model.cfg.cond_len,
                   "n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model, "n_heads": model.cfg.n_heads,
                   "repeats": repeats, "seed": args.seed, "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
