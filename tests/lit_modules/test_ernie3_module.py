"""ERNIE 3.0 pre-training and fine-tuning end to end: per-task logging, progressive learning (ramp and
resume), fine-tuning modes, generation from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train
from callbacks.progressive import ProgressiveLearning, ramp_value
from tests.helpers import find_metrics, read_metric

E3 = ["experiment=ernie3_tiny", "data.num_people=60", "data.tokenizer=byte", "data.seq_len=64", "data.dlm_segments=2",
      "data.batch_size=4", "data.val_batches_per_task=1", "~callbacks.rich_progress_bar", "~callbacks.model_summary",
      "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "extras.print_config=false",
      "logger=csv", "test=false"]
PROG = ["+callbacks/progressive=default", "callbacks.progressive.steps=6", "callbacks.progressive.seq_len=[16,64]",
        "callbacks.progressive.batch_size=[2,4]"]


def test_pretraining_logs_every_task_and_memory_on_off(make_cfg, tmp_path):
    cfg = make_cfg(E3 + ["trainer.max_steps=12", "trainer.val_check_interval=12", "trainer.limit_val_batches=10"], tiny=False)
    metrics, objects = train.run(cfg)
    csv = find_metrics(tmp_path / "run")
    trained = {t for t in ("kmlm", "dlm", "reorder", "distance", "uktp") if read_metric(csv, f"train/loss_{t}")}
    assert trained == {"kmlm", "dlm", "reorder", "distance", "uktp"}
    for t in trained:
        assert read_metric(csv, f"val/loss_{t}") and read_metric(csv, f"val/acc_{t}")
    assert read_metric(csv, "val/dlm_seg1") and read_metric(csv, "val/dlm_nomem_seg1")
    assert read_metric(csv, "val/dlm_seg0") == read_metric(csv, "val/dlm_nomem_seg0")  # no memory yet


def test_progressive_ramp_at_chosen_steps():
    cb = ProgressiveLearning(steps=10, seq_len=[16, 96], batch_size=[4, 16], lr_scale=[0.1, 1.0], dropout=[0.0, 0.1])
    assert cb.values_at(0) == {"seq_len": 16, "batch_size": 4, "lr_scale": pytest.approx(0.1), "dropout": 0.0}
    mid = cb.values_at(5, world_size=2)
    assert mid["seq_len"] == 56 and mid["batch_size"] == 10 and mid["lr_scale"] == pytest.approx(0.55)
    assert cb.values_at(10) == cb.values_at(1000) == {"seq_len": 96, "batch_size": 16, "lr_scale": 1.0,
                                                     "dropout": pytest.approx(0.1)}
    assert ramp_value(5, 10, 0, 1, "cosine") == pytest.approx(0.5) and ramp_value(2, 10, 0, 1, "cosine") < 0.2
    with pytest.raises(ValueError, match="callbacks.progressive.shape"):
        ProgressiveLearning(shape="step")


def test_progressive_learning_shapes_batches_sets_knobs_and_resumes_exactly(make_cfg, tmp_path):
    common = E3 + PROG + ["model.net.dropout=0.1", "model.optim.total_steps=8", "trainer.limit_val_batches=0",
                          "callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.every_n_train_steps=1"]
    _, objects = train.run(make_cfg(common + ["trainer.max_steps=8"], subdir="full", tiny=False))
    csv = find_metrics(tmp_path / "full")
    seq = read_metric(csv, "progressive/seq_len")
    assert seq == {0: 16, 1: 24, 2: 32, 3: 40, 4: 48, 5: 56, 6: 64, 7: 64}
    dm = objects["datamodule"]
    assert dm.progressive(3) == {"seq_len": 40, "batch_size": 3}
    b = dm.make_batch("kmlm", 3)
    assert b.tokens.shape[0] == 3 and b.tokens.shape[1] <= 40
    assert read_metric(csv, "progressive/batch_size")[0] == 2 and read_metric(csv, "progressive/batch_size")[7] == 4
    lr = read_metric(csv, "train/lr")
    assert lr[7] > lr[0] * 5  # warm-up times the lr ramp
    module = objects["model"]
    assert module.dropout_now == pytest.approx(0.1) and module.lr_scale == 1.0
    assert all(m.p == pytest.approx(0.1) for m in module.model.modules() if isinstance(m, torch.nn.Dropout))
    train.run(make_cfg(common + ["trainer.max_steps=4"], subdir="a", tiny=False))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    train.run(make_cfg(common + ["trainer.max_steps=8", f"ckpt_path={last}"], subdir="b", tiny=False))
    for name in ("train/loss", "progressive/seq_len", "train/lr"):
        full = read_metric(find_metrics(tmp_path / "full"), name)
        resumed = {**read_metric(find_metrics(tmp_path / "a"), name), **read_metric(find_metrics(tmp_path / "b"), name)}
        assert sorted(full) == list(range(8)) and full == pytest.approx(resumed), name


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_cache) -> Path:
    from tests.conftest import compose_train_cfg

    out = tmp_path_factory.mktemp("e3")
    train.run(compose_train_cfg(E3 + ["trainer.max_steps=4", "trainer.limit_val_batches=0"], out / "run", data_cache))
    return out / "run" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("mode", ["full", "task_module"])
def test_finetune_modes_freeze_what_they_say(pretrained, make_cfg, mode):
    before = torch.load(pretrained, weights_only=False)["state_dict"]
    cfg = make_cfg(["experiment=ernie3_finetune", f"model.init_ckpt={pretrained}", f"model.mode={mode}",
                    "data.num_people=60", "data.tokenizer=byte", "data.seq_len=64", "data.batch_size=4",
                    "data.max_eval=8", "data.k_shot=2", "trainer.max_steps=3", "trainer.limit_val_batches=1",
                    "~callbacks.rich_progress_bar", "logger=csv", "test=true"], tiny=False)
    metrics, objects = train.run(cfg)
    after = objects["model"].model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k.removeprefix("model.")])}
    universal = {k for k in before if ".universal." in k or "tok_emb" in k or ".proj." in k}
    nlu = {k for k in before if ".nlu." in k and "norm" not in k}
    assert nlu <= changed  # the NLU module trains in both modes
    if mode == "task_module":
        assert not (changed & universal)
    else:
        assert universal & changed
    assert "test/acc" in metrics and objects["model"].model.cls_head.out_features == objects["model"].num_classes


def test_generate_py_accepts_an_ernie3_checkpoint(pretrained):
    from generate import main as generate_main

    out = generate_main([str(pretrained), "--prompt", "Born in", "--max-new-tokens", "5", "--temperature", "0"])
    assert len(out) == 1 and out[0].startswith("Born in")


def test_cloze_probe_scores_every_candidate_of_held_out_wording(pretrained, capsys):
    from tools.ernie3_probe import main as probe_main

    out = probe_main([str(pretrained), "--max-probes", "12"])
    assert out["probes"] == 12 and out["templates"] == [3]
    assert 0 <= out["cloze_accuracy"] <= 1 and 0 < out["chance"] < 0.5
    assert set(out["per_relation"]) <= {"birth_city", "university", "field", "employer", "job_title", "hobby",
                                        "parent", "sibling", "mentor"}
    assert capsys.readouterr().out.strip().startswith("{")
