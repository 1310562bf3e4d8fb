"""tools/plot_sweep.py on a fake multirun: PNGs written, seeds aggregated to the right numbers."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from PIL import Image

from tools.plot_sweep import main as plot_main
from tools.summarize_sweep import compare_losses, comparisons, group_runs, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _job(root, name, experiment, seed, train_loss, val_loss, recall=None, total=1000, activated=None, extra=(),
         known=None, probes=None, count=None, config=None):
    """A job folder as Hydra + the CSV logger leave it: .hydra/{overrides,config}.yaml, csv/version_0/metrics.csv."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    overrides = [*extra, f"experiment={experiment}", f"seed={seed}"]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"data": {"batch_size": 4, "seq_len": 8},
                                                                **(config or {})}))
    metrics = job / "csv" / "version_0" / "metrics.csv"
    metrics.parent.mkdir(parents=True)
    fields = ["step", "train/loss", "val/loss", "val/fact_recall", "val/facts_known", "val/fact_recall_probes",
              "val/fact_count", "params/total", "params/activated"]
    with open(metrics, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerow({"step": 0, "params/total": total, "params/activated": activated or total})
        for step, loss in enumerate(train_loss):
            w.writerow({"step": step, "train/loss": loss})
        for step, loss in val_loss.items():
            w.writerow({"step": step, "val/loss": loss, "val/fact_recall": "" if recall is None else recall[step],
                        "val/facts_known": "" if known is None else known[step],
                        "val/fact_recall_probes": "" if probes is None else probes,
                        "val/fact_count": "" if count is None else count})
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


def test_scaling_lines_per_series_and_summary_table(tmp_path):
    """A sweep grouped by size and family: loss_vs_params.png joins each family's sizes; the table has the
    tokens per total parameter and the recall columns, seeds aggregated."""
    root = tmp_path / "multirun"
    for i, (size, exp, seed, val, rec, total, act) in enumerate([
        ("s", "dense_lm", 0, 2.0, 0.1, 100, 100), ("s", "dense_lm", 1, 2.2, 0.3, 100, 100),
        ("s", "moe_lm", 0, 1.8, 0.2, 200, 100), ("l", "dense_lm", 0, 1.5, 0.4, 400, 400),
        ("l", "moe_lm", 0, 1.2, 0.6, 800, 400),
    ]):
        _job(root, str(i), exp, seed, [3.0, val], {1: val}, {1: rec}, total=total, activated=act,
             extra=[f"+lm_size={size}"])
    out = plot_main([str(root), "--group-by", "+lm_size", "experiment"])
    assert out["series"] == "experiment"
    assert sorted(out["files"]) == sorted(str(root / n) for n in
                                          ("loss_vs_tokens.png", "loss_vs_params.png", "recall_vs_params.png"))
    dense_s = out["final_loss"]["+lm_size=s, experiment=dense_lm"]
    assert dense_s["seeds"] == 2 and dense_s["mean"] == pytest.approx(2.1) and dense_s["total"] == 100.0
    assert out["final_loss"]["+lm_size=l, experiment=moe_lm"]["mean"] == 1.2
    with pytest.raises(ValueError, match="--series 'seed' must be one of"):
        plot_main([str(root), "--group-by", "+lm_size", "experiment", "--series", "seed"])

    table = summarize(root, ["+lm_size", "experiment"]).splitlines()
    assert "tokens per total param" in table[0] and table[0].endswith("val/fact_recall |")
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table[2:]}
    # 2 steps x batch 4 x seq 8 = 64 tokens; dense s has 100 parameters -> 0.6 tokens per parameter
    assert "| 2 | 2.1000 ± 0.1414 | 2.0000..2.2000 | 64 | 0.6 | 100 | 100 | 0.200 ± 0.141 |" in rows[("s", "dense_lm")]
    assert "| 1 | 1.2000 ± 0.0000 |" in rows[("l", "moe_lm")] and rows[("l", "moe_lm")].endswith("| 0.600 ± 0.000 |")

    table = comparisons(root, ["+lm_size", "experiment"], "experiment", [("dense_lm", "moe_lm")]).splitlines()
    assert table[0].startswith("| +lm_size | A | B |") and len(table) == 4
    assert table[2] == "| s | dense_lm | moe_lm | -0.3000 | -14.29% | nan | needs 2+ seeds each |"
    assert table[3].startswith("| l | dense_lm | moe_lm | -0.3000 |")
    with pytest.raises(ValueError, match="--compare key 'seed' must be one of"):
        comparisons(root, ["+lm_size", "experiment"], "seed", [("0", "1")])


