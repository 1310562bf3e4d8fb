"""Tabulate elastic vs non-elastic training from grid outputs and from-scratch runs (markdown).

    python tools/elastic_compare.py --elastic logs/elastic/moe_lm_elastic_s{0,1,2} \
        --baseline logs/elastic/moe_lm_s{0,1,2} --scratch d3e4k1=logs/elastic/scratch_d3e4k1_s{0,1,2} ...

Each --elastic / --baseline run directory holds `<dir>.grid.jsonl` beside it (the output of
tools/elastic_grid.py on its last.ckpt). A --scratch entry NAME=DIRS names a sub-model as dDEPTH eEXPERTS
kTOPK and lists runs of that architecture trained from scratch; their last `val/loss` (the same
validation batches as the grid's) is compared with the exported sub-model's.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from pathlib import Path


def grid(run_dir: str) -> dict[tuple, dict]:
    path = Path(str(run_dir).rstrip("/") + ".grid.jsonl")
    points = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return {(p["depth"], p["experts"], p["top_k"]): p for p in points}


def last_val(run_dir: str) -> float:
    path = next(Path(run_dir).rglob("metrics.csv"))
    with open(path) as f:
        vals = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
    return vals[-1]


def ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--elastic", nargs="+", required=True)
    p.add_argument("--baseline", nargs="+", required=True)
    p.add_argument("--scratch", nargs="+", default=[], help="dDkEkK=DIR,DIR,... (comma-separated run dirs)")
    args = p.parse_args(argv)
    el = [grid(d) for d in args.elastic]
    base = [grid(d) for d in args.baseline]
    keys = sorted(el[0], key=lambda k: (-k[0], -k[1], -k[2]))
    full = keys[0]
    lines = ["| depth | experts | top-k | activated params | non-elastic run | elastic run | elastic - non-elastic |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for k in keys:
        e = [g[k]["val_loss"] for g in el]
        b = [g[k]["val_loss"] for g in base]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {el[0][k]['params_activated']:,} | {ms(b)} | {ms(e)} "
                     f"| {statistics.fmean(e) - statistics.fmean(b):+.4f} |")
    fe = statistics.fmean(g[full]["val_loss"] for g in el)
    fb = statistics.fmean(g[full]["val_loss"] for g in base)
    lines.append(f"\nFull model: elastic {fe:.4f} vs non-elastic {fb:.4f} ({100 * (fe - fb) / fb:+.2f}%).")
    if args.scratch:
        lines += ["", "| sub-model | params (total / activated) | exported from the elastic run | trained from scratch, same tokens |"
                  " exported from the non-elastic run |", "| --- | --- | --- | --- | --- |"]
        for spec in args.scratch:
            name, dirs = spec.split("=", 1)
            d, e, kk = map(int, re.fullmatch(r"d(\d+)e(\d+)k(\d+)", name).groups())
            scratch = [last_val(x) for x in dirs.split(",")]
            pt = el[0][(d, e, kk)]
            lines.append(f"| depth {d}, {e} experts, top-{kk} | {pt['params_total']:,} / {pt['params_activated']:,} "
                         f"| {ms([g[(d, e, kk)]['val_loss'] for g in el])} | {ms(scratch)} "
                         f"| {ms([g[(d, e, kk)]['val_loss'] for g in base])} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(main() and 0)
