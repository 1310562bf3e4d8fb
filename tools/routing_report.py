"""Routing analysis of an ERNIE 5.0 checkpoint on a data split: which experts each task's tokens use.

    python tools/routing_report.py RUN/checkpoints/last.ckpt [--split val] [--rows 64] [--out DIR]

Runs the checkpoint over `--rows` packed rows of the split (its own data config; every task drawn as
in training) recording every sparse layer's routed experts, groups the (token, expert) pairs by task
(text and boundary tokens as 'text', media tokens by their document's task), and writes to DIR
(default: next to the checkpoint, `routing_<split>/`): `report.md` (top-25% expert-set IoU per
reported layer, normalised entropy per layer, top experts), `counts.pt` ({task: [L, E] int64}) and
PNG figures (expert frequency and IoU for the first, middle and last layer, entropy per layer).
Prints the markdown.

    python tools/routing_report.py --combine RUN_S0/routing_val/counts.pt RUN_S1/... [--out FILE.md]

Combines several runs' counts (these `counts.pt` files, or the `routing/step_N.counts.pt` the
routing-analysis callback writes): every run's tables are computed on their own, then each IoU and
entropy cell is reported as mean ± standard deviation over runs (seeds). The runs must share their
groups and [L, E] shape.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.io import atomic_torch_save, atomic_write_text  # noqa: E402


@torch.no_grad()
def collect(module, dm, split: str, rows: int, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """{task: [L, E]} routed pairs over `rows` rows of `split` (the module's validation counting)."""
    from datamodules.multimodal import RowDataset, collate_rows
    from models.layers.elastic import RoutingLimit
    from models.moe.replay import RouteReplay

    if not module.sparse:
        raise ValueError("the checkpoint's trunk is dense: there is no routing to analyse")
    ds = RowDataset(dm.corpus, split, rows, dm.seq_len, dm.task_weights, 0.0, dm.text_len, dm.seed)
    module.routing_counts = {}
    for s in range(0, rows, batch_size):
        batch = collate_rows([ds[i] for i in range(s, min(rows, s + batch_size))]).to(module.device)
        replay = RouteReplay("record")
        view = module.stage_view(batch)  # the channels of the checkpoint's visual tokenizer stage
        _, inputs = module.visual_teacher_forcing(view)
        module.net(view, inputs, routing=RoutingLimit(replay=replay), mtp=False)
        module._count_routes(batch, replay)
    return {k: v.cpu() for k, v in module.routing_counts.items()}


def write_report(counts: dict, out: Path, step: int, fraction: float = 0.25) -> str:
    from callbacks.figures import save_png
    from callbacks.routing_analysis import routing_figures
    from models.moe.analysis import routing_markdown, routing_tables

    tables = routing_tables(counts, fraction)
    md = routing_markdown(tables, step)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", md)
    atomic_torch_save(counts, out / "counts.pt")
    for tag, fig in routing_figures(tables, step, fraction).items():
        save_png(fig, out / (tag.removeprefix("routing/").replace("/", "_") + ".png"))
    return md


def combine_tables(runs: list[dict]) -> dict:
    """Mean and standard deviation over runs of `routing_tables`' IoU ([R] of [G, G]) and entropy ([G, L]),
    NaN cells (a group without pairs) left out of their cell's statistics."""
    if not runs:
        raise ValueError("combine needs at least one run's tables")
    first = runs[0]
    for i, t in enumerate(runs[1:], 1):
        if t["groups"] != first["groups"] or (t["num_layers"], t["num_experts"]) != (first["num_layers"], first["num_experts"]):
            raise ValueError(f"run {i} has groups {t['groups']} and {t['num_layers']} x {t['num_experts']} experts; "
                             f"run 0 has {first['groups']} and {first['num_layers']} x {first['num_experts']}")

    def stats(stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = ~stack.isnan()
        n = valid.sum(0)
        mean = stack.nan_to_num().sum(0) / n.clamp_min(1)
        var = ((stack - mean).nan_to_num().pow(2)).sum(0) / (n - 1).clamp_min(1)
        mean[n == 0] = float("nan")
        return mean, torch.where(n > 1, var.sqrt(), torch.zeros_like(var))

    iou = [stats(torch.stack([t["iou"][r].double() for t in runs])) for r in range(len(first["layers"]))]
    entropy = stats(torch.stack([t["entropy"].double() for t in runs]))
    return {"runs": len(runs), "groups": first["groups"], "layers": first["layers"], "roles": first["roles"],
            "num_layers": first["num_layers"], "fraction": first["fraction"],
            "iou_mean": [m for m, _ in iou], "iou_std": [s for _, s in iou],
            "entropy_mean": entropy[0], "entropy_std": entropy[1]}


def combined_markdown(c: dict, names: list[str] | None = None) -> str:
    """Markdown of `combine_tables`: IoU per reported layer and entropy per layer, mean ± std over runs."""
    def cell(m, s) -> str:
        return "n/a" if m != m else f"{m:.2f} ± {s:.2f}"

    from models.moe.analysis import _table

    groups, pct = c["groups"], f"{c['fraction'] * 100:g}%"
    out = [f"# Routing analysis over {c['runs']} runs (mean ± std)", ""]
    if names:
        out += ["Runs: " + ", ".join(names), ""]
    for layer, role, m, s in zip(c["layers"], c["roles"], c["iou_mean"], c["iou_std"]):
        out += [f"## Top-{pct} expert-set IoU, layer {layer + 1} ({role})", ""]
        out += _table(["", *groups], [[a, *(cell(float(m[i, j]), float(s[i, j])) for j in range(len(groups)))]
                                      for i, a in enumerate(groups)]) + [""]
    out += ["## Normalised routing entropy", ""]
    out += _table(["group", *(f"layer {i + 1}" for i in range(c["num_layers"]))],
                  [[g, *(cell(float(c["entropy_mean"][i, layer]), float(c["entropy_std"][i, layer]))
                         for layer in range(c["num_layers"]))] for i, g in enumerate(groups)])
    return "\n".join(out) + "\n"


def combine(paths: list[str], fraction: float = 0.25, out: str | None = None) -> str:
    from models.io import load_checkpoint
    from models.moe.analysis import routing_tables

    runs = []
    for path in paths:
        counts = load_checkpoint(path, what="routing counts")
        if not isinstance(counts, dict) or not all(isinstance(v, torch.Tensor) for v in counts.values()):
            raise ValueError(f"{path} is not a {{group: [L, E] tensor}} counts file")
        runs.append(routing_tables(counts, fraction))
    md = combined_markdown(combine_tables(runs), [str(p) for p in paths])
    if out:
        atomic_write_text(out, md)
    return md


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", nargs="?")
    p.add_argument("--combine", nargs="+", metavar="COUNTS", help="average these counts files' tables over runs")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--fraction", type=float, default=0.25, help="top set = this fraction of the experts")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.combine:
        if args.ckpt:
            p.error("give a checkpoint or --combine, not both")
        md = combine(args.combine, args.fraction, args.out)
        print(md)
        return md
    if not args.ckpt:
        p.error("a checkpoint (or --combine COUNTS...) is required")
    from tools.eval_ernie5 import load

    module, dm = load(args.ckpt, args.device)
    counts = collect(module, dm, args.split, args.rows)
    out = Path(args.out) if args.out else Path(args.ckpt).parent / f"routing_{args.split}"
    md = write_report(counts, out, module.checkpoint_step, args.fraction)
    print(md)
    return md


if __name__ == "__main__":
    main()
