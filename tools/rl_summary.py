"""Summarise RL runs (logger=csv or logger=many) as a markdown table, seeds aggregated, and plot their curves.

    python tools/rl_summary.py RUN_DIR [RUN_DIR ...] [--plot OUT.png] [--window 25]

Runs are grouped by their directory name with a trailing `_s<seed>` removed (name runs
`<condition>_s0`, `<condition>_s1`, ...). Per group: the number of seeds; test/acc (held-out accuracy
of the final policy, greedy) mean and min-max; and, from the rl/* monitors, means over the first and
the last `window` logged steps of rl/acc (training reward correctness), rl/entropy, plus the run-wide
mean of rl/clip_frac, rl/icepop_masked_frac, rl/mismatch_k_max (max), rl/router_disagreement/mean
and the share of runs whose entropy collapsed (rl/entropy_collapsed). --plot writes rl/acc and
rl/entropy against step (mean over seeds per group, smoothed over `window`) as one PNG (atomically).
Prints the table, then one JSON object with the numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.summarize_sweep import metric_series  # noqa: E402

__all__ = ["group_name", "main", "summarize_runs"]


def group_name(run_dir: Path) -> str:
    return re.sub(r"_s\d+$", "", run_dir.name)


def _rows(run_dir: Path) -> list[dict]:
    import csv

    files = sorted(run_dir.rglob("metrics.csv"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no metrics.csv (run with logger=csv or logger=many)")
    with open(files[0], newline="") as f:
        return list(csv.DictReader(f))


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _run_stats(rows: list[dict], window: int) -> dict:
    def series(name):
        return [v for _, v in metric_series(rows, name)]

    acc, ent = series("rl/acc"), series("rl/entropy")
    test = series("test/acc")
    kmax = series("rl/mismatch_k_max")
    return {
        "test_acc": test[-1] if test else None,
        "train_acc_first": _mean(acc[:window]), "train_acc_last": _mean(acc[-window:]),
        "entropy_first": _mean(ent[:window]), "entropy_last": _mean(ent[-window:]),
        "clip_frac": _mean(series("rl/clip_frac")),
        "icepop_masked_frac": _mean(series("rl/icepop_masked_frac")),
        "mismatch_k_max": max(kmax) if kmax else None,
        "router_disagreement": _mean(series("rl/router_disagreement/mean")),
        "collapsed": bool(series("rl/entropy_collapsed") and series("rl/entropy_collapsed")[-1] > 0),
        "acc_curve": metric_series(rows, "rl/acc"), "entropy_curve": metric_series(rows, "rl/entropy"),
    }


def summarize_runs(run_dirs: list[Path], window: int = 25) -> dict[str, dict]:
    groups: dict[str, list[dict]] = {}
    for d in run_dirs:
        groups.setdefault(group_name(d), []).append(_run_stats(_rows(d), window))
    out = {}
    for name, runs in groups.items():
        tests = [r["test_acc"] for r in runs if r["test_acc"] is not None]
        agg = {"seeds": len(runs), "test_acc_mean": _mean(tests),
               "test_acc_range": [min(tests), max(tests)] if tests else None}
        for key in ("train_acc_first", "train_acc_last", "entropy_first", "entropy_last", "clip_frac",
                    "icepop_masked_frac", "router_disagreement"):
            agg[key] = _mean([r[key] for r in runs])
        kmax = [r["mismatch_k_max"] for r in runs if r["mismatch_k_max"] is not None]
        agg["mismatch_k_max"] = max(kmax) if kmax else None
        agg["collapsed_runs"] = sum(r["collapsed"] for r in runs)
        agg["_curves"] = [(r["acc_curve"], r["entropy_curve"]) for r in runs]
        out[name] = agg
    return out


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, list):
        return f"[{v[0]:.{digits}f}, {v[1]:.{digits}f}]"
    return f"{v:.{digits}f}"


def table(summary: dict[str, dict]) -> str:
    head = ("| condition | seeds | test acc (mean) | test acc (min, max) | train acc first -> last | "
            "entropy first -> last | clip frac | IcePop masked | max k | router disagreement | collapsed |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, a in summary.items():
        lines.append(
            f"| {name} | {a['seeds']} | {_fmt(a['test_acc_mean'])} | {_fmt(a['test_acc_range'])} | "
            f"{_fmt(a['train_acc_first'])} -> {_fmt(a['train_acc_last'])} | "
            f"{_fmt(a['entropy_first'])} -> {_fmt(a['entropy_last'])} | {_fmt(a['clip_frac'], 4)} | "
            f"{_fmt(a['icepop_masked_frac'], 4)} | {_fmt(a['mismatch_k_max'], 2)} | "
            f"{_fmt(a['router_disagreement'], 4)} | {a['collapsed_runs']}/{a['seeds']} |")
    return "\n".join(lines)


def _smooth(points, window):
    vals = [v for _, v in points]
    return [(points[i][0], statistics.fmean(vals[max(0, i - window + 1):i + 1])) for i in range(len(vals))]


def plot(summary: dict[str, dict], path: Path, window: int) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.io import atomic_write_bytes

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, a in summary.items():
        for idx, label in ((0, "rl/acc (train responses)"), (1, "rl/entropy")):
            curves = [c[idx] for c in a["_curves"] if c[idx]]
            if not curves:
                continue
            steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves]))
            mean = [(s, statistics.fmean(dict(c)[s] for c in curves)) for s in steps]
            sm = _smooth(mean, window)
            axes[idx].plot([s for s, _ in sm], [v for _, v in sm], label=name)
            axes[idx].set_title(label)
            axes[idx].set_xlabel("step")
    axes[0].legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--window", type=int, default=25)
    args = ap.parse_args(argv)
    summary = summarize_runs(args.runs, args.window)
    print(table(summary))
    if args.plot:
        plot(summary, args.plot, args.window)
    out = {k: {kk: vv for kk, vv in v.items() if kk != "_curves"} for k, v in summary.items()}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
