"""ERNIE 3.0 ablations at small scale, several seeds each; prints markdown tables and writes summary.json.

    python tools/ernie3_ablation.py --out logs/ernie3_ablation [--seeds 0 1 2] [--steps 600]
        [--configs full no_uktp no_km] [--progressive] [--seen-templates 0 1 2]
        [--relation-templates 0 1 2 3] [-- extra train.py overrides]

Pre-training configurations (papers.md 3.2 and its UKTP ablation):
    full      all five tasks, knowledge masking
    no_uktp   without universal knowledge-text prediction (data.task_ratios.uktp=0)
    no_km     knowledge-masked LM with single-word masking only (data.knowledge_masking=false)
    no_uktp_eq  without UKTP at equal per-task steps: (T-1)/T of --steps for T uniform tasks, so each
              remaining task gets as many steps as in `full` (no_uktp at the same steps gives them more)
Every pre-trained model is then
  * probed zero-shot (tools/ernie3_probe.py: cloze accuracy on facts of people seen in pre-training,
    in a template pre-training never used);
  * fine-tuned on relation classification (experiment=ernie3_finetune, held-out people and wording);
    with --relation-templates, fine-tuned again and tested on every held-out fact once per listed
    wording (data.eval_templates: a test set len(templates) times larger);
  * read for the document-LM loss of each segment with memory on vs off (validation of the full run).
--progressive adds pre-training with vs without +callbacks/progressive=default (same steps, validated
every --val-every steps at fixed shapes) and reports the steps and training seconds each needs to
reach the worse one's final validation loss.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.io import atomic_write_text  # noqa: E402

CONFIGS: dict[str, list[str]] = {
    "full": [],
    "no_uktp": ["data.task_ratios.uktp=0"],
    "no_km": ["data.knowledge_masking=false"],
    "no_uktp_eq": ["data.task_ratios.uktp=0"],
}
# fraction of --steps a configuration trains: without UKTP, 4/5 of the steps give each of the four
# remaining (uniformly mixed) tasks the same number of steps as the five-task run
STEP_FACTOR: dict[str, float] = {"no_uktp_eq": 0.8}
BASE = ["experiment=ernie3", "logger=csv", "extras.print_config=false", "~callbacks.rich_progress_bar",
        "trainer.enable_progress_bar=false"]


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def metrics(run_dir: Path) -> list[dict]:
    path = next(run_dir.rglob("metrics.csv"))
    with open(path) as f:
        return list(csv.DictReader(f))


def last(rows: list[dict], name: str) -> float | None:
    vals = [float(r[name]) for r in rows if r.get(name)]
    return vals[-1] if vals else None


def val_curve(rows: list[dict]) -> list[tuple[int, float, float]]:
    """(step, val/loss, training seconds elapsed at that step) at every validation."""
    elapsed = {int(r["step"]): float(r["train/elapsed_s"]) for r in rows if r.get("train/elapsed_s")}
    out = []
    for r in rows:
        if r.get("val/loss"):
            step = int(r["step"])
            near = max((s for s in elapsed if s <= step), default=None)
            out.append((step + 1, float(r["val/loss"]), elapsed.get(near, float("nan"))))
    return out


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="logs/ernie3_ablation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--progressive", action="store_true")
    p.add_argument("--progressive-steps", type=int, default=None, help="steps of the progressive comparison (default --steps)")
    p.add_argument("--val-every", type=int, default=100, help="validation interval of the progressive comparison")
    p.add_argument("--probes", type=int, default=300)
    p.add_argument("--relation-templates", type=int, nargs="*", default=[],
                   help="also fine-tune and test relation classification on every held-out fact in each of these wordings")
    p.add_argument("--seen-templates", type=int, nargs="*", default=[0, 1, 2],
                   help="also probe in these (pre-training) templates: memorisation, next to the held-out wording")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    py = sys.executable
    results: dict = {"pretrain": {}, "progressive": {}}
    for name in args.configs:
        for seed in args.seeds:
            rd = out / f"{name}_s{seed}"
            ckpt = rd / "checkpoints" / "last.ckpt"
            steps = round(args.steps * STEP_FACTOR.get(name, 1.0))
            if not ckpt.is_file():
                run([py, "train.py", *BASE, *CONFIGS[name], *extra, f"seed={seed}", f"trainer.max_steps={steps}",
                     f"model.optim.total_steps={steps}", "test=false", f"hydra.run.dir={rd}"])
            rows = metrics(rd)
            probe_path = rd / "probe.json"
            if not probe_path.is_file():
                res = subprocess.run([py, "tools/ernie3_probe.py", str(ckpt), "--max-probes", str(args.probes)],
                                     cwd=ROOT, check=True, capture_output=True, text=True)
                atomic_write_text(probe_path, res.stdout.strip().splitlines()[-1])
            probe = json.loads(probe_path.read_text())
            seen_path = rd / "probe_seen_wording.json"
            if args.seen_templates and not seen_path.is_file():
                res = subprocess.run([py, "tools/ernie3_probe.py", str(ckpt), "--max-probes", str(args.probes),
                                      "--templates", *map(str, args.seen_templates)],
                                     cwd=ROOT, check=True, capture_output=True, text=True)
                atomic_write_text(seen_path, res.stdout.strip().splitlines()[-1])
            seen = json.loads(seen_path.read_text()) if seen_path.is_file() else {}
            relation = {}
            for tag, over in (("", []), ("_t" + "".join(map(str, args.relation_templates)),
                                          [f"data.eval_templates=[{','.join(map(str, args.relation_templates))}]"])):
                if tag and not args.relation_templates:
                    continue
                fd = out / f"{name}_s{seed}_relation{tag}"
                if not any(fd.rglob("metrics.csv")):
                    run([py, "train.py", "experiment=ernie3_finetune", "logger=csv", "extras.print_config=false",
                         "~callbacks.rich_progress_bar", "trainer.enable_progress_bar=false", f"model.init_ckpt={ckpt}",
                         f"seed={seed}", f"trainer.max_steps={args.finetune_steps}", f"hydra.run.dir={fd}",
                         *[e for e in extra if e.startswith("data.")], *over])
                relation[tag] = last(metrics(fd), "test/acc")
            segs = sorted({int(k.removeprefix("val/dlm_seg")) for r in rows for k in r if k.startswith("val/dlm_seg") and r[k]})
            results["pretrain"][f"{name}_s{seed}"] = {
                "config": name, "seed": seed, "steps": steps,
                "val_loss": {t: last(rows, f"val/loss_{t}") for t in ("kmlm", "dlm", "reorder", "distance", "uktp")},
                "val_acc": {t: last(rows, f"val/acc_{t}") for t in ("kmlm", "reorder", "distance", "uktp")},
                "dlm_seg_memory_on": [last(rows, f"val/dlm_seg{s}") for s in segs],
                "dlm_seg_memory_off": [last(rows, f"val/dlm_nomem_seg{s}") for s in segs],
                "cloze_accuracy": probe["cloze_accuracy"], "cloze_chance": probe["chance"],
                "cloze_seen_wording": seen.get("cloze_accuracy"), "cloze_seen_chance": seen.get("chance"),
                "relation_test_acc": relation[""],
                "relation_test_acc_templates": ({"templates": args.relation_templates, "acc": relation[tag]}
                                                if args.relation_templates else None),
            }
    if args.progressive:
        steps = args.progressive_steps or args.steps
        for seed in args.seeds:
            curves = {}
            for variant, over in (("off", []), ("on", ["+callbacks/progressive=default"])):
                rd = out / f"progressive_{variant}_s{seed}"
                if not any(rd.rglob("metrics.csv")):
                    run([py, "train.py", *BASE, *over, *extra, f"seed={seed}", f"trainer.max_steps={steps}",
                         f"model.optim.total_steps={steps}", "test=false", f"trainer.val_check_interval={args.val_every}",
                         f"hydra.run.dir={rd}"])
                curves[variant] = val_curve(metrics(rd))
            # validation batches have fixed shapes, so both variants are measured alike; the target
            # is the worse variant's final validation loss (both reach it)
            target = max(c[-1][1] for c in curves.values())
            entry = {"target_val_loss": round(target, 4)}
            for variant, c in curves.items():
                hit = next(pt for pt in c if pt[1] <= target)
                entry[variant] = {"steps_to_target": hit[0], "seconds_to_target": round(hit[2], 1),
                                  "final_val_loss": round(c[-1][1], 4)}
            results["progressive"][f"s{seed}"] = entry
    atomic_write_text(out / "summary.json", json.dumps(results, indent=1))
    print(report(results))
    return results


def report(results: dict) -> str:
    by: dict[str, list] = {}
    for r in results["pretrain"].values():
        by.setdefault(r["config"], []).append(r)
    multi = [r["relation_test_acc_templates"] for r in results["pretrain"].values() if r.get("relation_test_acc_templates")]
    multi_head = f" | relation acc, wordings {multi[0]['templates']}" if multi else ""
    lines = ["| config | steps | cloze acc, held-out wording (chance) | cloze acc, pre-training wording (chance) | relation acc"
             f"{multi_head} | val kmlm | val uktp | val reorder acc | val distance acc |",
             "| --- " * (9 + bool(multi)) + "|"]
    for name, rs in by.items():
        multi_cell = ""
        if multi:
            accs = [r["relation_test_acc_templates"]["acc"] for r in rs if r.get("relation_test_acc_templates")]
            multi_cell = f" | {mean_sd(accs)} ({' / '.join(f'{a:.3f}' for a in accs)})"
        seen = [r for r in rs if r.get("cloze_seen_wording") is not None]
        seen_cell = (f"{mean_sd([r['cloze_seen_wording'] for r in seen])} "
                     f"({statistics.fmean(r['cloze_seen_chance'] for r in seen):.3f})") if seen else "n/a"
        steps = sorted({r.get("steps") for r in rs if r.get("steps")})
        lines.append(f"| {name} | {'/'.join(map(str, steps)) or '?'} "
                     f"| {mean_sd([r['cloze_accuracy'] for r in rs])} ({statistics.fmean(r['cloze_chance'] for r in rs):.3f}) "
                     f"| {seen_cell} | {mean_sd([r['relation_test_acc'] for r in rs])}{multi_cell} "
                     f"| {mean_sd([r['val_loss']['kmlm'] for r in rs])} "
                     f"| {mean_sd([r['val_loss']['uktp'] for r in rs])} | {mean_sd([r['val_acc']['reorder'] for r in rs])} "
                     f"| {mean_sd([r['val_acc']['distance'] for r in rs])} |")
    if "full" in by:
        rs = by["full"]
        n = len(rs[0]["dlm_seg_memory_on"])
        lines += ["", "| document-LM segment | loss, memory on | loss, memory off |", "| --- | --- | --- |"]
        for s in range(n):
            lines.append(f"| {s} | {mean_sd([r['dlm_seg_memory_on'][s] for r in rs])} "
                         f"| {mean_sd([r['dlm_seg_memory_off'][s] for r in rs])} |")
    if results["progressive"]:
        lines += ["", "| seed | target val loss | steps to it (off / on) | seconds to it (off / on) | final val loss (off / on) |",
                  "| --- | --- | --- | --- | --- |"]
        for seed, e in results["progressive"].items():
            lines.append(f"| {seed} | {e['target_val_loss']} | {e['off']['steps_to_target']} / {e['on']['steps_to_target']} "
                         f"| {e['off']['seconds_to_target']} / {e['on']['seconds_to_target']} "
                         f"| {e['off']['final_val_loss']} / {e['on']['final_val_loss']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
