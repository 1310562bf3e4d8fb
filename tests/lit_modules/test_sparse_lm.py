"""Sparse LMs end to end: MoE/MoUE training, routing monitor, window schedule, bias balancing,
MoE -> MoUE conversion and continued training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train
from callbacks.moe_monitor import MoEMonitor
from tests.helpers import find_metrics, read_metric, run_train_cli
from tests.conftest import TINY

MOE = ["model.net.ffn=moe", "model.net.moe.num_experts=4", "model.net.moe.expert_hidden=32", "model.net.n_layers=2"]
MOUE = ["model.net.ffn=moue", "model.net.moe.num_experts=4", "model.net.moe.expert_hidden=32", "model.net.n_layers=2",
        "model.net.moue.window=2", "model.net.moue.state_dim=8"]
MONITOR = ["+callbacks/moe_monitor=default", "callbacks.moe_monitor.every_n_steps=1"]


def test_heatmap_image():
    images = MoEMonitor._images(torch.tensor([[0.0, 4.0], [2.0, 1.0]]), [0, 1], pool=True, step=3)
    assert set(images) == {"moe/load_heatmap", "moue/pool_load"}
    for img in images.values():
        assert img.dtype.name == "uint8" and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) > 200


@pytest.mark.parametrize("sparse", [MOE, MOUE], ids=["moe", "moue"])
def test_sparse_training_logs_routing(sparse, make_cfg, tmp_path):
    cfg = make_cfg(sparse + MONITOR + ["logger=many", "trainer.max_steps=3", "test=false", "trainer.limit_val_batches=0"])
    metrics, objects = train.run(cfg)
    csv = find_metrics(tmp_path / "run")
    for name in ("train/ce", "train/balance_loss", "moe/max_violation/layer_0", "moe/entropy/layer_1", "moe/dead_frac/mean"):
        assert len(read_metric(csv, name)) == 3, name
    total = read_metric(csv, "params/total")
    activated = read_metric(csv, "params/activated")
    assert list(activated.values())[0] < list(total.values())[0]
    if "model.net.ffn=moue" in sparse:
        assert read_metric(csv, "moue/pool_max_violation")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert "moe/load_heatmap" in acc.Tags()["images"]


def test_bias_balancing_updates_once_per_optimizer_step(make_cfg):
    cfg = make_cfg(MOE + ["model.net.moe.bias_balancing=true", "model.net.moe.aux_loss_coef=0", "model.net.moe.bias_update_rate=0.01",
                          "trainer.max_steps=3", "trainer.accumulate_grad_batches=2", "test=false", "trainer.limit_val_batches=0"])
    _, objects = train.run(cfg)
    bias = objects["model"].model.trunk.layers[0].ffn.router.expert_bias
    # each update moves every entry by exactly +-rate (or 0): after 3 optimiser steps |b| <= 3 * rate,
    # and in multiples of the rate, not 6 (one per micro-batch)
    steps = (bias / 0.01).round()
    torch.testing.assert_close(bias, steps * 0.01)
    assert steps.abs().max() <= 3 and steps.abs().sum() > 0


@pytest.mark.slow
def test_window_schedule_opens_as_configured_and_resumes_exactly(make_cfg, tmp_path):
    common = MOUE + ["+callbacks/moue_window=default", "callbacks.moue_window.milestones=[[0,1],[0.5,2]]", "logger=csv", "test=false",
                     "model.net.dropout=0.1", "model.optim.total_steps=8", "trainer.limit_val_batches=2", "trainer.val_check_interval=3",
                     "callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.every_n_train_steps=1"]
    train.run(make_cfg(common + ["trainer.max_steps=8"], subdir="full"))
    windows = read_metric(find_metrics(tmp_path / "full"), "moue/window")
    assert windows == {s: (1.0 if s < 4 else 2.0) for s in range(8)}
    train.run(make_cfg(common + ["trainer.max_steps=5"], subdir="a"))
    train.run(make_cfg(common + ["trainer.max_steps=8", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"], subdir="b"))
    full = read_metric(find_metrics(tmp_path / "full"))
    resumed = {**read_metric(find_metrics(tmp_path / "a")), **read_metric(find_metrics(tmp_path / "b"))}
    assert full == resumed
    assert read_metric(find_metrics(tmp_path / "b"), "moue/window") == {s: (1.0 if s < 4 else 2.0) for s in range(5, 8)}


@pytest.mark.slow
def test_moe_to_moue_conversion_run(tmp_path):
    cache = tmp_path / "cache"
    base = TINY + [f"data.cache_dir={cache}", "logger=csv", "test=false", "trainer.limit_val_batches=2",
                   "trainer.val_check_interval=4"]
    run_train_cli(base + MOE + ["trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'moe'}"])
    from tools.convert_moe_to_moue import main as convert_main

    convert_main([str(tmp_path / "moe" / "checkpoints" / "last.ckpt"), str(tmp_path / "conv"), "--window", "2", "--state-dim", "8"])
    assert (tmp_path / "conv" / "experiment" / "moue_converted.yaml").is_file()
    # the generated experiment replaces lm_tiny and carries the source run's data settings
    cont = [a for a in base if not a.startswith("experiment=")]
    run_train_cli(["--config-dir", str(tmp_path / "conv")] + cont + ["experiment=moue_converted", "trainer.max_steps=4",
                   f"hydra.run.dir={tmp_path / 'moue'}"])
    windows = read_metric(find_metrics(tmp_path / "moue"), "moue/window")
    assert windows == {0: 1.0, 1: 2.0, 2: 2.0, 3: 2.0}
