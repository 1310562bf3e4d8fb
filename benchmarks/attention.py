"""The trunk's attention under structured masks: the fast path against the explicit-mask reference.

Two layouts, at about 1k, 2k and 4k tokens:
  video      VideoAR's block-causal layout: a condition token, then frames of scales 1,2,4,8,16
             (341 tokens per frame; 3 / 6 / 12 frames);
  documents  packed documents (lengths 64..512, seeded), causal inside each.
For each: forward + backward of one `models.layers.attention.Attention` (d 256, 8 heads, batch 1),
  fast       the path `attn_impl=auto` takes on this device: `segments` on CPU (one unmasked SDPA
             call per run of queries that sees one contiguous key range), FlexAttention on CUDA;
  reference  SDPA with the explicit [L, L] boolean mask (materialised from the description, which
             the tests check against python-loop constructions).
Timed alternately (A-B, B-A) in one process, median of per-pair ratios, with an A/A pair
(reference vs reference) as the noise floor. Peak memory: on CUDA the allocator's peak; on CPU
the peak resident set (Linux VmHWM, reset before the step) above the resident set before it, in a
fresh process running its first step (so no freed-and-cached memory hides the step's). Mask bytes: the
description (per-token ids, O(L)) plus what the kernel needs materialised (none for segments,
L^2 booleans for the reference, (L/128)^2 block indices for a FlexAttention BlockMask, reported
for comparison even where FlexAttention cannot run the backward, as on CPU).

    python benchmarks/attention.py            # JSON on stdout
    python benchmarks/attention.py --quick    # small sizes, a smoke run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.timing import alternate  # noqa: E402
from models.layers.attention import Attention  # noqa: E402
from models.layers.mask import AttentionMask, MaskPlan, block_layout, flex_available  # noqa: E402
from models.layers.rope import Rotary  # noqa: E402

SCALES = [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16)]
D_MODEL, HEADS = 256, 8


def layout(kind: str, tokens: int, seed: int = 0) -> AttentionMask:
    """The described mask of about `tokens` tokens."""
    if kind == "video":
        frames = max(1, round((tokens - 1) / sum(h * w for h, w in SCALES)))
        block, _ = block_layout(1, SCALES, frames)
        return AttentionMask.blocks(block)
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < tokens:
        n = min(int(torch.randint(64, 513, (1,), generator=g)), tokens - total)
        lengths.append(n)
        total += n
    return AttentionMask.documents(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))


def seq_len(mask: AttentionMask) -> int:
    return (mask.block_ids if mask.block_ids is not None else mask.doc_ids).shape[-1]


def description_bytes(mask: AttentionMask) -> int:
    return sum(t.numel() * t.element_size() for t in (mask.block_ids, mask.doc_ids) if t is not None)


def plan_for(mask: AttentionMask, variant: str, device: torch.device) -> MaskPlan:
    """What one forward builds from the description: the fast path's plan, or the explicit [L, L] mask."""
    L = seq_len(mask)
    if variant == "reference":
        return MaskPlan("dense", dense=mask.dense(L, L, device=device))
    return mask.plan(L, L, impl="flex" if device.type == "cuda" and flex_available() else "segments", device=device)


def make_step(mask: AttentionMask, variant: str, device: torch.device, seed: int = 0):
    """One forward + backward of the attention; the mask (plan) is built inside, as a trunk forward does."""
    torch.manual_seed(seed)
    attn = Attention(D_MODEL, HEADS).to(device)
    L = seq_len(mask)
    rope = Rotary(D_MODEL // HEADS)(torch.arange(L, device=device))
    x = torch.randn(1, L, D_MODEL, device=device, requires_grad=True)

    def step():
        x.grad = None
        attn.zero_grad(set_to_none=True)
        attn(x, rope, plan_for(mask, variant, device)).square().mean().backward()
        return x.grad

    return step


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024.0  # kB -> MiB
    raise KeyError(key)


def _child_peak(kind: str, tokens: int, variant: str, queue) -> None:
    torch.set_num_threads(1)
    step = make_step(layout(kind, tokens), variant, torch.device("cpu"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = _status_mb("VmRSS")
    step()
    queue.put(_status_mb("VmHWM") - before)


def peak_mb(kind: str, tokens: int, variant: str, device: torch.device) -> float:
    if device.type == "cuda":
        step = make_step(layout(kind, tokens), variant, device)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_peak, args=(kind, tokens, variant, q))
    p.start()
    out = q.get(timeout=600)
    p.join()
    return out


def check_equal(mask: AttentionMask, device: torch.device) -> float:
    """Max |difference| of the input gradient between the fast path and the reference."""
    g = [make_step(mask, v, device)().clone() for v in ("fast", "reference")]
    return float((g[0] - g[1]).abs().max())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="~340 / ~680 tokens, 2 repeats, no memory children")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [341, 682] if args.quick else [1024, 2048, 4096]
    repeats = 2 if args.quick else args.repeats
    rows, aa = [], []
    for kind in ("video", "documents"):
        for tokens in sizes:
            mask = layout(kind, tokens)
            L = seq_len(mask)
            ps = {v: plan_for(mask, v, device) for v in ("fast", "reference")}
            fast, ref = make_step(mask, "fast", device), make_step(mask, "reference", device)
            ta, tb = alternate(fast, ref, repeats, device)
            ra, rb = alternate(ref, make_step(mask, "reference", device), repeats, device)
            aa.append(statistics.median(b / a for a, b in zip(ra, rb)))
            flex_bytes = None
            if flex_available():
                flex_bytes = mask.plan(L, L, impl="flex", device=device).nbytes()
            desc = description_bytes(mask)
            row = {
                "layout": kind, "tokens": L, "fast_path": ps["fast"].kind,
                "ms": {"fast": 1e3 * statistics.median(ta), "reference": 1e3 * statistics.median(tb)},
                "speedup_reference_over_fast": statistics.median(b / a for a, b in zip(ta, tb)),
                "mask_bytes": {"fast": desc + ps["fast"].nbytes(), "reference": desc + ps["reference"].nbytes(),
                               "flex_block_mask": None if flex_bytes is None else desc + flex_bytes,
                               "description": desc},
                "max_abs_grad_diff": check_equal(mask, device),
            }
            if not args.quick:
                row["peak_mb"] = {v: peak_mb(kind, tokens, v, device) for v in ("fast", "reference")}
            rows.append(row)
    growth = {}
    for kind in ("video", "documents"):
        r = [x for x in rows if x["layout"] == kind]
        first, last = r[0], r[-1]
        n = last["tokens"] / first["tokens"]
        growth[kind] = {"tokens_ratio": n,
                        "fast_mask_bytes_ratio": last["mask_bytes"]["fast"] / first["mask_bytes"]["fast"],
                        "reference_mask_bytes_ratio": last["mask_bytes"]["reference"] / first["mask_bytes"]["reference"]}
    result = {
        "benchmark": "attention",
        "results": rows,
        "mask_growth_first_to_last_size": growth,
        "aa_ratio_reference_over_reference": statistics.median(aa),
        "aa_spread": [min(aa), max(aa)],
        "config": {"d_model": D_MODEL, "heads": HEADS, "batch": 1, "repeats": repeats, "sizes": sizes,
                   "video_scales": SCALES, "documents": "lengths U[64, 512], seed 0"},
        "torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
