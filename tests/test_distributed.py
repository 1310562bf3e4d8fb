"""DDP and FSDP2 on two CPU processes (gloo), launched as `python train.py` subprocesses: Lightning
re-runs the command line for the second rank, which must not be pytest's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_modules.lm import LanguageModelModule
from tests.conftest import TINY
from tests.helpers import find_metrics, read_metric, run_train_cli

pytestmark = pytest.mark.slow

TWO_CPU = ["trainer.accelerator=cpu", "trainer.devices=2"]


def common(tmp_path: Path) -> list[str]:
    return TINY + ["logger=csv", "data.num_people=20", "test=false", f"data.cache_dir={tmp_path / 'cache'}",
                   "trainer.limit_val_batches=2", "trainer.val_check_interval=3"]


def test_ddp_two_cpu_processes(tmp_path):
    run_train_cli(common(tmp_path) + ["trainer=ddp", *TWO_CPU, "trainer.max_steps=5", f"hydra.run.dir={tmp_path / 'ddp'}"])
    losses = read_metric(find_metrics(tmp_path / "ddp"))
    assert sorted(losses) == list(range(5))
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 5


def test_fsdp2_two_cpu_processes_save_resume_consolidate(tmp_path):
    args = common(tmp_path) + ["trainer=fsdp", *TWO_CPU, "model.net.dropout=0.1", "model.optim.total_steps=6",
                               "callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.every_n_train_steps=1"]
    run_train_cli(args + ["trainer.max_steps=6", f"hydra.run.dir={tmp_path / 'full'}"])
    run_train_cli(args + ["trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'a'}"])
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    # a distributed checkpoint: a link to a complete shard directory, swapped in atomically
    assert last.is_symlink() and last.resolve().is_dir() and (last.resolve() / "meta.pt").is_file()
    stale = [p for p in last.parent.iterdir() if p.name.startswith(".") and p.resolve() not in
             {q.resolve() for q in last.parent.iterdir() if not q.name.startswith(".")}]
    assert not stale, f"orphaned checkpoint directories: {stale}"
    run_train_cli(args + ["trainer.max_steps=6", f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'b'}"])

    full = read_metric(find_metrics(tmp_path / "full"))
    resumed = {**read_metric(find_metrics(tmp_path / "a")), **read_metric(find_metrics(tmp_path / "b"))}
    assert sorted(full) == sorted(resumed) == list(range(6))
    assert full == resumed

    from tools.consolidate_checkpoint import consolidate

    out = tmp_path / "consolidated.ckpt"
    consolidate(tmp_path / "b" / "checkpoints" / "last.ckpt", out)
    module = LanguageModelModule.load_from_checkpoint(out, map_location="cpu", weights_only=False)
    state = torch.load(out, weights_only=False)["state_dict"]
    assert set(state) == set(module.state_dict())
    for name, value in module.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert module.generate_text(["Born in"], max_new_tokens=4)[0].startswith("Born in")


def test_fsdp2_moue_pool_sharded_once_trains_and_resumes(tmp_path):
    moue = ["model.net.ffn=moue", "model.net.moe.num_experts=4", "model.net.moe.expert_hidden=32", "model.net.n_layers=2",
            "model.net.moue.window=2", "model.net.moue.state_dim=8", "model.optim.total_steps=4",
            "callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.every_n_train_steps=1"]
    args = common(tmp_path) + ["trainer=fsdp", *TWO_CPU] + moue
    run_train_cli(args + ["trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'full'}"])
    run_train_cli(args + ["trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'a'}"])
    run_train_cli(args + ["trainer.max_steps=4", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}",
                          f"hydra.run.dir={tmp_path / 'b'}"])
    full = read_metric(find_metrics(tmp_path / "full"))
    resumed = {**read_metric(find_metrics(tmp_path / "a")), **read_metric(find_metrics(tmp_path / "b"))}
    assert sorted(full) == [0, 1, 2, 3] and full == resumed

    from tools.consolidate_checkpoint import consolidate

    ckpt = consolidate(tmp_path / "b" / "checkpoints" / "last.ckpt", tmp_path / "c.ckpt")
    # one pool tensor for the whole model, full-sized after consolidation, none inside the blocks
    pool_keys = [k for k in ckpt["state_dict"] if "w13" in k]
    assert pool_keys == ["model.trunk.pool.experts.w13"]
    assert ckpt["state_dict"]["model.trunk.pool.experts.w13"].shape[0] == 2 * 4


ELASTIC_MOE = ["model.net.ffn=moe", "model.net.moe.num_experts=4", "model.net.moe.expert_hidden=32", "model.net.n_layers=3",
               "+callbacks/elastic=default", "callbacks.elastic.depth_full_prob=0.3", "callbacks.elastic.width_full_prob=0.3",
               "callbacks.elastic.sparsity_full_prob=0.3", "callbacks.elastic.record=true"]


@pytest.mark.parametrize("strategy", [["trainer=ddp", "trainer.strategy.find_unused_parameters=true"], ["trainer=fsdp"]],
                         ids=["ddp", "fsdp2"])
def test_elastic_choices_agree_on_both_ranks(tmp_path, strategy):
    import json

    run_dir = tmp_path / "run"
    run_train_cli(common(tmp_path) + strategy + TWO_CPU + ELASTIC_MOE + ["trainer.max_steps=8", f"hydra.run.dir={run_dir}"],
                  timeout=300)
    ranks = [json.loads(next(run_dir.rglob(f"elastic_choices_rank{r}.json")).read_text()) for r in (0, 1)]
    assert [c["step"] for c in ranks[0]] == list(range(8))
    # the same layers, the same kept experts (the usage rule reads rank-summed statistics) and top-k
    assert ranks[0] == ranks[1]
    assert {len(c["layers"]) for c in ranks[0]} == {2, 3} and {c["top_k"] for c in ranks[0]} == {1, 2}
    assert any(c["kept"] is not None and len(c["kept"][0]) == 2 for c in ranks[0])
    losses = read_metric(find_metrics(run_dir))
    assert sorted(losses) == list(range(8))


def test_ernie3_fsdp2_two_cpu_processes_trains_every_task(tmp_path):
    e3 = ["experiment=ernie3_tiny", "data.num_people=60", "data.tokenizer=byte", "data.seq_len=64", "data.dlm_segments=2",
          "data.batch_size=4", "data.val_batches_per_task=1", "logger=csv", "test=false", "extras.print_config=false",
          "~callbacks.rich_progress_bar", "trainer.enable_progress_bar=false", f"data.cache_dir={tmp_path / 'cache'}",
          "trainer.limit_val_batches=5", "trainer.val_check_interval=10"]
    run_dir = tmp_path / "run"
    # a step skips the modules its task does not use (the NLG module on NLU tasks): every rank
    # draws the same task, so no rank waits on a collective the other never starts
    run_train_cli(e3 + ["trainer=fsdp", *TWO_CPU, "trainer.max_steps=10", f"hydra.run.dir={run_dir}"], timeout=300)
    csv = find_metrics(run_dir)
    assert sorted(read_metric(csv)) == list(range(10))
    assert sum(bool(read_metric(csv, f"train/loss_{t}")) for t in ("kmlm", "dlm", "reorder", "distance", "uktp")) >= 4
    assert read_metric(csv, "val/loss")


def test_rl_fsdp2_two_cpu_processes_trains_and_resumes(tmp_path):
    """RL under FSDP2: the rollout copy gathers the sharded policy on every rank (each rank samples its own
    prompts, decoding locally), the update runs sharded; a resumed run reproduces the losses, with each
    rank's U-RB queue and the AHRL pass rates restored."""
    args = ["experiment=rl_arith", "~requires", "model.init_ckpt=null", "+model.net.preset=tiny",
            "model.rl.group_size=4", "model.rl.max_new_tokens=4", "model.rl.routing_replay=R3",
            "+model.net.ffn=moe", "+model.net.moe={num_experts:4,top_k:2,expert_hidden:32}",
            "model.evaluate.max_new_tokens=4", "data.n_train=64", "data.n_eval=4", "data.prompts_per_step=4",
            "model.rl.urb_groups_ahead=1", "model.rl.hints=true",
            "model.optim.total_steps=4", "logger=csv", "test=false", "extras.print_config=false",
            "~callbacks.rich_progress_bar", "trainer.enable_progress_bar=false", "trainer.val_check_interval=2",
            "callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.every_n_train_steps=1",
            "trainer=fsdp", *TWO_CPU]
    run_train_cli(args + ["trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'full'}"], timeout=300)
    run_train_cli(args + ["trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'a'}"], timeout=300)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    run_train_cli(args + ["trainer.max_steps=4", f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'b'}"], timeout=300)
    full = read_metric(find_metrics(tmp_path / "full"))
    resumed = {**read_metric(find_metrics(tmp_path / "a")), **read_metric(find_metrics(tmp_path / "b"))}
    # U-RB lag 1: the first batch only fills the queue, so the 4 optimiser steps log at steps 1-4
    assert sorted(full) == sorted(resumed) == [1, 2, 3, 4]
    assert full == resumed
    assert read_metric(find_metrics(tmp_path / "full"), "val/acc")
    assert read_metric(find_metrics(tmp_path / "full"), "rl/router_disagreement/mean")


def test_train_destroys_the_process_group_before_exit(tmp_path):
    """train.py's main destroys the default group when a run ends: a gloo group left to interpreter
    shutdown can abort a rank that finished cleanly (SIGABRT, seen in CI on the FSDP2 test)."""
    import torch.distributed as dist

    from train import release_process_group

    release_process_group()  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        release_process_group()
        assert not dist.is_initialized()
        release_process_group()  # twice is harmless
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
