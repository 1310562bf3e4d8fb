"""benchmarks/ernie5_throughput.py in quick mode: it runs, its dense baseline matches the MoE's activated
size, and the structured mask's fast path equals the dense one (timings are reported, never asserted)."""

from __future__ import annotations

from tests.helpers import load_benchmark


def test_ernie5_throughput_quick_equal_activated_sizes_and_mask_paths_agree():
    out = load_benchmark("ernie5_throughput").main(["--quick"])
    moe, dense = out["params"]["moe"], out["params"]["dense"]
    assert abs(dense["activated"] - moe["activated"]) <= 0.05 * moe["activated"]
    assert moe["total"] > moe["activated"] and dense["total"] == dense["activated"]  # sparse vs dense
    assert out["max_abs_diff_segments_vs_sdpa"] < 1e-5
    tp = out["throughput"]
    assert tp["tokens_per_pass"] > 0 and tp["moe_tokens_per_s"] > 0 and tp["dense_tokens_per_s"] > 0
    assert tp["dense_over_moe_time_ratio"] > 0 and tp["aa_ratio"] > 0
    assert set(out["masks"]) == {"segments", "sdpa"}  # the CPU default, and dense booleans
    assert out["masks"]["segments"]["plan"] == "segments" and out["masks"]["sdpa"]["plan"] == "dense"
    for r in out["masks"].values():
        assert r["masked_over_causal"] > 0 and r["aa_ratio"] > 0
