"""Benchmarks in quick mode: they run, print their JSON, and their equivalence claims hold
(timings are reported, never asserted)."""

from __future__ import annotations


import pytest

from tests.helpers import load_benchmark

load = load_benchmark


@pytest.mark.slow
def test_train_overhead_plain_loop_and_lightning_losses_identical(tmp_path):
    bench = load("train_overhead")
    out = bench.main(["--preset", "tiny", "--steps", "4", "--repeats", "1", "--seq-len", "32", "--batch-size", "4",
                      "--cache-dir", str(tmp_path)])
    assert out["max_abs_loss_diff"] == 0.0
    assert out["ratio_lightning_over_plain"] > 0 and out["aa_ratio_plain_over_plain"] > 0


def test_tokenizer_throughput_quick_runs_and_lookups_agree():
    out = load("tokenizer_throughput").main(["--quick"])
    assert out["visual"][0]["encode_frames_per_s"] > 0 and out["audio"][0]["encode_audio_s_per_s"] > 0
    # the script asserts that matmul VQ search == cdist and sign lookup == exhaustive search before timing
    assert out["lookup"]["vq"]["speedup"] > 0 and out["lookup"]["bitwise"]["implicit_codebook"] == 1024


def test_tokenizer_throughput_reports_a_trained_tokenizers_quality_with_colour(tiny_tokenizer):
    from tools.tokenizer_colour import report

    out = load("tokenizer_throughput").main(["--quick", "--ckpt", str(tiny_tokenizer)])
    (row,) = out["trained"]
    assert row["frames"] == 5 and row["size"] == 16 and row["clips"] == 2  # tiny: time stride 2, 16x16
    ref = report(str(tiny_tokenizer), clips=2, frames=5, size=16)["final"]  # the same clips and metrics
    for k in ("psnr", "psnr_r", "psnr_y", "psnr_cbcr", "chroma_ratio", "chroma_error"):
        assert row[k] == pytest.approx(ref[k], rel=1e-6), k
    assert row["encode_frames_per_s"] > 0 and row["decode_frames_per_s"] > 0
    with pytest.raises(SystemExit):
        load("tokenizer_throughput").main(["--quick", "--ckpt", "no_such.ckpt"])


def test_attention_quick_fast_path_equals_reference_and_its_mask_grows_linearly():
    out = load("attention").main(["--quick"])
    assert all(r["max_abs_grad_diff"] < 1e-6 for r in out["results"])
    assert {r["fast_path"] for r in out["results"]} == {"segments"}  # on CPU
    for kind, g in out["mask_growth_first_to_last_size"].items():
        assert g["fast_mask_bytes_ratio"] == pytest.approx(g["tokens_ratio"], rel=0.01)  # O(L): the ids only
        assert g["reference_mask_bytes_ratio"] > 0.9 * g["tokens_ratio"] ** 2  # O(L^2)
    assert out["aa_ratio_reference_over_reference"] > 0


def test_elastic_decode_quick_reports_every_sub_model_with_its_activated_share():
    out = load("elastic_decode").main(["--quick"])
    names = [r["sub_model"] for r in out["results"]]
    assert names[0] == "ES 25% (top-k / 4)" and len(names) == 5
    for r in out["results"]:
        assert 0 < r["activated_fraction"] < 1 and r["speedup_full_over_sub"] > 0 and r["sub_tokens_per_s"] > 0
    width = out["results"][3]
    assert width["total_fraction"] < width["activated_fraction"]  # dropping experts removes stored, not active, weights
    assert out["aa_ratio_full_over_full"] > 0


def test_ernie3_memory_quick_reports_both_comparisons():
    out = load("ernie3_memory").main(["--quick"])
    dlm, nlu = out["dlm"], out["nlu_vs_plain_encoder"]
    assert dlm["tokens_per_s_memory_on"] > 0 and dlm["tokens_per_s_memory_off"] > 0
    # memory keys add attention work but no saved activations of their own beyond the attention scores
    assert dlm["saved_activation_bytes_per_segment_on"] >= dlm["saved_activation_bytes_per_segment_off"] > 0
    assert abs(nlu["plain_encoder_params"] - nlu["ernie3_nlu_path_params"]) < 0.2 * nlu["ernie3_nlu_path_params"]
    assert out["aa_ratio_memory_on_over_on"] > 0
