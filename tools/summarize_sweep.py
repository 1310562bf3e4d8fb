"""Summarise a Hydra multirun (logger=csv) as a markdown table: final val/loss mean and spread over
seeds per configuration, tokens seen (and per total parameter), total and activated parameters, and,
when the jobs ran the fact-recall callback, the final val/fact_recall (exact match) and
val/fact_recall_top1 in the training wording, with a held-out wording val/fact_recall_unseen, and
val/facts_known (exact recall x the trained people's facts) with facts known per 1,000 total parameters.

    python tools/summarize_sweep.py logs/sparse_compare [--group-by experiment]
    python tools/summarize_sweep.py logs/token_sufficient --group-by +lm_size experiment \
        --compare experiment dense_lm:moe_lm moe_lm:moue_lm

--compare KEY A:B ... adds a table: for every value of the other --group-by keys, the difference of
the final val/loss seed means (B - A), its standard error (Welch: sqrt(var_A/n_A + var_B/n_B)), the
relative difference, and a verdict: "B better" / "B worse" beyond two standard errors, else "within
noise" (seeds are the unit of replication). --metric compares another final metric instead (a recall
metric such as val/facts_known, where higher is better). A recall comparison with a single seed on a
side cannot measure the seed spread; it falls back to the probes' binomial error (p(1 - p) / probes
per run, val/fact_recall_probes, or callbacks.fact_recall.max_probes for runs that predate it), and
its verdict says "probe noise only": the seed-to-seed spread comes on top of it.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

# Final values summarised when some job of the sweep logged them (callbacks/fact_recall.py).
RECALL_METRICS = ("val/fact_recall", "val/fact_recall_top1", "val/fact_recall_unseen", "val/fact_recall_unseen_top1",
                  "val/facts_known")
KNOWN = "val/facts_known"  # with it the table adds facts known per 1,000 total parameters


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
    probes = last("val/fact_recall_probes")
    if probes is None and last("val/fact_recall") is not None:  # logged before the count was: the cap
        cap = ((cfg.get("callbacks") or {}).get("fact_recall") or {}).get("max_probes")
        count = last("val/fact_count")
        probes = None if cap is None else float(min(cap, count) if count else cap)
    per_step = cfg["data"]["batch_size"] * cfg["data"]["seq_len"]
    return {
        "dir": run_dir,
        "overrides": yaml.safe_load(overrides.read_text()),
        "val_loss": last("val/loss"),
        **{name: last(name) for name in RECALL_METRICS},
        "probes": probes,
        "fact_count": last("val/fact_count"),
        "train_loss": last("train/loss"),
        "total": last("params/total"),
        "activated": last("params/activated"),
        "tokens_per_step": per_step,
        "tokens": steps * per_step,
        "rows": rows,
    }


def sweep_folders(sweep_dirs) -> list[Path]:
    """One sweep folder, or several (a sweep run in parts), as a list of paths."""
    return [Path(sweep_dirs)] if isinstance(sweep_dirs, (str, Path)) else [Path(d) for d in sweep_dirs]


def _job_dirs(sweep_dirs) -> list[Path]:
    """The job folders of one sweep folder or of several (a sweep run in parts), each in job-number order."""
    dirs = sweep_folders(sweep_dirs)
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"sweep directory {d} does not exist")
    order = lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)  # noqa: E731 (job 2 before 10)
    return [p for d in dirs for p in sorted((x for x in d.iterdir() if x.is_dir()), key=order)]


def group_runs(sweep_dir, group_by: list[str]) -> dict[tuple, list[dict]]:
    """The jobs of a sweep folder, or of several (a list: a sweep run in parts), grouped by the values of
    the `group_by` override keys (seeds and other unlisted overrides fall into the same group)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run_dir in _job_dirs(sweep_dir):
        run = read_run(run_dir)
        if run is None:
            continue
        ov = dict(o.split("=", 1) for o in run["overrides"] if "=" in o)
        groups[tuple(ov.get(k, "") for k in group_by)].append(run)
    return groups


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value, nan for none)."""
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(sweep_dir, group_by: list[str]) -> str:
    groups = group_runs(sweep_dir, group_by)
    recall = [m for m in RECALL_METRICS if any(r[m] is not None for runs in groups.values() for r in runs)]
    per_k = KNOWN in recall
    extra = [*recall, *(["facts known per 1k total params"] if per_k else [])]
    lines = [
        "| " + " | ".join(group_by) + " | seeds | final val/loss (mean ± std) | min..max | tokens seen | tokens per total param"
        " | activated params | total params |" + "".join(f" {m} |" for m in extra),
        "| " + " | ".join("---" for _ in group_by) + " | --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(extra),
    ]
    for key, runs in groups.items():
        vals = [r["val_loss"] for r in runs if r["val_loss"] is not None]
        mean, std = mean_std(vals)
        spread = f"{min(vals):.4f}..{max(vals):.4f}" if vals else "-"
        total = int(runs[0]["total"] or 0)
        per_param = f"{runs[0]['tokens'] / total:.1f}" if total else "-"
        row = (
            "| " + " | ".join(key) + f" | {len(vals)} | {mean:.4f} ± {std:.4f} | {spread} | "
            f"{runs[0]['tokens']:,} | {per_param} | {int(runs[0]['activated'] or 0):,} | {total:,} |"
        )
        for m in recall:
            rm, rs = mean_std([r[m] for r in runs if r[m] is not None])
            row += f" {rm:.1f} ± {rs:.1f} |" if m == KNOWN else f" {rm:.3f} ± {rs:.3f} |"
        if per_k:
            rm, rs = mean_std([1000 * r[KNOWN] / r["total"] for r in runs if r[KNOWN] is not None and r["total"]])
            row += f" {rm:.3f} ± {rs:.3f} |"
        lines.append(row)
    return "\n".join(lines)


def compare_losses(a: list[float], b: list[float], higher_is_better: bool = False,
                   probe_var: tuple[list[float], list[float]] | None = None) -> dict:
    """B - A of the seed means of a metric (lower is better unless `higher_is_better`), its Welch
    standard error and a verdict: "B better" / "B worse" beyond two standard errors, else "within noise".

    probe_var: the measurement variance of each run's value (A's list, B's list; see `probe_variance`),
    used when a side has a single seed: the standard error is then that of the measurement alone and
    the verdict says "(probe noise only)"."""
    diff = statistics.mean(b) - statistics.mean(a)
    mean_a = statistics.mean(a)
    out = {"diff": diff, "rel": diff / mean_a if mean_a else float("nan"), "se": float("nan"),
           "verdict": "needs 2+ seeds each"}
    if len(a) > 1 and len(b) > 1:
        out["se"], suffix = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5, ""
    elif probe_var is not None:
        va, vb = probe_var
        out["se"] = (sum(va) / len(va) ** 2 + sum(vb) / len(vb) ** 2) ** 0.5  # variance of each side's mean
        suffix = " (probe noise only)"
    else:
        return out
    better = diff > 0 if higher_is_better else diff < 0
    verdict = ("B better" if better else "B worse") if abs(diff) > 2 * out["se"] else "within noise"
    out["verdict"] = verdict + suffix
    return out


def probe_variance(run: dict, metric: str) -> float | None:
    """Binomial variance of a run's final recall `metric` over its probes (None when unknown): p(1 - p) / n
    for a rate, times val/fact_count squared for val/facts_known (= rate x facts)."""
    value, n = run[metric], run["probes"]
    if value is None or not n:
        return None
    if metric == KNOWN:
        if not run["fact_count"]:
            return None
        p = value / run["fact_count"]
        return run["fact_count"] ** 2 * p * (1 - p) / n
    return value * (1 - value) / n


def comparisons(sweep_dir, group_by: list[str], key: str, pairs: list[tuple[str, str]],
                metric: str = "val/loss") -> str:
    """Markdown table of `compare_losses` on the final `metric` (val/loss, or one of RECALL_METRICS, where
    higher is better) for each pair of `key` values, per value of the other keys."""
    if key not in group_by:
        raise ValueError(f"--compare key {key!r} must be one of --group-by {group_by}")
    if metric not in ("val/loss", *RECALL_METRICS):
        raise ValueError(f"--metric must be val/loss or one of {list(RECALL_METRICS)}, got {metric!r}")
    field = "val_loss" if metric == "val/loss" else metric
    groups = group_runs(sweep_dir, group_by)
    k = group_by.index(key)
    rest = list(dict.fromkeys(g[:k] + g[k + 1:] for g in groups))  # the other keys' values, in sweep order
    header = [x for x in group_by if x != key] + ["A", "B", f"B - A ({metric})", "relative", "standard error", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rest:
        for a, b in pairs:
            runs_a = groups.get(r[:k] + (a,) + r[k:], [])
            runs_b = groups.get(r[:k] + (b,) + r[k:], [])
            va = [x[field] for x in runs_a if x[field] is not None]
            vb = [x[field] for x in runs_b if x[field] is not None]
            if not va or not vb:
                continue
            probe_var = None
            if metric != "val/loss":
                pa = [probe_variance(x, field) for x in runs_a if x[field] is not None]
                pb = [probe_variance(x, field) for x in runs_b if x[field] is not None]
                if None not in pa and None not in pb:
                    probe_var = (pa, pb)
            c = compare_losses(va, vb, higher_is_better=metric != "val/loss", probe_var=probe_var)
            cells = [*r, a, b, f"{c['diff']:+.4f}", f"{c['rel'] * 100:+.2f}%", f"{c['se']:.4f}", c["verdict"]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", nargs="+", help="the sweep folder, or several (a sweep run in parts)")
    p.add_argument("--group-by", nargs="+", default=["experiment"])
    p.add_argument("--compare", nargs="+", metavar=("KEY", "A:B"),
                   help="a --group-by key and pairs of its values to compare (B - A), e.g. experiment dense_lm:moe_lm")
    p.add_argument("--metric", default="val/loss",
                   help="the final metric --compare compares: val/loss (lower is better) or a recall metric, e.g. "
                        "val/facts_known (higher is better)")
    args = p.parse_args(argv)
    print(summarize(args.sweep_dir, args.group_by))
    if args.compare:
        key, *pairs = args.compare
        if not pairs or any(pair.count(":") != 1 for pair in pairs):
            p.error("--compare needs a key and at least one A:B pair")
        print()
        print(comparisons(args.sweep_dir, args.group_by, key, [tuple(x.split(":")) for x in pairs], args.metric))


if __name__ == "__main__":
    main()
