"""benchmarks/mfu.py: the quick CPU mode runs the whole path (FSDP2 on a 1-device mesh, eager and
compiled, dense and MoE) with only torch importable, and the CUDA mode skips cleanly without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# What a bare GPU box may lack: the benchmark must not import any of these.
BLOCKED = ("av", "soundfile", "torchvision", "torchaudio", "moviepy", "lightning", "hydra", "omegaconf")


def run_mfu(*args: str) -> dict:
    code = (f"import runpy, sys\nfor m in {BLOCKED!r}:\n    sys.modules[m] = None  # import m -> ImportError\n"
            f"sys.argv = ['mfu.py', *{list(args)!r}]\nrunpy.run_path({str(ROOT / 'benchmarks' / 'mfu.py')!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout)  # exactly one JSON object on stdout


def test_mfu_pure_functions():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import importlib.util

    spec = importlib.util.spec_from_file_location("mfu", ROOT / "benchmarks" / "mfu.py")
    mfu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mfu)
    assert mfu.table_peak("NVIDIA H100 PCIe") == (756e12, "h100 pcie")
    assert mfu.table_peak("NVIDIA H100 80GB HBM3") == (989.4e12, "h100 80gb hbm3")
    assert mfu.table_peak("NVIDIA H200")[1] == "h200" and mfu.table_peak("NVIDIA GH200 480GB")[1] == "gh200"
    assert mfu.table_peak("NVIDIA L40S")[1] == "l40s" and mfu.table_peak("Mystery GPU") == (None, None)
    from models.transformer import TransformerConfig

    cfg = TransformerConfig(preset="tiny", vocab_size=100)
    f = mfu.flops_per_token(cfg, 1000, seq_len=32)
    assert f == {"params": 6000, "attention": 12 * 2 * 64 * 32, "total": 6000 + 12 * 2 * 64 * 32}


@pytest.mark.slow
def test_mfu_quick_cpu_runs_dense_and_moe_eager_and_compiled():
    out = run_mfu("--device", "cpu", "--quick", "--warmup", "1", "--steps", "1")
    assert out["benchmark"] == "mfu" and out["mixed_precision"] == "bf16" and "skipped" not in out
    assert out["peak_source"].startswith("measured") and out["peak_flops"] == pytest.approx(out["measured_matmul_flops"], rel=1e-6)
    rows = {(r["model"], r["compiled"]): r for r in out["results"]}
    assert sorted(rows) == [("dense", False), ("dense", True), ("moe", False), ("moe", True)]
    for (kind, compiled), r in rows.items():
        assert "skipped" not in r, r
        # MFU is a ratio of two timings (the step and the measured matmul peak): on a loaded CPU with one
        # step it can exceed 1, so only its definition is checked, never its size
        assert r["mfu"] > 0 and r["tokens_per_s"] > 0 and r["tokens_per_step"] == 2 * 32
        # the JSON keeps 4 significant digits of mfu (a relative error up to 5e-4)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"]["total"] / out["peak_flops"], rel=1e-3)
        assert r["flops_per_token"]["total"] == 6 * r["params_activated"] + 12 * 2 * 64 * 32
    assert rows["moe", False]["params_activated"] < rows["moe", False]["params_total"]  # top-2 of 4 experts
    assert rows["dense", False]["params_activated"] == rows["dense", False]["params_total"]
    # compiled and eager start from the same weights and tokens: the same first loss
    for kind in ("dense", "moe"):
        assert rows[kind, True]["loss_first"] == pytest.approx(rows[kind, False]["loss_first"], abs=0.05)
    assert set(out["compile_speedup"]) == {"dense", "moe"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_mfu_without_cuda_prints_a_skip_reason_and_exits_0():
    out = run_mfu()
    assert out["benchmark"] == "mfu" and "no CUDA" in out["skipped"] and "results" not in out
