"""Benchmarks in quick mode: they run, print their JSON, and their equivalence claims hold
(timings are reported, never asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
