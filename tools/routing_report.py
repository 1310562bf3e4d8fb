"""Routing analysis of an ERNIE 5.0 checkpoint on a data split: which experts each task's tokens use.

    python tools/routing_report.py RUN/checkpoints/last.ckpt [--split val] [--rows 64] [--out DIR]

Runs the checkpoint over `--rows` packed rows of the split (its own data config; every task drawn as
in training) recording every sparse layer's routed experts, groups the (token, expert) pairs by task
(text and boundary tokens as 'text', media tokens by their document's task), and writes to DIR
(default: next to the checkpoint, `routing_<split>/`): `report.md` (top-25% expert-set IoU per
reported layer, normalised entropy per layer, top experts), `counts.pt` ({task: [L, E] int64}) and
PNG figures (expert frequency and IoU for the first, middle and last layer, entropy per layer).
Prints the markdown.
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
        tf = module._vis_inputs(batch, False, None)
        module.net(batch, [t["inputs"] for t in tf], routing=RoutingLimit(replay=replay), mtp=False)
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


def main(argv=None) -> str:
    from tools.eval_ernie5 import load

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--fraction", type=float, default=0.25, help="top set = this fraction of the experts")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    module, dm = load(args.ckpt, args.device)
    counts = collect(module, dm, args.split, args.rows)
    out = Path(args.out) if args.out else Path(args.ckpt).parent / f"routing_{args.split}"
    md = write_report(counts, out, module.checkpoint_step, args.fraction)
    print(md)
    return md


if __name__ == "__main__":
    main()
