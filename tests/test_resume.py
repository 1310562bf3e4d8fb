"""Exact resume: stop at a step (mid-epoch or on an epoch boundary), resume, and the per-step
train/loss equals the uninterrupted run's, bit for bit, on CPU with dropout on."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

import train
from datamodules.text import TextDataModule
from lit_modules.checkpointing import atomic_torch_save
from tests.helpers import find_metrics, read_metric

RESUME = [
    "data.num_people=12",
    "model.net.dropout=0.1",
    "logger=csv",
    "test=false",
    "trainer.val_check_interval=7",
    "trainer.limit_val_batches=2",
    "callbacks.model_checkpoint.monitor=null",
    "callbacks.model_checkpoint.every_n_train_steps=1",
]


def batches_per_epoch(cache) -> int:
    dm = TextDataModule(source="bios", num_people=12, tokenizer="byte", seq_len=32, batch_size=8, cache_dir=str(cache))
    dm.prepare_data()
    dm.setup("fit")
    return len(dm.train_dataloader())


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_reproduces_uninterrupted_losses(num_workers, make_cfg, tmp_path, data_cache):
    per_epoch = batches_per_epoch(data_cache)
    total = per_epoch * 2 + 3
    # A stopped run keeps its configuration: the LR schedule's horizon is the planned run's length,
    # not the step at which it happens to stop.
    common = RESUME + [f"data.num_workers={num_workers}", f"model.optim.total_steps={total}"]

    metrics, _ = train.run(make_cfg(common + [f"trainer.max_steps={total}"], subdir="full"))
    full = read_metric(find_metrics(tmp_path / "full"))
    assert sorted(full) == list(range(total))

    for name, stop in [("mid", per_epoch // 2 + 1), ("boundary", per_epoch)]:
        train.run(make_cfg(common + [f"trainer.max_steps={stop}"], subdir=f"{name}_a"))
        ckpt = tmp_path / f"{name}_a" / "checkpoints" / "last.ckpt"
        first = read_metric(find_metrics(tmp_path / f"{name}_a"))
        train.run(make_cfg(common + [f"trainer.max_steps={total}", f"ckpt_path={ckpt}"], subdir=f"{name}_b"))
        second = read_metric(find_metrics(tmp_path / f"{name}_b"))
        assert sorted(first) == list(range(stop)) and sorted(second) == list(range(stop, total))
        resumed = {**first, **second}
        mismatched = {s: (full[s], resumed[s]) for s in full if full[s] != resumed[s]}
        assert not mismatched, f"{name}: losses differ at steps {mismatched}"


# No validation before the stop (none configured): the checkpoint callback's monitor (val/loss) is
# never logged, so Lightning's own step / validation saves never happen and `last.ckpt` is the one
# written for the final step. It must record the still-open epoch, not the epoch loop closed by
# max_steps (the resumed run would then start the next epoch's data).
NO_VALIDATION = [
    "data.num_people=12",
    "model.net.dropout=0.1",
    "logger=csv",
    "test=false",
    "trainer.val_check_interval=null",
    "trainer.limit_val_batches=0",
]


@pytest.mark.slow
def test_resume_is_exact_when_the_run_stops_before_any_validation(make_cfg, tmp_path, data_cache):
    per_epoch = batches_per_epoch(data_cache)
    total = per_epoch * 2 + 3
    common = NO_VALIDATION + [f"model.optim.total_steps={total}"]
    train.run(make_cfg(common + [f"trainer.max_steps={total}"], subdir="full"))
    full = read_metric(find_metrics(tmp_path / "full"))
    assert sorted(full) == list(range(total))
    for name, stop in [("mid", per_epoch // 2 + 1), ("boundary", per_epoch)]:
        train.run(make_cfg(common + [f"trainer.max_steps={stop}"], subdir=f"{name}_a"))
        ckpt = tmp_path / f"{name}_a" / "checkpoints" / "last.ckpt"
        state = torch.load(ckpt, weights_only=False)
        # the data position of the step it stopped at: stop batches into epoch 0 (a finished epoch is
        # stored as the start of the next one)
        expect = {"epoch": 0, "consumed": stop * 8} if stop < per_epoch else {"epoch": 1, "consumed": 0}
        assert state["TextDataModule"]["sampler"] == expect
        train.run(make_cfg(common + [f"trainer.max_steps={total}", f"ckpt_path={ckpt}"], subdir=f"{name}_b"))
        resumed = {**read_metric(find_metrics(tmp_path / f"{name}_a")), **read_metric(find_metrics(tmp_path / f"{name}_b"))}
        mismatched = {s: (full[s], resumed.get(s)) for s in full if full[s] != resumed.get(s)}
        assert not mismatched, f"{name}: losses differ at steps {mismatched}"


def test_step_seeding_makes_dropout_independent_of_prior_rng_use(make_cfg):
    from lit_modules.base import seed_step

    seed_step(0, 5, 0)
    a = torch.rand(4)
    torch.rand(100)  # something else consumed randomness
    seed_step(0, 5, 0)
    assert torch.equal(a, torch.rand(4))
    seed_step(0, 5, 1)
    assert not torch.equal(a, torch.rand(4))


def _save_forever(path: str, ready) -> None:
    i = 0
    while True:
        atomic_torch_save({"i": i, "payload": torch.full((4_000_000,), float(i))}, path)
        ready.set()
        i += 1


def test_checkpoint_write_killed_midway_leaves_previous_loadable(tmp_path):
    path = str(tmp_path / "last.ckpt")
    ctx = mp.get_context("spawn")
    for delay in (0.05, 0.2, 0.35):
        ready = ctx.Event()
        proc = ctx.Process(target=_save_forever, args=(path, ready))
        proc.start()
        assert ready.wait(60)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        ckpt = torch.load(path, weights_only=True)  # never a torn file
        assert ckpt["payload"].numel() == 4_000_000
        assert (ckpt["payload"] == float(ckpt["i"])).all()  # a complete, self-consistent write
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    # a killed writer may leave its temporary file, never a damaged target
    assert all(name.startswith(".last.ckpt.") and name.endswith(".tmp") for name in leftovers)
