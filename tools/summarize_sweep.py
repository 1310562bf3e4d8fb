"""Summarise a Hydra multirun (logger=csv) as a markdown table: final val/loss mean and spread over
seeds per configuration, tokens seen, total and activated parameters.

    python tools/summarize_sweep.py logs/sparse_compare [--group-by experiment]
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

import yaml


def metric_series(rows: list[dict], name: str) -> list[tuple[int, float]]:
    """(step, value) of one metrics.csv column, by step (the last row of a step wins), empty cells skipped."""
    by_step = {int(r["step"]): float(r[name]) for r in rows if r.get(name)}
    return sorted(by_step.items())


def read_run(run_dir: Path) -> dict | None:
    """One job of the sweep (None when it has no metrics.csv or no .hydra/overrides.yaml): its overrides,
    final metrics, parameter counts, tokens per optimiser step and seen, and the metrics.csv rows."""
    metrics = sorted(run_dir.rglob("metrics.csv"))
    overrides = run_dir / ".hydra" / "overrides.yaml"
    config = run_dir / ".hydra" / "config.yaml"
    if not metrics or not overrides.is_file():
        return None
    with open(metrics[0], newline="") as f:
        rows = list(csv.DictReader(f))

    def last(name):
        vals = metric_series(rows, name)
        return vals[-1][1] if vals else None

    cfg = yaml.safe_load(config.read_text())
    steps = max((int(r["step"]) for r in rows if r.get("train/loss")), default=-1) + 1
    per_step = cfg["data"]["batch_size"] * cfg["data"]["seq_len"]
    return {
        "dir": run_dir,
        "overrides": yaml.safe_load(overrides.read_text()),
        "val_loss": last("val/loss"),
        "train_loss": last("train/loss"),
        "total": last("params/total"),
        "activated": last("params/activated"),
        "tokens_per_step": per_step,
        "tokens": steps * per_step,
        "rows": rows,
    }


def group_runs(sweep_dir: Path, group_by: list[str]) -> dict[tuple, list[dict]]:
    """The sweep's jobs (its subdirectories, in name order) grouped by the values of the `group_by`
    override keys (seeds and other unlisted overrides fall into the same group)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        run = read_run(run_dir)
        if run is None:
            continue
        ov = dict(o.split("=", 1) for o in run["overrides"] if "=" in o)
        groups[tuple(ov.get(k, "") for k in group_by)].append(run)
    return groups


def summarize(sweep_dir: Path, group_by: list[str]) -> str:
    groups = group_runs(sweep_dir, group_by)
    lines = [
        "| " + " | ".join(group_by) + " | seeds | final val/loss (mean ± std) | min..max | tokens seen | activated params | total params |",
        "| " + " | ".join("---" for _ in group_by) + " | --- | --- | --- | --- | --- | --- |",
    ]
    for key, runs in groups.items():
        vals = [r["val_loss"] for r in runs if r["val_loss"] is not None]
        mean = statistics.mean(vals) if vals else float("nan")
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(
            "| " + " | ".join(key) + f" | {len(vals)} | {mean:.4f} ± {std:.4f} | {min(vals):.4f}..{max(vals):.4f} | "
            f"{runs[0]['tokens']:,} | {int(runs[0]['activated'] or 0):,} | {int(runs[0]['total'] or 0):,} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir")
    p.add_argument("--group-by", nargs="+", default=["experiment"])
    args = p.parse_args(argv)
    print(summarize(Path(args.sweep_dir), args.group_by))


if __name__ == "__main__":
    main()
