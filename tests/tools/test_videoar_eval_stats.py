"""The evaluation-power statistics of tools/eval_videoar.py and tools/videoar_ablation.py on hand-made inputs:
bootstrap intervals of known width, PSNR of per-clip MSEs equal to the whole set's, and the ablation table's
noise columns and verdicts."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

from tools.eval_videoar import bootstrap_ci, frechet_distance, psnr_from_mse
from tools.videoar_ablation import compare, summarize


def test_bootstrap_interval_of_a_mean_has_the_textbook_width():
    x = torch.randn(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lo, hi = bootstrap_ci(lambda i: x[i].mean(), (400,), resamples=1000, seed=1)
    assert lo < float(x.mean()) < hi
    # 95% interval of a mean of 400 unit-variance values: +-1.96 / 20 = +-0.098
    assert (hi - lo) / 2 == pytest.approx(1.96 * float(x.std()) / 20, rel=0.15)
    assert bootstrap_ci(lambda i: x[i].mean(), (400,), 50, seed=3) == bootstrap_ci(lambda i: x[i].mean(), (400,), 50, seed=3)
    with pytest.raises(ValueError, match="at least 2 resamples"):
        bootstrap_ci(lambda i: x[i].mean(), (400,), 1)


def test_two_sample_bootstrap_draws_each_side_independently():
    seen = []
    bootstrap_ci(lambda i, j: seen.append((len(i), len(j), int(i.max()), int(j.max()))) or 0.0, (5, 9), 20)
    assert {s[:2] for s in seen} == {(5, 9)} and max(s[2] for s in seen) < 5 and max(s[3] for s in seen) > 5
    # FD of a resample of a set against itself is near its floor; against a shifted copy it is near the shift
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 2, generator=g)
    b = a + torch.tensor([3.0, 0.0])
    lo, hi = bootstrap_ci(lambda i, j: frechet_distance(a[i], b[j]), (300, 300), 100)
    assert 7.0 < lo < 9.0 < hi < 11.5


def test_psnr_of_per_clip_mse_is_the_psnr_of_the_whole_set():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(6, 3, 4, 8, 8, generator=g), torch.rand(6, 3, 4, 8, 8, generator=g)
    mse = (a - b).pow(2).flatten(1).mean(1)
    assert float(psnr_from_mse(mse)) == pytest.approx(float(peak_signal_noise_ratio(a, b, data_range=1.0)), rel=1e-6)


def _run(fd, psnr1, psnr2, ci_fd=0.1, ci_psnr=0.05):
    return {"fd_tokenizer": fd, "fd_tokenizer_real_split": 0.2, "future_psnr": {"1": psnr1, "2": psnr2},
            "bit_acc_per_frame": [0.9, 0.95],
            "ci95": {"resamples": 10, "fd_tokenizer": [fd - ci_fd, fd + ci_fd],
                     "future_psnr": {"1": [psnr1 - ci_psnr, psnr1 + ci_psnr], "2": [psnr2 - 0.2, psnr2 + 0.2]}}}


def test_compare_verdicts():
    assert compare([1.0, 1.1, 0.9], [2.0, 2.1, 1.9])[2] == "differs"
    diff, se, verdict = compare([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])
    assert diff == pytest.approx(0.5) and se == pytest.approx((2 / 3) ** 0.5) and verdict == "within noise"
    assert compare([1.0], [2.0])[2] == "needs 2+ seeds each"


def test_ablation_table_has_noise_columns_and_verdicts():
    results = {
        "baseline": [_run(2.0, 15.0, 14.0), _run(2.1, 15.1, 14.1), _run(1.9, 14.9, 13.9)],
        "mst": [_run(1.0, 15.0, 14.0, ci_fd=0.3), _run(1.1, 15.1, 14.1, ci_fd=0.3), _run(0.9, 14.9, 13.9, ci_fd=0.3)],
        "tdc": [_run(1.0, 16.0, 14.0), _run(3.0, 16.1, 14.1), _run(5.0, 15.9, 13.9)],
    }
    table = summarize(results)
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "| 2.000 ± 0.100 | ±0.100 | 15.000 ± 0.100 | ±0.050 | 14.000 ± 0.100 | ±0.200 |" in lines["baseline"]
    assert "| ±0.300 |" in lines["mst"]
    verdicts = [line for line in table.splitlines() if "->" in line]
    assert "| baseline -> mst | FD | -1.000 | 0.082 | differs (B better) |" in verdicts
    assert "| mst -> tdc | FD | +2.000 | 1.156 | within noise |" in verdicts
    assert "| mst -> tdc | PSNR h=1 | +1.000 | 0.082 | differs (B better) |" in verdicts
    # the longest horizon (here h=2), where drift shows, is compared too
    assert "| mst -> tdc | PSNR last h | +0.000 | 0.082 | within noise |" in verdicts
    assert any(v.startswith("| baseline -> tdc |") for v in verdicts)  # every configuration against the baseline too


def _long_run(psnrs: list[float]) -> dict:
    run = _run(1.0, psnrs[0], psnrs[1])
    run["future_psnr"] = {str(h + 1): v for h, v in enumerate(psnrs)}
    return run


def test_long_clips_get_a_table_by_horizon():
    """With more than two predicted latent frames the summary lists every horizon and each comparison's
    difference at each one, so a gap that grows with the horizon (drift) is visible."""
    results = {
        "mst": [_long_run([15.0, 14.0, 13.0, 12.0]), _long_run([15.1, 14.1, 13.1, 12.1])],
        "full": [_long_run([15.0, 14.1, 13.5, 13.0]), _long_run([15.1, 14.2, 13.6, 13.1])],
    }
    table = summarize(results)
    assert "| config | h=1 | h=2 | h=3 | h=4 |" in table
    assert "| mst | 15.050 ± 0.071 | 14.050 ± 0.071 | 13.050 ± 0.071 | 12.050 ± 0.071 |" in table
    assert ("| mst -> full | +0.000 ± 0.071 | +0.100 ± 0.071 | +0.500 ± 0.071 * | +1.000 ± 0.071 * |"
            in table)
    # two horizons (9-frame clips): the main table already shows both, no extra section
    assert "by horizon" not in summarize({"a": [_run(1.0, 15.0, 14.0)] * 2, "b": [_run(1.0, 15.0, 14.0)] * 2})
