"""MoE layer cost: forward+backward time of MoELayer over a dense SwiGLU with equal activated parameters.

The dense baseline has hidden k * expert_hidden, so both do the same expert FLOPs per token; the
ratio is the price of routing, permutation and small GEMMs. A and B alternate in one process and
the result is the median of per-pair ratios; a dense-vs-dense pair gives the A/A noise floor.
Memory: peak CUDA memory on GPU; on CPU the bytes autograd saves for backward (counted with
torch.autograd.graph.saved_tensors_hooks, each storage once), a proxy for activation memory.

    python benchmarks/moe_dispatch.py            # prints one JSON object
    python benchmarks/moe_dispatch.py --quick    # smoke run
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
from models.layers.ffn import SwiGLU  # noqa: E402
from models.moe import MoEConfig, MoELayer, reference_moe  # noqa: E402
from models.moe.experts import grouped_mm_supported  # noqa: E402

SHAPES = {
    "coarse": dict(tokens=4096, dim=256, num_experts=8, top_k=2, expert_hidden=512),
    "fine_grained": dict(tokens=4096, dim=256, num_experts=64, top_k=8, expert_hidden=64),
}
GOALS = {"coarse": 1.10, "fine_grained": 2.0}


def bench_pair(fn_a: Callable[[], None], fn_b: Callable[[], None], repeats: int, device: torch.device | None = None,
               warmup: int = 2) -> dict:
    """Time A and B alternately (order flipped every pair); ratio = median over pairs of t_a / t_b.

    Alternation makes slow drifts (thermal, other processes) hit both sides of each pair.
    """
    ta, tb = alternate(fn_a, fn_b, repeats, device or torch.device("cpu"), warmup)
    ratios = [a / b for a, b in zip(ta, tb)]
    return {
        "ratio": statistics.median(ratios),
        "ratio_spread": [min(ratios), max(ratios)],
        "ms_a": 1e3 * statistics.median(ta),
        "ms_b": 1e3 * statistics.median(tb),
    }


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct storages autograd saves for backward while fn() builds its graph."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def build(shape: dict, device: torch.device, seed: int):
    torch.manual_seed(seed)
    cfg = dict(num_experts=shape["num_experts"], top_k=shape["top_k"], expert_hidden=shape["expert_hidden"])
    dense = SwiGLU(shape["dim"], shape["top_k"] * shape["expert_hidden"]).to(device)
    x = torch.randn(shape["tokens"], shape["dim"], device=device, requires_grad=True)
    gy = torch.randn(shape["tokens"], shape["dim"], device=device)
    layers = {}
    for impl in ("auto", "grouped_mm", "loop"):
        torch.manual_seed(seed + 1)
        layers[impl] = MoELayer(shape["dim"], MoEConfig(**cfg, impl=impl)).to(device)
    return dense, layers, x, gy


def moue_vs_moe(repeats: int, device: torch.device, seed: int) -> dict:
    """fwd+bwd of a 4-layer MoUE transformer over a 4-layer MoE one at equal activated (and total)
    parameters: N_U = L * E pool experts, window 2, universal router + trajectory state, UELB."""
    from models.transformer import Transformer, TransformerConfig

    shape = dict(n_layers=4, d_model=256, n_heads=4, vocab_size=512, batch=4, seq=256,
                 moe=dict(num_experts=8, top_k=2, expert_hidden=512))
    nets = {}
    for ffn in ("moe", "moue"):
        torch.manual_seed(seed)
        cfg = TransformerConfig.from_dict(dict(
            preset="small", vocab_size=shape["vocab_size"], n_layers=shape["n_layers"], d_model=shape["d_model"],
            n_heads=shape["n_heads"], n_kv_heads=shape["n_heads"], ffn=ffn, moe=dict(shape["moe"]),
            moue=dict(window=2, state_dim=32),
        ))
        nets[ffn] = Transformer(cfg).to(device)
    tokens = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), device=device)

    def step(net):
        def run():
            logits, balance, _ = net(tokens, return_routing=True)
            (logits.float().mean() + balance).backward()
        return run

    ratio = bench_pair(step(nets["moue"]), step(nets["moe"]), repeats, device)
    aa = bench_pair(step(nets["moe"]), step(nets["moe"]), repeats, device)
    counts = {k: v.num_params() for k, v in nets.items()}
    return {"config": shape, "goal": 1.10, "moue_over_moe": ratio, "aa_moe_over_moe": aa, "params": counts,
            "meets_goal": ratio["ratio"] <= 1.10}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="3 repeats, skip the reference loop")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    device = torch.device(args.device)

    load_before = os.getloadavg()[0]
    results: dict = {}
    for name, shape in SHAPES.items():
        dense, layers, x, gy = build(shape, device, args.seed)

        def moe_step(layer):
            def step():
                y, info = layer(x)
                (y.float() * gy).sum().add(info.loss).backward()
            return step

        def dense_step_loss():
            # Same loss form as moe_step, so the ratio does not include a cheaper backward seed.
            (dense(x).float() * gy).sum().backward()

        def ref_step():
            layer = layers["loop"]
            r = layer.router(x)
            y = reference_moe(x, r.topk_idx, r.topk_weight, layer.experts.w13, layer.experts.w2)
            (y * gy).sum().backward()

        entry = {"config": shape, "goal": GOALS[name]}
        for impl, layer in layers.items():
            chosen = layer.experts.choose_impl(shape["tokens"] * shape["top_k"], device, x.dtype)
            r = bench_pair(moe_step(layer), dense_step_loss, repeats, device)
            entry[impl] = {**r, "runs": chosen}
        if not args.quick:
            entry["reference_loop"] = bench_pair(ref_step, dense_step_loss, max(3, repeats // 3), device)
        entry["aa_dense_over_dense"] = bench_pair(dense_step_loss, dense_step_loss, repeats, device)

        auto = layers["auto"]
        if device.type == "cuda":
            mem_moe = peak_bytes(moe_step(auto), device)
            mem_dense = peak_bytes(dense_step_loss, device)
            entry["memory"] = {"metric": "cuda peak allocated bytes", "moe": mem_moe, "dense": mem_dense,
                               "ratio": mem_moe / mem_dense}
        else:
            mem_moe = saved_bytes(lambda: auto(x))
            mem_dense = saved_bytes(lambda: dense(x))
            entry["memory"] = {"metric": "bytes saved for backward (saved_tensors_hooks), CPU proxy for peak",
                               "moe": mem_moe, "dense": mem_dense, "ratio": mem_moe / mem_dense}
        entry["meets_goal"] = entry["auto"]["ratio"] <= GOALS[name]
        results[name] = entry

    results["moue_vs_moe_stack"] = moue_vs_moe(repeats, device, args.seed)

    out = {
        "benchmark": "moe_dispatch",
        "metric": "fwd+bwd time MoELayer / dense SwiGLU(hidden = k * expert_hidden), median of per-pair ratios",
        **results,
        "grouped_mm_supported": grouped_mm_supported(device, torch.float32),
        "repeats": repeats,
        "quick": args.quick,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        # Other processes on a shared machine: with more runnable threads than cores every
        # OpenMP region waits for a descheduled thread, which hurts many-small-op paths most.
        "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