def test_compare_losses_verdicts():
    better = compare_losses([1.0, 1.1, 0.9], [0.5, 0.6, 0.4])
    assert better["diff"] == pytest.approx(-0.5) and better["se"] == pytest.approx((0.01 / 3 * 2) ** 0.5)
    assert better["verdict"] == "B better" and better["rel"] == pytest.approx(-0.5)
    assert compare_losses([1.0, 1.1, 0.9], [1.5, 1.6, 1.4])["verdict"] == "B worse"
    assert compare_losses([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])["verdict"] == "within noise"


def test_a_sweep_run_in_parts_is_read_as_one(tmp_path):
    first, second = tmp_path / "part1", tmp_path / "part2"
    _job(first, "0", "moe_lm", 0, [3.0, 1.0], {1: 1.0})
    _job(second, "0", "moe_lm", 1, [3.0, 2.0], {1: 2.0})  # the same job number in another folder
    table = summarize([first, second], ["experiment"])
    assert "| moe_lm | 2 | 1.5000 ± 0.7071 |" in table
    out = plot_main([str(first), str(second), "--out", str(tmp_path / "figs")])
    assert out["sweep"] == [str(first), str(second)] and out["loss"]["experiment=moe_lm"]["val/loss"]["seeds"] == 2
    alone = comparisons([first, second], ["experiment"], "experiment", [("moe_lm", "moe_lm")]).splitlines()
    assert alone[0] == "| A | B | B - A (val/loss) | relative | standard error | verdict |"
    assert alone[1] == "| --- | --- | --- | --- | --- | --- |" and alone[2].startswith("| moe_lm | moe_lm | +0.0000 |")
    for i, exp in ((10, "z_lm"), (2, "a_lm")):  # job 2 ran before job 10: its group comes first
        _job(second, str(i), exp, 0, [1.0], {0: 1.0})
    assert list(group_runs([second], ["experiment"])) == [("moe_lm",), ("a_lm",), ("z_lm",)]
    with pytest.raises(FileNotFoundError, match="part3 does not exist"):
        summarize([first, tmp_path / "part3"], ["experiment"])


def test_knowledge_capacity_table_and_recall_against_people(tmp_path):
    """A capacity sweep grouped by people and family: facts known per 1k total parameters in the table,
    and recall_vs_data.num_people.png with one line per family over the number of people."""
    root = tmp_path / "multirun"
    jobs = [(100, "dense_lm", 0, 0.5, 400.0, 1000), (100, "dense_lm", 1, 0.3, 240.0, 1000),
            (400, "dense_lm", 0, 0.2, 640.0, 1000), (100, "moe_lm", 0, 0.6, 480.0, 2000),
            (400, "moe_lm", 0, 0.4, 1280.0, 2000)]
    for i, (people, exp, seed, rec, known, total) in enumerate(jobs):
        _job(root, str(i), exp, seed, [3.0, 2.0], {1: 2.0}, {1: rec}, total=total, known={1: known},
             extra=[f"data.num_people={people}"])
    table = summarize(root, ["data.num_people", "experiment"]).splitlines()
    assert table[0].endswith("| val/fact_recall | val/facts_known | facts known per 1k total params |")
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table[2:]}
    # dense, 100 people: 400 and 240 facts known by 1,000 parameters -> 0.4 and 0.24 per 1k
    assert rows[("100", "dense_lm")].endswith("| 0.400 ± 0.141 | 320.0 ± 113.1 | 320.000 ± 113.137 |")
    assert rows[("400", "moe_lm")].endswith("| 0.400 ± 0.000 | 1280.0 ± 0.0 | 640.000 ± 0.000 |")

    out = plot_main([str(root), "--group-by", "data.num_people", "experiment", "--x", "data.num_people"])
    assert str(root / "recall_vs_data.num_people.png") in out["files"]
    with open(root / "recall_vs_data.num_people.png", "rb") as f:
        assert f.read(8) == PNG_MAGIC
    points = {p["x"]: p for p in out["by_data.num_people"]["moe_lm"]}
    assert sorted(points) == [100.0, 400.0]
    assert points[400.0]["val/facts_known"]["mean"] == 1280.0 and points[400.0]["known_per_k"]["mean"] == 640.0
    dense = {p["x"]: p for p in out["by_data.num_people"]["dense_lm"]}
    assert dense[100.0]["val/fact_recall"] == {"seeds": 2, "mean": pytest.approx(0.4), "min": 0.3, "max": 0.5,
                                               "total": 1000.0, "activated": 1000.0}
    assert dense[100.0]["known_per_k"]["min"] == 240.0
    table = comparisons(root, ["data.num_people", "experiment"], "experiment", [("moe_lm", "dense_lm")],
                        metric="val/facts_known").splitlines()
    assert table[0] == "| data.num_people | A | B | B - A (val/facts_known) | relative | standard error | verdict |"
    assert table[2] == "| 100 | moe_lm | dense_lm | -160.0000 | -33.33% | nan | needs 2+ seeds each |"
    assert compare_losses([0.5, 0.6], [0.8, 0.9], higher_is_better=True)["verdict"] == "B better"
    assert compare_losses([0.5, 0.6], [0.8, 0.9])["verdict"] == "B worse"
    with pytest.raises(ValueError, match="--metric must be val/loss or one of"):
        comparisons(root, ["data.num_people", "experiment"], "experiment", [("moe_lm", "dense_lm")], metric="x")
    with pytest.raises(ValueError, match="--x 'seed' must be one of"):
        plot_main([str(root), "--group-by", "data.num_people", "experiment", "--x", "seed"])
    with pytest.raises(ValueError, match="--x 'experiment' must take numeric values"):
        plot_main([str(root), "--group-by", "data.num_people", "experiment", "--x", "experiment"])


