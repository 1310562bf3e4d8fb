"""Model FLOPs utilisation (MFU) of a training step: a dense and an MoE LM, bf16, FSDP2 on one device,
eager and with torch.compile.

MFU = achieved model FLOPs per second / the device's peak. Model FLOPs per token are analytic
(PaLM's convention, as torchtitan reports it):

    6 * activated parameters        (forward 2 + backward 4 per weight; an MoE counts the k experts
                                     a token runs, and the tied LM head; the embedding is a lookup)
  + 12 * n_layers * d_model * seq   (attention scores and values, forward + backward; causal
                                     masking is not halved, so this slightly flatters MFU)

Recomputation (activation checkpointing) and routing/permutation are not model FLOPs: they cost time
and lower MFU. The peak is the dense bf16 tensor-core figure of the device from a table of data-sheet
values (matched on the device name); a device missing from the table is measured with a large bf16
matmul (`peak_source` says which). The measured matmul figure is always reported too: MFU against
it shows how far the model is from what this device and torch actually reach.

The model is wrapped as the LM module does it under trainer=fsdp: blocks compiled first (regional
compilation, `model.compile`), then `models.parallelize.parallelize` (fully_shard per block and at
the root, bf16 compute, fp32 reduce) on a 1-device mesh. Each configuration gets warm-up steps
(compilation happens there), then timed steps of forward + backward + AdamW on random tokens.

    python benchmarks/mfu.py                       # on CUDA; one JSON object (about 2-4 minutes)
    python benchmarks/mfu.py --device cpu --quick  # tiny models on the CPU: the code path, no meaning
Without CUDA (and no --device cpu) it prints a JSON object with `skipped` and exits 0. A run that
fails (out of memory, compiler missing) or would pass --budget-s is reported with `skipped` and the
rest still run. Needs only torch and this repository's models/ (no Lightning, Hydra or media packages).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from models.parallelize import parallelize  # noqa: E402
from models.transformer import Transformer, TransformerConfig, lm_loss  # noqa: E402

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, from the vendors' data sheets. Longest match of
# the lowercase key in the lowercase device name wins ("h100 pcie" before "h100").
PEAK_BF16 = {
    "b200": 2.25e15,
    "gb200": 2.5e15,
    "h200": 989.4e12,
    "gh200": 989.4e12,
    "h100 sxm": 989.4e12,
    "h100 80gb hbm3": 989.4e12,
    "h100 nvl": 835e12,
    "h100 pcie": 756e12,
    "h100": 756e12,  # unknown H100 variant: the lowest
    "h800": 989.4e12,
    "h20": 148e12,
    "a100": 312e12,
    "a800": 312e12,
    "a40": 149.7e12,
    "a10g": 70e12,
    "a10": 125e12,
    "l40s": 362e12,
    "l40": 181e12,
    "l4": 121e12,
    "rtx 6000 ada": 364e12,
    "rtx a6000": 154.8e12,
    "mi300x": 1307e12,
    "mi250x": 383e12,
}

_FULL_DENSE = dict(n_layers=12, d_model=2048, n_heads=16, n_kv_heads=16, vocab_size=32768, max_seq_len=2048)
_QUICK_DENSE = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, vocab_size=256, max_seq_len=64)

# name -> (TransformerConfig fields, batch size, sequence length); each MoE is its dense twin plus the FFN
SIZES = {
    "full": {
        # ~0.67B parameters; ~1.9B total / ~0.67B activated for the MoE (8 experts, top-2, each
        # expert a quarter of the dense FFN... times 2 active = the dense FFN's width).
        "dense": _FULL_DENSE,
        "moe": dict(_FULL_DENSE, ffn="moe", moe=dict(num_experts=8, top_k=2, expert_hidden=2816)),
        "batch_size": 4,
        "seq_len": 2048,
    },
    "quick": {
        "dense": _QUICK_DENSE,
        "moe": dict(_QUICK_DENSE, ffn="moe", moe=dict(num_experts=4, top_k=2, expert_hidden=64)),
        "batch_size": 2,
        "seq_len": 32,
    },
}


def table_peak(device_name: str) -> tuple[float | None, str | None]:
    """(peak bf16 FLOP/s, the table key it matched) for a device name; (None, None) if unknown."""
    name = device_name.lower()
    hits = [k for k in PEAK_BF16 if k in name]
    if not hits:
        return None, None
    key = max(hits, key=len)
    return PEAK_BF16[key], key


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """FLOP/s of an n x n x n matmul in `dtype`, best of `iters` timed calls after one warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(iters + 1):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def flops_per_token(cfg: TransformerConfig, activated_params: int, seq_len: int) -> dict[str, int]:
    params = 6 * activated_params
    attention = 12 * cfg.n_layers * cfg.d_model * seq_len
    return {"params": params, "attention": attention, "total": params + attention}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _init_one_process_group(device: torch.device) -> tuple[object, bool]:
    """A world of one (no network: a file store), and its 1-device mesh for FSDP2."""
    from torch.distributed.device_mesh import init_device_mesh

    created = False
    if not dist.is_initialized():
        store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="mfu_"), "store"), 1)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=0, world_size=1,
                                **({"device_id": device} if device.type == "cuda" else {}))
        created = True
    mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("data_parallel",))
    return mesh, created


