"""Decoding speed of elastic sub-models against their activated parameters (one process, JSON).

    python benchmarks/elastic_decode.py            # an 8-layer MoE LM, 16 experts, top-8
    python benchmarks/elastic_decode.py --quick    # tiny, for the test

Every sub-model runs inside the same (randomly initialised) network through the elastic knobs, so
the only difference is the work the choice removes. For each point, the full model (A) and the
sub-model (B) decode the same prompt greedily with the KV cache, timed alternately (order flipped
every pair); the figure is the median of per-pair ratios t_full / t_sub (> 1: the sub-model is
faster), beside the ratio of activated parameters. An A/A pair (full vs full) gives the noise floor.
ERNIE 5.0 reports that a quarter of the top-k ("ES 25%") decodes more than 15% faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.timing import alternate  # noqa: E402
from models.layers.elastic import RoutingLimit, depth_layers, keep_experts  # noqa: E402
from models.transformer import Transformer, TransformerConfig  # noqa: E402


def build(quick: bool, device: torch.device) -> Transformer:
    if quick:
        cfg = dict(preset="tiny", vocab_size=256, n_layers=4, moe=dict(num_experts=8, top_k=4, expert_hidden=32))
    else:
        cfg = dict(preset="small", vocab_size=2048, n_layers=8, d_model=256, n_heads=8,
                   moe=dict(num_experts=16, top_k=8, expert_hidden=256))
    torch.manual_seed(0)
    return Transformer(TransformerConfig(ffn="moe", **cfg)).to(device).eval()


def points(model: Transformer) -> list[dict]:
    L, E, k = model.cfg.n_layers, model.cfg.moe.num_experts, model.cfg.moe.top_k
    half = keep_experts(E // 2, E, L, "prefix")
    out = [
        {"name": "ES 25% (top-k / 4)", "layers": None, "routing": RoutingLimit(top_k=max(1, k // 4))},
        {"name": "ES 50% (top-k / 2)", "layers": None, "routing": RoutingLimit(top_k=max(1, k // 2))},
        {"name": "depth 3/4", "layers": depth_layers(L, (3 * L) // 4), "routing": None},
        {"name": "width 1/2 (experts / 2)", "layers": None, "routing": RoutingLimit(half, min(k, E // 2))},
        {"name": "depth 3/4 + width 1/2 + top-k / 2", "layers": depth_layers(L, (3 * L) // 4),
         "routing": RoutingLimit(half, max(1, min(k // 2, E // 2)))},
    ]
    return out


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    new_tokens = args.new_tokens or (8 if args.quick else 64)
    repeats = args.repeats or (2 if args.quick else 10)
    model = build(args.quick, device)
    prompt = torch.randint(0, model.cfg.vocab_size, (args.batch, 16), generator=torch.Generator().manual_seed(0)).to(device)
    full_params = model.num_params()

    def decode(layers=None, routing=None):
        return lambda: model.generate(prompt, new_tokens, temperature=0.0, layers=layers, routing=routing)

    ta, tb = alternate(decode(), decode(), repeats, device)
    aa = statistics.median(a / b for a, b in zip(ta, tb))
    results = []
    for pt in points(model):
        ta, tb = alternate(decode(), decode(pt["layers"], pt["routing"]), repeats, device)
        params = model.num_params(pt["layers"], pt["routing"])
        results.append({
            "sub_model": pt["name"],
            "speedup_full_over_sub": round(statistics.median(a / b for a, b in zip(ta, tb)), 4),
            "sub_tokens_per_s": round(new_tokens * args.batch / statistics.median(tb), 1),
            "full_tokens_per_s": round(new_tokens * args.batch / statistics.median(ta), 1),
            "activated_params": params["activated"],
            "activated_fraction": round(params["activated"] / full_params["activated"], 4),
            "total_fraction": round(params["total"] / full_params["total"], 4),
        })
    out = {
        "benchmark": "elastic_decode",
        "config": {"n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model, "num_experts": model.cfg.moe.num_experts,
                   "top_k": model.cfg.moe.top_k, "expert_hidden": model.cfg.moe.expert_hidden, "batch": args.batch,
                   "prompt": 16, "new_tokens": new_tokens, "repeats": repeats, "kv_cache": True},
        "full_activated_params": full_params["activated"], "full_total_params": full_params["total"],
        "aa_ratio_full_over_full": round(aa, 4),
        "results": results,
        "torch": torch.__version__, "device": str(device),
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
