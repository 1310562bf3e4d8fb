"""Run VideoAR's ablations at small scale (papers.md Table 4 and the Random Frame Mask comparison),
several seeds each, evaluate every run with tools/eval_videoar.py and print a markdown table: each
metric's spread over seeds beside its bootstrap interval over evaluation clips, then every step of the
table (and every configuration against the baseline) as a difference of seed means with its standard
error and a verdict (differs: more than two standard errors).

    python tools/videoar_ablation.py --tokenizer TOK.ckpt --cache CACHE_DIR --out logs/videoar_ablation \
        [--seeds 0 1 2] [--steps 300] [--configs baseline mst tdc full full_rfm]

Configurations (each adds to the previous, as in the paper's table):
    baseline   1-D sequence-index RoPE, plain teacher forcing
    mst        + multi-scale temporal RoPE
    tdc        + time-dependent corruption (CFEC without inheritance)
    full       + cross-frame error inheritance (full CFEC)
    full_rfm   full + Random Frame Mask (p_mask 0.1)
Training reads the token cache (data=tokens, built by tools/tokenize_dataset.py with features);
evaluation decodes held-out clips of the video data the cache was built from (`--data` overrides).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.io import atomic_write_text  # noqa: E402
from tools.summarize_sweep import compare_losses  # noqa: E402

CONFIGS: dict[str, list[str]] = {
    "baseline": ["model.net.rope=1d", "model.cfec.enabled=false"],
    "mst": ["model.net.rope=mst", "model.cfec.enabled=false"],
    "tdc": ["model.net.rope=mst", "model.cfec.enabled=true", "model.cfec.inherit=false"],
    "full": ["model.net.rope=mst", "model.cfec.enabled=true", "model.cfec.inherit=true"],
    "full_rfm": ["model.net.rope=mst", "model.cfec.enabled=true", "model.cfec.inherit=true", "model.frame_mask_prob=0.1"],
}


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--cache", required=True, help="token cache (with features) of the training clips")
    p.add_argument("--out", default="logs/videoar_ablation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--eval-clips", type=int, default=1024,
                   help="held-out clips per evaluation (docs/results.md: FD's bootstrap half-width is 1.1 at 64 "
                        "clips, 0.4 at 256 and 0.14 at 1,024)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per evaluation (tools/eval_videoar.py)")
    p.add_argument("--train-args", nargs="*", default=[], help="extra train.py overrides for every run")
    p.add_argument("--data", nargs="*", default=["experiment=videoar", "data.data_seed=1", "data.num_clips=2048",
                                                  "data.val_fraction=0.5"],
                   help="Hydra overrides selecting the (pixel) data for evaluation")
    args = p.parse_args(argv)
    out = Path(args.out)
    results: dict = {}
    for name in args.configs:
        for seed in args.seeds:
            run_dir = out / f"{name}_s{seed}"
            ckpt = run_dir / "checkpoints" / "last.ckpt"
            if not ckpt.is_file():
                run([sys.executable, "train.py", "experiment=videoar_cached", f"data.cache_dir={args.cache}",
                     f"data.tokenizer_ckpt={args.tokenizer}",
                     f"seed={seed}", f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
                     "model.sample.num_clips=0", "logger=csv", "test=false", "extras.print_config=false",
                     "trainer.enable_progress_bar=false", "~callbacks.rich_progress_bar", f"hydra.run.dir={run_dir}",
                     *CONFIGS[name], *args.train_args])
            res_path = run_dir / "eval.json"
            if not res_path.is_file():
                run([sys.executable, "tools/eval_videoar.py", str(ckpt), *args.data,
                     f"model.tokenizer_ckpt={args.tokenizer}", "--num-clips", str(args.eval_clips), "--seed", str(seed),
                     "--bootstrap", str(args.bootstrap),
                     "--out", str(res_path)])
            results.setdefault(name, []).append(json.loads(res_path.read_text()))
    table = summarize(results)
    print(table)
    atomic_write_text(out / "summary.md", table)
    return results


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _psnr(run: dict, h) -> float:
    return run["future_psnr"][str(h)] if str(h) in run["future_psnr"] else run["future_psnr"][int(h)]


def _ci(run: dict, metric: str, h=None) -> list[float] | None:
    ci = run.get("ci95", {}).get(metric)
    if ci is None or h is None:
        return ci
    return ci.get(str(h), ci.get(int(h))) if isinstance(ci, dict) else ci[h]


def _half_width(runs: list[dict], metric: str, h=None) -> str:
    """Mean over seeds of the bootstrap 95% interval's half-width ('-' when the runs have none)."""
    widths = [(c[1] - c[0]) / 2 for r in runs if (c := _ci(r, metric, h)) is not None]
    return f"±{statistics.mean(widths):.3f}" if widths else "-"