def run_one(kind: str, compiled: bool, size: dict, mesh, device: torch.device, mixed_precision: str,
            backend: str, warmup: int, steps: int, peak: float | None, matmul_peak: float, deadline: float) -> dict:
    """One configuration: build, compile (optionally), shard, warm up, time; its MFU."""
    row: dict = {"model": kind, "compiled": compiled}
    torch.manual_seed(0)
    cfg = TransformerConfig(preset="tiny", **size[kind])
    with torch.device(device):
        model = Transformer(cfg)
    counts = model.num_params()
    fpt = flops_per_token(cfg, counts["activated"], size["seq_len"])
    row.update(params_total=counts["total"], params_activated=counts["activated"], flops_per_token=fpt)
    if compiled:
        model.trunk.compile_blocks(backend=backend)  # as lit_modules.trunk: compile each block, then shard
    parallelize(model, mesh, mixed_precision=mixed_precision)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    B, T = size["batch_size"], size["seq_len"]
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> float:
        tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device, generator=gen)
        logits, balance, _ = model(tokens[:, :-1], return_routing=True)
        loss = lm_loss(logits, tokens[:, 1:]) + balance
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    losses = [step() for _ in range(warmup)]
    _sync(device)
    row["warmup_s"] = round(time.perf_counter() - t0, 2)
    times = []
    for i in range(steps):
        if time.perf_counter() > deadline and i >= 2:
            row["note"] = f"time budget reached after {i} timed steps"
            break
        _sync(device)
        t = time.perf_counter()
        losses.append(step())
        _sync(device)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tokens_per_s = B * T / step_s
    achieved = fpt["total"] * tokens_per_s
    row.update(
        tokens_per_step=B * T,
        timed_steps=len(times),
        step_s=round(step_s, 5),
        tokens_per_s=round(tokens_per_s, 1),
        model_tflops_per_s=round(achieved / 1e12, 6),
        # 4 significant digits: a tiny model's MFU on a big GPU is far below 1e-4 and must not round to 0
        mfu=None if peak is None else float(f"{achieved / peak:.4g}"),
        mfu_vs_measured_matmul=float(f"{achieved / matmul_peak:.4g}"),
        loss_first=round(float(losses[0]), 4),
        loss_last=round(float(losses[-1]), 4),
    )
    if device.type == "cuda":
        row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if not all(torch.isfinite(torch.stack(losses)).tolist()):
        raise FloatingPointError(f"non-finite loss in {kind} (compiled={compiled}): {[float(x) for x in losses]}")
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default; skipped with a JSON reason where there is none) or cpu (use with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny models, 1 warm-up and 2 timed steps: the code path only")
    p.add_argument("--models", default="dense,moe", help="comma-separated: dense, moe")
    p.add_argument("--compile", default="off,on", help="comma-separated: off, on")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor; aot_eager with --quick, no C++ compiler needed)")
    p.add_argument("--mixed-precision", default=None, choices=["bf16", "fp16", "fp32"],
                   help="FSDP2 compute dtype (default bf16, also on the CPU: compiling the MoE's grouped GEMM "
                        "needs bf16 there)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="steps before timing (default 3; 1 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 with --quick)")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="configurations not started by then are skipped; a running one stops timing early")
    args = p.parse_args(argv)
    start = time.perf_counter()
    out: dict = {"benchmark": "mfu", "torch": torch.__version__, "quick": args.quick}

    if args.device == "cuda" and not torch.cuda.is_available():
        out["skipped"] = "no CUDA device (torch.cuda.is_available() is False); --device cpu --quick runs the code path"
        print(json.dumps(out, indent=2))
        return out

    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    size = dict(SIZES["quick" if args.quick else "full"])
    if args.batch_size:
        size["batch_size"] = args.batch_size
    if args.seq_len:
        size["seq_len"] = args.seq_len
        for kind in ("dense", "moe"):
            size[kind] = {**size[kind], "max_seq_len": max(size[kind]["max_seq_len"], args.seq_len)}
    mixed = args.mixed_precision or "bf16"
    backend = args.compile_backend or ("aot_eager" if args.quick else "inductor")
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    steps = args.steps if args.steps is not None else (2 if args.quick else 10)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[mixed]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    # the table holds 16-bit tensor-core peaks: fp32 runs (and CPUs) are measured instead
    peak, key = table_peak(name) if device.type == "cuda" and mixed != "fp32" else (None, None)
    matmul_peak = measured_matmul_peak(device, dtype, 8192 if device.type == "cuda" and not args.quick else 256,
                                       iters=10 if device.type == "cuda" else 3)
    if peak is None:
        peak, source = matmul_peak, f"measured {mixed} matmul (device not in the table)"
    else:
        source = f"table: {key} dense bf16"
    out.update(
        device=name,
        parallelism="FSDP2 fully_shard (models.parallelize) on a 1-device mesh",
        mixed_precision=mixed,
        compile_backend=backend,
        batch_size=size["batch_size"],
        seq_len=size["seq_len"],
        warmup_steps=warmup,
        timed_steps=steps,
        peak_flops=peak,
        peak_source=source,
        measured_matmul_flops=round(matmul_peak),
        flops_convention="6 * activated params + 12 * n_layers * d_model * seq_len per token (PaLM; causal not halved)",
    )

    mesh, created = _init_one_process_group(device)
    deadline = start + args.budget_s
    results = []
    try:
        for kind in [m.strip() for m in args.models.split(",") if m.strip()]:
            if kind not in ("dense", "moe"):
                raise ValueError(f"--models: {kind!r} is not one of dense, moe")
            for flag in [c.strip() for c in args.compile.split(",") if c.strip()]:
                if flag not in ("off", "on"):
                    raise ValueError(f"--compile: {flag!r} is not one of off, on")
                compiled = flag == "on"
                if time.perf_counter() > deadline:
                    results.append({"model": kind, "compiled": compiled, "skipped": f"time budget --budget-s={args.budget_s} spent"})
                    continue
                try:
                    results.append(run_one(kind, compiled, size, mesh, device, mixed, backend, warmup, steps,
                                           peak, matmul_peak, deadline))
                except Exception as e:  # OOM, no compiler, unsupported kernel: report it, run the rest
                    results.append({"model": kind, "compiled": compiled,
                                    "skipped": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"})
                    traceback.print_exc(file=sys.stderr)
                finally:
                    if compiled:
                        torch._dynamo.reset()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    finally:
        if created:
            dist.destroy_process_group()
    out["results"] = results
    step = {(r["model"], r["compiled"]): r.get("step_s") for r in results}
    out["compile_speedup"] = {kind: round(step[kind, False] / step[kind, True], 3) for kind in ("dense", "moe")
                              if step.get((kind, False)) and step.get((kind, True))}
    out["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
