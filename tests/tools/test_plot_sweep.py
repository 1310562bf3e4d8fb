"""tools/plot_sweep.py on a fake multirun: PNGs written, seeds aggregated to the right numbers."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from PIL import Image

from tools.plot_sweep import main as plot_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _job(root, name, experiment, seed, train_loss, val_loss, recall=None, total=1000, activated=None):
    """A job folder as Hydra + the CSV logger leave it: .hydra/{overrides,config}.yaml, csv/version_0/metrics.csv."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"experiment={experiment}", f"seed={seed}"]))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"data": {"batch_size": 4, "seq_len": 8}}))
    metrics = job / "csv" / "version_0" / "metrics.csv"
    metrics.parent.mkdir(parents=True)
    fields = ["step", "train/loss", "val/loss", "val/fact_recall", "params/total", "params/activated"]
    with open(metrics, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerow({"step": 0, "params/total": total, "params/activated": activated or total})
        for step, loss in enumerate(train_loss):
            w.writerow({"step": step, "train/loss": loss})
        for step, loss in val_loss.items():
            w.writerow({"step": step, "val/loss": loss, "val/fact_recall": "" if recall is None else recall[step]})
    return job


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun"
    _job(root, "0", "lm_tiny", 0, [4.0, 3.0, 2.0, 1.0], {1: 3.5, 3: 1.5}, {1: 0.1, 3: 0.3}, total=1000)
    _job(root, "1", "lm_tiny", 1, [6.0, 5.0, 2.0, 3.0], {1: 4.5, 3: 2.5}, {1: 0.2, 3: 0.5}, total=1000)
    _job(root, "2", "moe_lm", 0, [5.0, 4.0, 3.0], {2: 3.0}, {2: 0.7}, total=5000, activated=2000)
    (root / "notes").mkdir()  # a folder that is not a job is skipped
    return root


def test_plot_sweep_writes_pngs_and_aggregates_seeds(sweep, tmp_path, capsys):
    out = plot_main([str(sweep)])
    assert json.loads(capsys.readouterr().out) == out
    assert sorted(out["files"]) == [str(sweep / "loss_vs_tokens.png"), str(sweep / "recall_vs_params.png")]
    for path in out["files"]:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC
        with Image.open(path) as im:
            im.verify()
    dense = out["loss"]["experiment=lm_tiny"]["train/loss"]
    assert dense["seeds"] == 2 and dense["steps"] == [0, 1, 2, 3]
    assert dense["tokens"] == [32, 64, 96, 128]  # (step + 1) * batch_size 4 * seq_len 8
    assert dense["mean"] == [5.0, 4.0, 2.0, 2.0] and dense["min"] == [4.0, 3.0, 2.0, 1.0]
    assert dense["max"] == [6.0, 5.0, 2.0, 3.0]
    val = out["loss"]["experiment=lm_tiny"]["val/loss"]
    assert val["mean"] == [4.0, 2.0] and val["tokens"] == [64, 128]
    assert out["loss"]["experiment=moe_lm"]["train/loss"]["seeds"] == 1
    recall = out["recall"]
    assert recall["experiment=lm_tiny"] == {"seeds": 2, "mean": pytest.approx(0.4), "min": 0.3, "max": 0.5,
                                            "total": 1000.0, "activated": 1000.0}
    assert recall["experiment=moe_lm"]["activated"] == 2000.0 and recall["experiment=moe_lm"]["mean"] == 0.7
    assert not list(sweep.glob(".*.tmp*"))  # atomic writes leave no temporary files


def test_plot_sweep_out_dir_and_no_recall(tmp_path):
    root = tmp_path / "multirun"
    _job(root, "0", "lm_tiny", 0, [2.0, 1.0], {1: 1.5})
    out = plot_main([str(root), "--out", str(tmp_path / "figs")])
    assert out["files"] == [str(tmp_path / "figs" / "loss_vs_tokens.png")] and out["recall"] == {}
    with pytest.raises(ValueError, match="no job with a metrics.csv"):
        plot_main([str(tmp_path / "figs")])
