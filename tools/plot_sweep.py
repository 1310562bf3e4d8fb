"""Figures of a Hydra multirun (logger=csv), written as PNG next to the sweep's table (the sweep folder).

    python tools/plot_sweep.py logs/train/multiruns/<date>_<time> [--out DIR] [--group-by experiment]
    python tools/plot_sweep.py logs/token_sufficient --group-by +lm_size experiment

loss_vs_tokens.png: train/loss and val/loss against tokens seen ((step + 1) x data.batch_size x
    data.seq_len, as tools/summarize_sweep.py counts them), one line per configuration (the values
    of the --group-by overrides), its seeds aggregated: the mean line and a min-max band, at the
    steps every seed logged.
loss_vs_params.png: the final val/loss against total and activated parameters (params/total,
    params/activated), mean and min-max over seeds per configuration; configurations that share the
    value of the --series override (default: experiment, when grouped by it) are joined by one line,
    so a sweep grouped by `+lm_size experiment` draws one scaling line per model family.
recall_vs_params.png: the same for the final val/fact_recall (callbacks/fact_recall.py); written
    only when some job logged val/fact_recall.
recall_vs_<key>.png (--x KEY, a numeric --group-by key such as data.num_people): the knowledge-capacity
    figure. Final val/fact_recall, val/facts_known and facts known per 1,000 total parameters against
    the key's value, one line per --series value (mean and min-max over seeds).
Jobs are read with tools/summarize_sweep.py's code. Prints one JSON object: the aggregated numbers
plotted and the files written (atomically).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.io import atomic_write  # noqa: E402
from tools.summarize_sweep import group_runs, metric_series, sweep_folders  # noqa: E402

__all__ = ["aggregate_curves", "aggregate_final", "main", "plot_sweep"]

LOSSES = ("train/loss", "val/loss")
RECALL = "val/fact_recall"
KNOWN = "val/facts_known"


def _label(group_by: list[str], key: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(group_by, key) if v) or "all"


def aggregate_curves(runs: list[dict], metric: str) -> dict | None:
    """Mean / min / max over the runs of `metric` at the steps every run logged it (None: none did)."""
    series = [dict(metric_series(r["rows"], metric)) for r in runs]
    series = [s for s in series if s]
    if not series:
        return None
    steps = sorted(set.intersection(*(set(s) for s in series)))
    per_step = runs[0]["tokens_per_step"]
    vals = [[s[t] for s in series] for t in steps]
    return {"seeds": len(series), "steps": steps, "tokens": [(t + 1) * per_step for t in steps],
            "mean": [sum(v) / len(v) for v in vals], "min": [min(v) for v in vals], "max": [max(v) for v in vals]}


def aggregate_final(runs: list[dict], metric: str = RECALL) -> dict | None:
    """Final `metric` over the runs (mean, min, max) with their parameter counts (None: never logged)."""
    finals = [metric_series(r["rows"], metric) for r in runs]
    finals = [s[-1][1] for s in finals if s]
    if not finals:
        return None
    return {"seeds": len(finals), "mean": sum(finals) / len(finals), "min": min(finals), "max": max(finals),
            "total": runs[0]["total"], "activated": runs[0]["activated"]}


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120), keep_suffix=True)
    return path


def _save_vs_params(plt, values: dict, series_of: dict, metric: str, path: Path) -> Path:
    """Final `metric` (mean, min-max bars) against total and activated parameters, one line per series."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    lines: dict[str, list] = {}
    for label, r in values.items():
        lines.setdefault(series_of.get(label) or label, []).append(r)
    for ax, count in zip(axes[0], ("total", "activated")):
        for name, points in lines.items():
            points = sorted((p for p in points if p[count] is not None), key=lambda p: p[count])
            if not points:
                continue
            xs, means = [p[count] for p in points], [p["mean"] for p in points]
            err = [[p["mean"] - p["min"] for p in points], [p["max"] - p["mean"] for p in points]]
            ax.errorbar(xs, means, yerr=err, fmt="o-", capsize=4,
                        label=f"{name} (n={min(p['seeds'] for p in points)})")
        ax.set_xscale("log")
        ax.set_xlabel(f"{count} parameters")
        ax.set_ylabel(f"final {metric}")
        ax.set_title(f"{metric} vs {count} parameters (mean, min-max over seeds)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _save_vs_key(plt, points: dict, key: str, path: Path) -> Path:
    """Final recall, facts known and facts known per 1k total parameters against `key`, a line per series."""
    panels = [(RECALL, "final val/fact_recall (exact)"), (KNOWN, "final val/facts_known"),
              ("known_per_k", "facts known per 1k total parameters")]
    panels = [(m, t) for m, t in panels if any(m in p for pts in points.values() for p in pts)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels):
        for name, pts in points.items():
            pts = sorted((p for p in pts if metric in p), key=lambda p: p["x"])
            if not pts:
                continue
            means = [p[metric]["mean"] for p in pts]
            err = [[m - p[metric]["min"] for m, p in zip(means, pts)], [p[metric]["max"] - m for m, p in zip(means, pts)]]
            ax.errorbar([p["x"] for p in pts], means, yerr=err, fmt="o-", capsize=4,
                        label=f"{name or 'all'} (n={min(p[metric]['seeds'] for p in pts)})")
        ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _by_key(groups: dict, group_by: list[str], key: str, series: str | None) -> dict:
    """Per series value: one point per configuration, x = its `key` value, with the final recall,
    facts known and facts known per 1k total parameters aggregated over seeds."""
    k = group_by.index(key)
    points: dict[str, list] = {}
    for gkey, runs in groups.items():
        try:
            x = float(gkey[k])
        except ValueError:
            raise ValueError(f"--x {key!r} must take numeric values, got {gkey[k]!r}") from None
        point = {"x": x}
        for metric in (RECALL, KNOWN):
            if (agg := aggregate_final(runs, metric)) is not None:
                point[metric] = agg
        per_k = [1000 * metric_series(r["rows"], KNOWN)[-1][1] / r["total"] for r in runs
                 if r["total"] and metric_series(r["rows"], KNOWN)]
        if per_k:
            point["known_per_k"] = {"seeds": len(per_k), "mean": sum(per_k) / len(per_k), "min": min(per_k),
                                    "max": max(per_k)}
        name = dict(zip(group_by, gkey)).get(series, "") if series else ""
        points.setdefault(name, []).append(point)
    return points


def plot_sweep(sweep_dir, out_dir: str | Path | None = None, group_by: list[str] | None = None,
               series: str | None = None, x: str | None = None) -> dict:
    """Write the figures of `sweep_dir` (a folder, or a list of folders: a sweep run in parts) into `out_dir`
    (default: the (first) sweep folder); returns what was plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = sweep_folders(sweep_dir)
    sweep = sweeps[0]
    group_by = list(group_by or ["experiment"])
    groups = group_runs(sweeps, group_by)
    if not groups:
        raise ValueError(f"no job with a metrics.csv and .hydra/overrides.yaml under {sweep} (train with logger=csv)")
    out = Path(out_dir) if out_dir is not None else sweep
    if series is None:
        series = "experiment" if "experiment" in group_by and len(group_by) > 1 else None
    elif series not in group_by:
        raise ValueError(f"--series {series!r} must be one of --group-by {group_by}")
    result: dict = {"sweep": str(sweep) if len(sweeps) == 1 else [str(d) for d in sweeps], "group_by": group_by, "series": series, "loss": {}, "final_loss": {},
                    "recall": {}, "files": []}
    if x is not None and x not in group_by:
        raise ValueError(f"--x {x!r} must be one of --group-by {group_by}")
    series_of: dict[str, str] = {}

    for key, runs in groups.items():
        label = _label(group_by, key)
        curves = {m: c for m in LOSSES if (c := aggregate_curves(runs, m)) is not None}
        if curves:
            result["loss"][label] = curves
        recall = aggregate_final(runs, RECALL)
        if recall is not None:
            result["recall"][label] = recall
        final = aggregate_final(runs, "val/loss")
        if final is not None:
            result["final_loss"][label] = final
        series_of[label] = dict(zip(group_by, key)).get(series, "") if series else ""

    panels = [m for m in LOSSES if any(m in c for c in result["loss"].values())]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, metric in zip(axes[0], panels):
            for label, curves in result["loss"].items():
                if metric not in curves:
                    continue
                c = curves[metric]
                (line,) = ax.plot(c["tokens"], c["mean"], marker="o" if len(c["tokens"]) < 3 else None,
                                  label=f"{label} (n={c['seeds']})")
                ax.fill_between(c["tokens"], c["min"], c["max"], color=line.get_color(), alpha=0.2)
            ax.set_xlabel("tokens seen")
            ax.set_ylabel(metric)
            ax.set_title(f"{metric} vs tokens (mean, min-max over seeds)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        result["files"].append(str(_save(fig, out / "loss_vs_tokens.png")))
        plt.close(fig)

    for name, metric, values in (("loss_vs_params.png", "val/loss", result["final_loss"]),
                                 ("recall_vs_params.png", RECALL, result["recall"])):
        if values and (name != "loss_vs_params.png" or series is not None):
            result["files"].append(str(_save_vs_params(plt, values, series_of, metric, out / name)))
    if x is not None:
        result["by_" + x] = points = _by_key(groups, group_by, x, series)
        if any(len(p) > 1 for p in points.values()):
            safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in x.lstrip("+"))
            result["files"].append(str(_save_vs_key(plt, points, x, out / f"recall_vs_{safe}.png")))
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", nargs="+", help="the sweep folder, or several (a sweep run in parts)")
    p.add_argument("--out", help="folder for the PNG files (default: the (first) sweep folder)")
    p.add_argument("--group-by", nargs="+", default=["experiment"])
    p.add_argument("--series", help="the --group-by key whose values become lines of the vs-parameters figures "
                   "(default: experiment when grouped by more than it)")
    p.add_argument("--x", help="a numeric --group-by key (e.g. data.num_people): also plot final recall and "
                   "facts known against it (recall_vs_<key>.png)")
    args = p.parse_args(argv)
    out = plot_sweep(args.sweep_dir[0] if len(args.sweep_dir) == 1 else args.sweep_dir, args.out, args.group_by,
                     args.series, args.x)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