def test_single_seed_recall_comparison_falls_back_to_the_probes_binomial_error(tmp_path):
    """One seed per side: no seed spread to measure, so the standard error is the probes' own
    (p(1 - p) / probes; for facts known, times the fact count squared), and the verdict says so."""
    root = tmp_path / "multirun"
    # 400 probes each; dense 0.2 and MoE 0.3 of 1,000 facts -> facts known 200 / 300
    _job(root, "0", "dense_lm", 0, [2.0], {0: 2.0}, {0: 0.2}, known={0: 200.0}, probes=400, count=1000)
    _job(root, "1", "moe_lm", 0, [2.0], {0: 2.0}, {0: 0.3}, known={0: 300.0}, probes=400, count=1000)
    # an older run without the probe count: the configured cap (here under the fact count) stands in for it
    _job(root, "2", "moue_lm", 0, [2.0], {0: 2.0}, {0: 0.31}, known={0: 310.0}, count=1000,
         config={"callbacks": {"fact_recall": {"max_probes": 100}}})
    pairs = [("dense_lm", "moe_lm"), ("moe_lm", "moue_lm")]
    rate = comparisons(root, ["experiment"], "experiment", pairs, metric="val/fact_recall").splitlines()
    se = (0.2 * 0.8 / 400 + 0.3 * 0.7 / 400) ** 0.5  # 0.0304: a 0.1 difference is 3.3 of them
    assert rate[2] == f"| dense_lm | moe_lm | +0.1000 | +50.00% | {se:.4f} | B better (probe noise only) |"
    se2 = (0.3 * 0.7 / 400 + 0.31 * 0.69 / 100) ** 0.5
    assert rate[3] == f"| moe_lm | moue_lm | +0.0100 | +3.33% | {se2:.4f} | within noise (probe noise only) |"
    known = comparisons(root, ["experiment"], "experiment", pairs[:1], metric="val/facts_known").splitlines()
    assert known[2] == f"| dense_lm | moe_lm | +100.0000 | +50.00% | {1000 * se:.4f} | B better (probe noise only) |"
    # val/loss has no probe error: one seed each still cannot be compared
    assert comparisons(root, ["experiment"], "experiment", pairs[:1]).splitlines()[2].endswith("| nan | needs 2+ seeds each |")
    # with 2+ seeds on both sides the seed spread is used, as before
    assert compare_losses([0.2, 0.3], [0.5, 0.6], True, probe_var=([1.0, 1.0], [1.0, 1.0]))["verdict"] == "B better"
