"""Expert parallelism on two CPU processes (gloo): the MoE layer against the single-process layer
(tests/ep_layer_worker.py), and trainer=fsdp_ep training, resuming and matching plain FSDP2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY
from tests.helpers import ROOT, find_metrics, read_metric, run_train_cli

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_ep_layer_matches_single_process_layer(impl):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ep_layer_worker.py"), impl], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert f"EP layer OK impl={impl}" in proc.stdout


MOE = ["model.net.ffn=moe", "model.net.moe.num_experts=4", "model.net.moe.expert_hidden=32", "model.net.n_layers=2",
       "model.net.moe.bias_balancing=true", "model.net.moe.bias_update_rate=0.01", "model.optim.total_steps=4"]


def ep_args(tmp_path: Path, ep: int, name: str) -> list[str]:
    return TINY + MOE + [
        "logger=csv", "data.num_people=20", "test=false", f"data.cache_dir={tmp_path / 'cache'}",
        "trainer.limit_val_batches=1", "trainer.val_check_interval=100",
        "trainer=fsdp_ep", "trainer.accelerator=cpu", "trainer.devices=2", f"trainer.strategy.expert_parallel_size={ep}",
        "callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.model_checkpoint.save_top_k=-1",
        "+callbacks.ep_recorder._target_=tests.ep_recorder.EPRecorder", f"+callbacks.ep_recorder.out_dir={tmp_path / name / 'rec'}",
        f"hydra.run.dir={tmp_path / name}",
    ]


def records(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / "rec" / f"ep_rank{r}.json").read_text()) for r in (0, 1)]


def test_fsdp_ep_trains_resumes_and_matches_fsdp(tmp_path):
    # ep=2 x dp_mod_ep=1: each rank holds 2 of the 4 experts per layer
    run_train_cli(ep_args(tmp_path, 2, "ep") + ["trainer.max_steps=4"])
    ep = records(tmp_path / "ep")
    assert ep[0]["w13_local"] == [[2, 64, 64]] * 2 and ep[0]["w13_global"] == [[4, 64, 64]] * 2
    # the aux-loss-free bias agrees on both ranks (counts all-reduced) and actually moved
    assert ep[0]["bias"] == ep[1]["bias"] and any(any(b) for b in ep[0]["bias"])

    # resume from the step-2 checkpoint: the same losses, gradient norms and final bias
    ckpt = tmp_path / "ep" / "checkpoints" / "step000002.ckpt"
    assert ckpt.is_symlink() and (ckpt.resolve() / "meta.pt").is_file()
    run_train_cli(ep_args(tmp_path, 2, "resumed") + ["trainer.max_steps=4", f"ckpt_path={ckpt}"])
    csv_ep, csv_res = find_metrics(tmp_path / "ep"), find_metrics(tmp_path / "resumed")
    loss, resumed = read_metric(csv_ep), read_metric(csv_res)
    assert sorted(loss) == [0, 1, 2, 3] and sorted(resumed) == [2, 3]
    assert {s: loss[s] for s in (2, 3)} == resumed
    assert {s: v for s, v in read_metric(csv_ep, "train/grad_norm").items() if s >= 2} == read_metric(csv_res, "train/grad_norm")
    assert records(tmp_path / "resumed")[0]["bias"] == ep[0]["bias"]

    # dp=2 x ep=1 (plain FSDP2 through the same config): the same training to float tolerance. The
    # gradient norm also checks the experts' gradient scale (AdamW alone would hide a factor).
    run_train_cli(ep_args(tmp_path, 1, "dp") + ["trainer.max_steps=4"])
    dp = records(tmp_path / "dp")
    assert dp[0]["w13_local"] == [[2, 64, 64]] * 2  # FSDP2 shards of all 4 experts, not expert slices
    csv_dp = find_metrics(tmp_path / "dp")
    for name in ("train/loss", "train/grad_norm", "train/balance_loss"):
        a, b = read_metric(csv_ep, name), read_metric(csv_dp, name)
        assert sorted(a) == sorted(b) == [0, 1, 2, 3], name
        for s in a:
            assert a[s] == pytest.approx(b[s], rel=1e-4, abs=1e-6), (name, s, a, b)
    assert torch.allclose(torch.tensor(ep[0]["bias"]), torch.tensor(dp[0]["bias"]))
    # the first step's gradient of every parameter (whole tensors): experts included, same scale
    g_ep, g_dp = ep[0]["grad_norms"], dp[0]["grad_norms"]
    assert set(g_ep) == set(g_dp) and any("experts.w13" in k for k in g_ep)
    for k in g_ep:
        assert g_ep[k] == pytest.approx(g_dp[k], rel=1e-4, abs=1e-7), (k, g_ep[k], g_dp[k])

    # the distributed checkpoint holds each layer's experts once, whole (4 experts), and loads on one process
    from lit_modules.lm import LanguageModelModule
    from tools.consolidate_checkpoint import consolidate

    out = tmp_path / "consolidated.ckpt"
    state = consolidate(tmp_path / "ep" / "checkpoints" / "last.ckpt", out)["state_dict"]
    assert state["model.trunk.layers.0.ffn.experts.w13"].shape == (4, 64, 64)
    module = LanguageModelModule.load_from_checkpoint(out, map_location="cpu", weights_only=False)
    for name, value in module.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert module.generate_text(["Born in"], max_new_tokens=4)[0].startswith("Born in")
