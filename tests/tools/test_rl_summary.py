"""tools/rl_summary.py aggregates seeds per condition from metrics.csv files."""

from __future__ import annotations

import csv

from tools.rl_summary import main


def write_run(path, accs, entropies, test_acc):
    path.mkdir(parents=True)
    names = ["step", "rl/acc", "rl/entropy", "rl/clip_frac", "rl/entropy_collapsed", "test/acc"]
    with open(path / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, names)
        w.writeheader()
        for step, (a, e) in enumerate(zip(accs, entropies)):
            w.writerow({"step": step, "rl/acc": a, "rl/entropy": e, "rl/clip_frac": 0.1,
                        "rl/entropy_collapsed": float(e < 0.1)})
        w.writerow({"step": len(accs), "test/acc": test_acc})


def test_rl_summary_groups_seeds_and_plots(tmp_path, capsys):
    write_run(tmp_path / "dense_s0", [0.1, 0.2, 0.5, 0.6], [1.0, 0.9, 0.5, 0.4], 0.3)
    write_run(tmp_path / "dense_s1", [0.1, 0.1, 0.3, 0.4], [1.0, 0.8, 0.2, 0.05], 0.5)
    write_run(tmp_path / "other_s0", [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0], 0.0)
    out = main([str(tmp_path / "dense_s0"), str(tmp_path / "dense_s1"), str(tmp_path / "other_s0"),
                "--window", "2", "--plot", str(tmp_path / "curves.png")])
    d = out["dense"]
    assert d["seeds"] == 2 and abs(d["test_acc_mean"] - 0.4) < 1e-9 and d["test_acc_range"] == [0.3, 0.5]
    assert abs(d["train_acc_first"] - 0.125) < 1e-9 and abs(d["train_acc_last"] - 0.45) < 1e-9
    assert d["collapsed_runs"] == 1 and out["other"]["collapsed_runs"] == 0
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert "| dense | 2 | 0.400 |" in capsys.readouterr().out
