"""Utilities shared by the end-to-end tests."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_metric(csv_path: Path, name: str = "train/loss") -> dict[int, float]:
    """{step: value} for one column of a Lightning CSVLogger metrics.csv (rows without it skipped)."""
    out: dict[int, float] = {}
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            if row.get(name):
                out[int(row["step"])] = float(row[name])
    return out


def find_metrics(run_dir: Path) -> Path:
    found = sorted(Path(run_dir).rglob("metrics.csv"))
    assert found, f"no metrics.csv under {run_dir}"
    return found[0]


def run_train_cli(args: list[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a subprocess, from the repository root."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def resume_trainer(**kw):
    """A quiet one-process CPU Trainer for the exact-resume tests (no validation; checkpoints only
    when callbacks are given)."""
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=bool(kw.get("callbacks")),
                     use_distributed_sampler=False, limit_val_batches=0, num_sanity_val_steps=0, **kw)