METRICS = {  # name -> (value of one run, higher is better)
    "FD": (lambda r: r["fd_tokenizer"], False),
    "PSNR h=1": (lambda r: _psnr(r, 1), True),
    "PSNR last h": (lambda r: _psnr(r, max(r["future_psnr"], key=int)), True),  # the longest horizon: drift
}


def compare(a: list[float], b: list[float]) -> tuple[float, float, str]:
    """Difference of seed means (b - a), its standard error (Welch) and a verdict: 'differs' when the
    difference exceeds two standard errors, else 'within noise' (seeds are the unit of replication);
    `tools.summarize_sweep.compare_losses` does the arithmetic."""
    c = compare_losses(a, b)
    return c["diff"], c["se"], ("differs" if c["verdict"] in ("B better", "B worse") else c["verdict"])


def summarize(results: dict) -> str:
    rows = ["| config | FD (tokenizer feats) ↓ | FD 95% CI | future PSNR h=1 | h=1 95% CI | future PSNR last h | "
            "last h 95% CI | bit acc frame 0 | bit acc last frame | seeds |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in results.items():
        last_h = max(runs[0]["future_psnr"], key=int)
        rows.append("| " + " | ".join([
            name,
            _ms([r["fd_tokenizer"] for r in runs]),
            _half_width(runs, "fd_tokenizer"),
            _ms([_psnr(r, 1) for r in runs]),
            _half_width(runs, "future_psnr", 1),
            _ms([_psnr(r, last_h) for r in runs]),
            _half_width(runs, "future_psnr", last_h),
            _ms([r["bit_acc_per_frame"][0] for r in runs]),
            _ms([r["bit_acc_per_frame"][-1] for r in runs]),
            str(len(runs)),
        ]) + " |")
    floor = [r["fd_tokenizer_real_split"] for runs in results.values() for r in runs]
    rows.append(f"\nReal-vs-real FD floor (two halves of the held-out clips): {statistics.mean(floor):.3f}")
    rows.append("\n'± x' after a mean is the spread over training seeds (standard deviation); a 95% CI column is the "
                "bootstrap half-width over evaluation clips, averaged over seeds (the metric's own noise).\n")
    names = list(results)
    pairs = [(names[i - 1], names[i]) for i in range(1, len(names))]
    if names and names[0] == "baseline":
        pairs += [("baseline", n) for n in names[2:]]
    if pairs:
        rows += ["| comparison | metric | difference (B - A) | standard error | verdict |", "| --- | --- | --- | --- | --- |"]
        for a, b in pairs:
            for metric, (value, higher) in METRICS.items():
                diff, se, verdict = compare([value(r) for r in results[a]], [value(r) for r in results[b]])
                if verdict == "differs":
                    verdict += " (B better)" if (diff > 0) == higher else " (B worse)"
                rows.append(f"| {a} -> {b} | {metric} | {diff:+.3f} | {se:.3f} | {verdict} |")
    rows += _by_horizon(results, pairs)
    return "\n".join(rows) + "\n"


def _by_horizon(results: dict, pairs: list[tuple[str, str]]) -> list[str]:
    """Future PSNR at every horizon (longer clips have more than two): drift shows as a gap that grows
    with the horizon. One table of seed means ± spread, then each comparison's difference at each
    horizon with its standard error ('*' marks more than two)."""
    horizons = sorted({int(h) for runs in results.values() for r in runs for h in r["future_psnr"]})
    if len(horizons) <= 2:
        return []
    head = "| " + " | ".join(f"h={h}" for h in horizons) + " |"
    sep = " --- |" * len(horizons)
    rows = ["\nFuture PSNR by horizon (mean ± spread over seeds):\n", "| config " + head, "| --- |" + sep]
    for name, runs in results.items():
        rows.append(f"| {name} | " + " | ".join(_ms([_psnr(r, h) for r in runs]) for h in horizons) + " |")
    if pairs:
        rows += ["\nDifference of future PSNR (B - A) by horizon, ± its standard error; '*': beyond two:\n",
                 "| comparison " + head, "| --- |" + sep]
        for a, b in pairs:
            cells = []
            for h in horizons:
                diff, se, verdict = compare([_psnr(r, h) for r in results[a]], [_psnr(r, h) for r in results[b]])
                cells.append(f"{diff:+.3f} ± {se:.3f}" + (" *" if verdict == "differs" else ""))
            rows.append(f"| {a} -> {b} | " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
