"""Evaluate a grid of elastic sub-models of one language-model checkpoint.

    python tools/elastic_grid.py CKPT                                  # default grid
    python tools/elastic_grid.py CKPT --depths 2 3 4 --experts 4 8 --top-k 1 2 --max-batches 20

For each (depth, experts per layer, top-k) the sub-model runs inside the parent (the same layers and
experts tools/export_submodel.py would keep, so its numbers are the exported model's): validation
loss on the checkpoint's own validation split, total and activated parameters of the sub-model
standing alone, and greedy decoding speed with the KV cache (tokens/s, batch 1, median of
--repeats). Prints one JSON object per point and logs a figure (validation loss against activated
parameters, one marker per point) and the points as text to TensorBoard under --logdir.

Default grid: depths ceil(L/2)..L; experts E/2 and E (MoE; the full set otherwise); top-k 1..k.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.layers.elastic import RoutingLimit  # noqa: E402
from models.transformer import lm_loss  # noqa: E402
from tools.export_submodel import load_checkpoint, plan_submodel  # noqa: E402

__all__ = ["default_grid", "evaluate_grid"]


def default_grid(cfg) -> tuple[list[int], list[Optional[int]], list[Optional[int]]]:
    L = cfg.n_layers
    depths = list(range(math.ceil(L / 2), L + 1))
    if cfg.ffn == "dense":
        return depths, [None], [None]
    ks = list(range(1, cfg.moe.top_k + 1))
    if cfg.ffn == "moe":
        E = cfg.moe.num_experts
        return depths, sorted({max(cfg.moe.top_k, E // 2), E}), ks
    return depths, [None], ks


def val_batches(ckpt: dict, max_batches: int, cache_dir: Optional[str]) -> list[torch.Tensor]:
    """(tokens, targets) pairs of the checkpoint's validation split (its DataModule, rebuilt from its hparams)."""
    from datamodules.text import TextDataModule

    hp = dict(ckpt.get("datamodule_hyper_parameters") or {})
    if not hp:
        raise ValueError("the checkpoint records no DataModule settings (datamodule_hyper_parameters)")
    if cache_dir:
        hp["cache_dir"] = cache_dir
    dm = TextDataModule(**hp)
    dm.prepare_data()
    dm.setup("validate")
    out = []
    for i, batch in enumerate(dm.val_dataloader()):
        if i >= max_batches:
            break
        out.append((batch.tokens, batch.targets))
    return out


@torch.no_grad()
def decode_tokens_per_s(model, layers, routing, new_tokens: int, repeats: int, vocab: int) -> float:
    prompt = torch.arange(8, dtype=torch.long)[None] % vocab
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        t0 = time.perf_counter()
        model.generate(prompt, new_tokens, temperature=0.0, layers=layers, routing=routing)
        times.append(time.perf_counter() - t0)
    return new_tokens / statistics.median(times[1:])


@torch.no_grad()
def evaluate_grid(ckpt_path: str | Path, depths: Optional[Sequence[int]] = None, experts: Optional[Sequence] = None,
                  top_ks: Optional[Sequence] = None, rule: str = "usage", max_batches: int = 20,
                  decode_tokens: int = 32, repeats: int = 3, cache_dir: Optional[str] = None) -> list[dict]:
    from generate import load_module

    ckpt = load_checkpoint(ckpt_path)
    module = load_module(ckpt_path)
    model, cfg = module.model, module.net_cfg
    d0, e0, k0 = default_grid(cfg)
    depths, experts, top_ks = list(depths or d0), list(experts or e0), list(top_ks or k0)
    batches = val_batches(ckpt, max_batches, cache_dir)
    points = []
    for depth in depths:
        for n in experts:
            for k in top_ks:
                if n is not None and k is not None and k > n:
                    continue
                run, kept, kk = plan_submodel(cfg, depth, None, n if n != cfg.moe.num_experts else None,
                                              k if k != cfg.moe.top_k else None, rule, module.expert_usage)
                layers = None if len(run) == cfg.n_layers else run
                routing = None if kept is None and kk is None else RoutingLimit(kept, kk)
                loss = sum(float(lm_loss(model(t, layers=layers, routing=routing), y)) for t, y in batches) / len(batches)
                params = model.num_params(layers, routing)
                points.append({
                    "depth": len(run), "layers": run,
                    "experts": None if cfg.ffn == "dense" else (len(kept[0]) if kept else model.trunk.num_experts),
                    "top_k": None if cfg.ffn == "dense" else (kk or cfg.moe.top_k),
                    "val_loss": round(loss, 5), "params_total": params["total"], "params_activated": params["activated"],
                    "decode_tokens_per_s": round(decode_tokens_per_s(model, layers, routing, decode_tokens, repeats,
                                                                     cfg.vocab_size), 2),
                })
    return points


def log_figure(points: list[dict], logdir: Path, ckpt: str) -> Path:
    """Validation loss against activated parameters, one labelled marker per point, to TensorBoard."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for depth in sorted({p["depth"] for p in points}):
        sel = [p for p in points if p["depth"] == depth]
        ax.scatter([p["params_activated"] / 1e6 for p in sel], [p["val_loss"] for p in sel], label=f"depth {depth}")
        for p in sel:
            ax.annotate(f"E{p['experts']} k{p['top_k']}", (p["params_activated"] / 1e6, p["val_loss"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("activated parameters per token (M)")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title(f"elastic sub-models of {Path(ckpt).name}")
    ax.legend()
    ax.grid(alpha=0.3)
    writer = SummaryWriter(str(logdir))
    writer.add_figure("elastic/val_loss_vs_activated", fig, 0)
    writer.add_text("elastic/grid", "\n\n".join(json.dumps(p) for p in points), 0)
    writer.close()
    plt.close(fig)
    return logdir


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--depths", type=int, nargs="+")
    p.add_argument("--experts", type=int, nargs="+")
    p.add_argument("--top-k", type=int, nargs="+", dest="top_k")
    p.add_argument("--rule", default="usage", choices=["usage", "prefix"])
    p.add_argument("--max-batches", type=int, default=20)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", help="where the DataModule finds / builds its tokenizer and token caches")
    p.add_argument("--logdir", help="TensorBoard directory (default: CKPT's folder / elastic_grid)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    try:
        points = evaluate_grid(args.ckpt, args.depths, args.experts, args.top_k, args.rule, args.max_batches,
                               args.decode_tokens, args.repeats, args.cache_dir)
    except (ValueError, FileNotFoundError, IsADirectoryError) as e:
        p.exit(2, f"error: {e}\n")
    for point in points:
        print(json.dumps(point))
    logdir = Path(args.logdir) if args.logdir else Path(args.ckpt).resolve().parent / "elastic_grid"
    log_figure(points, logdir, args.ckpt)
    print(f"figure: tensorboard --logdir {logdir}", file=sys.stderr)
    return points


if __name__ == "__main__":
    main()
