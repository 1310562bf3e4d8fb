"""Elastic training: the module's knobs, the ElasticSampler's draws, logging, distillation, resume,
sub-model export and the evaluation grid."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

import train
from callbacks.elastic import ElasticSampler
from models.layers.elastic import RoutingLimit, keep_experts
from models.transformer import Transformer, TransformerConfig, lm_loss
from tests.helpers import find_metrics, read_metric

MOE = ["model.net.ffn=moe", "model.net.moe.num_experts=4", "model.net.moe.expert_hidden=32", "model.net.n_layers=3",
       "model.net.dropout=0.0"]
ELASTIC = ["+callbacks/elastic=default", "callbacks.elastic.depth_full_prob=0.3", "callbacks.elastic.width_full_prob=0.3",
           "callbacks.elastic.sparsity_full_prob=0.3"]
QUIET = ["logger=csv", "test=false", "trainer.limit_val_batches=2", "trainer.val_check_interval=4"]

SEEN: list = []


class HandKnobs(L.Callback):
    """Sets the elastic knobs by hand and checks, before backward, that the training loss is the
    sub-model's loss computed directly from the network."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.elastic_layers = [0, 2]
        pl_module.elastic_experts = 2
        pl_module.elastic_top_k = 1
        self.batch = batch

    def on_before_backward(self, trainer, pl_module, loss):
        kept = keep_experts(2, 4, 3, "usage", pl_module.expert_usage)
        with torch.no_grad():
            logits, balance, infos = pl_module.model(self.batch.tokens, return_routing=True, layers=[0, 2],
                                                     routing=RoutingLimit(kept, 1))
            expected = lm_loss(logits, self.batch.targets) + balance
        SEEN.append((float(loss.detach()), float(expected), [i.layer for i in infos], pl_module.last_elastic, kept))


class HalfWidth(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.elastic_experts = 2


def test_width_reduced_steps_feed_usage_but_not_the_bias_balance(make_cfg):
    bias = ["model.net.moe.bias_balancing=true", "model.net.moe.aux_loss_coef=0", "model.net.moe.bias_update_rate=0.01",
            "trainer.max_steps=3", "test=false", "trainer.limit_val_batches=0"]
    _, objects = train.run(make_cfg(MOE + bias + ["+callbacks.half._target_=tests.lit_modules.test_elastic_training.HalfWidth"]))
    module = objects["model"]
    assert all(layer.ffn.router.expert_bias.abs().sum() == 0 for layer in module.model.trunk.layers)
    assert module.expert_usage.sum() == 3 * 8 * 32 * 2 * 3  # steps x tokens x top-k x layers
    _, objects = train.run(make_cfg(MOE + bias, subdir="full"))  # full-width steps do update it
    assert any(layer.ffn.router.expert_bias.abs().sum() > 0 for layer in objects["model"].model.trunk.layers)


def fake_module(n_layers=4, E=8, k=2, ffn="moe"):
    cfg = TransformerConfig(preset="tiny", vocab_size=32, n_layers=n_layers, ffn=ffn,
                            moe=dict(num_experts=E, top_k=k, expert_hidden=8))
    return SimpleNamespace(trunk=Transformer(cfg).trunk, supports_elastic=True, seed=0)


def test_knobs_set_by_hand_run_that_sub_model_in_the_training_step(make_cfg):
    import importlib

    # Hydra imports the callback by its dotted path, which may be another module object than pytest's
    SEEN = importlib.import_module("tests.lit_modules.test_elastic_training").SEEN
    SEEN.clear()
    cfg = make_cfg(MOE + ["+callbacks.hand._target_=tests.lit_modules.test_elastic_training.HandKnobs",
                          "trainer.max_steps=3", "test=false", "trainer.limit_val_batches=0"])
    train.run(cfg)
    assert len(SEEN) == 3
    for loss, expected, layers, applied, kept in SEEN:
        assert loss == pytest.approx(expected, abs=1e-6)
        assert layers == [0, 2] and applied == {"layers": [0, 2], "kept": kept, "top_k": 1}
    # the usage rule reads the statistics accumulated so far: step 0 has none (the prefix)
    assert SEEN[0][4] == [[0, 1]] * 3


def test_sampler_draws_depend_only_on_seed_step_and_micro_batch_and_follow_the_probabilities():
    module = fake_module()
    cb = ElasticSampler(seed=3)
    draws = [cb.choice_at(module, step, 0) for step in range(3000)]
    again = ElasticSampler(seed=3)
    assert [again.choice_at(module, s, 0) for s in (17, 5, 2999)] == [draws[17], draws[5], draws[2999]]
    assert draws[7] != cb.choice_at(module, 7, 1) or draws[8] != cb.choice_at(module, 8, 1)
    assert ElasticSampler(seed=4).choice_at(module, 0, 0) is not None
    n = len(draws)
    full_depth = sum(d["layers"] is None for d in draws) / n
    full_width = sum(d["experts"] is None for d in draws) / n
    full_k = sum(d["top_k"] is None for d in draws) / n
    # depth: P(full draw) = 0.75, plus reduced draws of depth L... none: L-1 is the max (default [2, 3])
    assert full_depth == pytest.approx(0.75, abs=0.03)
    assert full_width == pytest.approx(0.8, abs=0.03)
    assert full_k == pytest.approx(0.8, abs=0.03)
    depths = Counter(len(d["layers"]) for d in draws if d["layers"] is not None)
    assert set(depths) == {2, 3}
    for d in draws:
        if d["layers"] is not None:
            assert d["layers"][0] == 0 and d["layers"][-1] == 3
        assert d["experts"] in (None, 4) and d["top_k"] in (None, 1)
    # independence: the width draw does not depend on the depth outcome
    both = sum(d["layers"] is not None and d["experts"] is not None for d in draws) / n
    assert both == pytest.approx(0.25 * 0.2, abs=0.015)


def test_sampler_random_rule_and_config_errors():
    module = fake_module()
    cb = ElasticSampler(width_full_prob=0.0, width_rule="random", experts=[3], seed=0)
    choice = cb.choice_at(module, 0, 0)
    assert len(choice["experts"]) == 4 and all(len(ids) == 3 for ids in choice["experts"])
    with pytest.raises(ValueError, match="callbacks.elastic.depth_full_prob"):
        ElasticSampler(depth_full_prob=1.5)
    with pytest.raises(ValueError, match="callbacks.elastic.width_rule"):
        ElasticSampler(width_rule="best")
    with pytest.raises(ValueError, match=r"callbacks.elastic.experts must be in \[1, 8\]"):
        ElasticSampler(experts=9).choice_at(module, 0, 0)
    with pytest.raises(ValueError, match="top_k_range must stay <= model.net.moe.top_k=2"):
        ElasticSampler(top_k_range=[1, 3]).choice_at(module, 0, 0)
    with pytest.raises(ValueError, match="min_depth / max_depth"):
        ElasticSampler(min_depth=5).choice_at(module, 0, 0)
    dense = fake_module(ffn="dense")
    assert ElasticSampler(depth_full_prob=0.0, seed=0).choice_at(dense, 0, 0)["experts"] is None


def test_elastic_run_logs_choices_records_them_and_distils(make_cfg, tmp_path):
    cfg = make_cfg(MOE + ELASTIC + QUIET + ["trainer.max_steps=8", "callbacks.elastic.record=true",
                                            "callbacks.elastic.distill_weight=0.5"])
    train.run(cfg)
    csv = find_metrics(tmp_path / "run")
    depth, experts, top_k = (read_metric(csv, f"elastic/{k}") for k in ("depth", "experts", "top_k"))
    assert sorted(depth) == sorted(experts) == sorted(top_k) == list(range(8))
    assert set(depth.values()) == {2.0, 3.0} and set(experts.values()) == {2.0, 4.0} and set(top_k.values()) == {1.0, 2.0}
    records = json.loads(next((tmp_path / "run").rglob("elastic_choices_rank0.json")).read_text())
    assert [r["step"] for r in records] == list(range(8))
    assert [len(r["layers"]) for r in records] == [depth[s] for s in range(8)]
    reduced = [s for s in range(8) if depth[s] < 3 or experts[s] < 4 or top_k[s] < 2]
    distill = read_metric(csv, "train/distill")
    assert reduced and sorted(distill) == list(range(8))
    assert [s for s in range(8) if distill[s] > 0] == reduced  # 0 on full steps: no teacher pass
    assert read_metric(csv, "elastic/kept_usage_share")


@pytest.mark.parametrize("net", [
    ["model.net.ffn=dense", "model.net.n_layers=3"],
    ["model.net.ffn=moue", "model.net.moe.num_experts=4", "model.net.moe.expert_hidden=32", "model.net.n_layers=3",
     "model.net.moue.window=2", "model.net.moue.state_dim=8"],
], ids=["dense", "moue"])
def test_elastic_runs_on_dense_and_moue_trunks(make_cfg, tmp_path, net):
    cfg = make_cfg(net + ELASTIC + QUIET + ["trainer.max_steps=6", "callbacks.elastic.record=true"])
    train.run(cfg)
    records = json.loads(next((tmp_path / "run").rglob("elastic_choices_rank0.json")).read_text())
    assert {len(r["layers"]) for r in records} == {2, 3}
    if "model.net.ffn=dense" in net:
        assert all(r["kept"] is None for r in records)
    else:  # MoUE: 4 of each layer's 8-expert window (2 blocks of 4), inside that window
        reduced = [r["kept"] for r in records if r["kept"] is not None]
        assert reduced and all(len(ids) == 4 for kept in reduced for ids in kept)


def test_resumed_elastic_run_draws_the_same_sequence_and_losses(make_cfg, tmp_path):
    common = MOE + ELASTIC + QUIET + ["model.net.dropout=0.1", "model.optim.total_steps=8",
                                      "callbacks.model_checkpoint.monitor=null",
                                      "callbacks.model_checkpoint.every_n_train_steps=1"]
    train.run(make_cfg(common + ["trainer.max_steps=8"], subdir="full"))
    train.run(make_cfg(common + ["trainer.max_steps=5"], subdir="a"))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["expert_usage"].shape == (3, 4) and ckpt["expert_usage"].sum() > 0
    train.run(make_cfg(common + ["trainer.max_steps=8", f"ckpt_path={last}"], subdir="b"))
    for name in ("train/loss", "elastic/depth", "elastic/experts", "elastic/top_k"):
        full = read_metric(find_metrics(tmp_path / "full"), name)
        resumed = {**read_metric(find_metrics(tmp_path / "a"), name), **read_metric(find_metrics(tmp_path / "b"), name)}
        assert sorted(full) == list(range(8)) and full == resumed, name


def test_ddp_without_unused_parameters_is_refused_with_the_key_named(make_cfg):
    from lightning.pytorch.strategies import DDPStrategy

    cb = ElasticSampler()
    trainer = SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=False))
    with pytest.raises(ValueError, match="trainer.strategy.find_unused_parameters=true"):
        cb.setup(trainer, fake_module(), "fit")


# ------------------------------------------------------------------------------ export and grid


@pytest.fixture(scope="module")
def elastic_ckpt(tmp_path_factory, data_cache) -> Path:
    from tests.conftest import compose_train_cfg, TINY

    out = tmp_path_factory.mktemp("elastic_parent")
    cfg = compose_train_cfg(list(TINY) + MOE + ELASTIC + QUIET + ["trainer.max_steps=6"], out / "run", data_cache)
    train.run(cfg)
    return out / "run" / "checkpoints" / "last.ckpt"


def test_exported_sub_model_equals_the_parent_under_that_choice(elastic_ckpt, tmp_path, capsys):
    from generate import load_module
    from tools.export_submodel import main as export_main

    res = export_main([str(elastic_ckpt), str(tmp_path / "sub.ckpt"), "--depth", "2", "--experts", "2", "--top-k", "1"])
    printed = capsys.readouterr().out
    parent = load_module(elastic_ckpt)
    sub = load_module(tmp_path / "sub.ckpt")  # generate.py's loader: standalone, no parent needed
    usage = parent.expert_usage
    assert usage is not None and usage.sum() > 0
    kept = keep_experts(2, 4, 3, "usage", usage)
    assert res["layers"] == [0, 2] and res["kept"] == kept
    x = torch.randint(0, parent.net_cfg.vocab_size, (2, 16))
    with torch.no_grad():
        want = parent.model(x, layers=[0, 2], routing=RoutingLimit(kept, 1))
        got = sub.model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    n = sum(p.numel() for p in sub.model.parameters())
    assert f"total {n:,}" in printed
    assert n == parent.model.num_params([0, 2], RoutingLimit(kept, 1))["total"]
    assert sub.model.cfg.n_layers == 2 and sub.model.cfg.moe.num_experts == 2 and sub.model.cfg.moe.top_k == 1
    assert sub.generate_text(["Born in"], max_new_tokens=4)[0].startswith("Born in")
    # the prefix rule keeps the lowest ids
    res = export_main([str(elastic_ckpt), str(tmp_path / "p.ckpt"), "--experts", "2", "--top-k", "2", "--rule", "prefix"])
    assert res["kept"] == [[0, 1]] * 3 and res["layers"] == [0, 1, 2]


def test_exported_sub_model_initialises_a_training_run(elastic_ckpt, tmp_path, make_cfg):
    from tools.export_submodel import export_submodel

    res = export_submodel(elastic_ckpt, tmp_path / "sub.ckpt", depth=2, experts=2, top_k=1)
    overrides = [f"model.init_ckpt={res['path']}", "model.net.n_layers=2", "model.net.moe.num_experts=2",
                 "model.net.moe.top_k=1"]
    metrics, objects = train.run(make_cfg(MOE + overrides + ["trainer.max_steps=1", "test=false",
                                                            "trainer.limit_val_batches=0"], subdir="cont"))
    assert objects["model"].model.cfg.n_layers == 2


@pytest.mark.parametrize("args, message", [
    (["--depth", "4"], r"--depth must be in \[1, 3\]"),
    (["--experts", "5"], r"--experts must be in \[1, 4\]"),
    (["--experts", "2", "--top-k", "3"], r"--top-k must be in \[1, 2\]"),
    (["--experts", "1"], r"--experts 1 is below the checkpoint's top_k=2"),
    (["--layers", "0", "3"], r"--layers must be distinct layer ids in \[0, 2\]"),
])
def test_export_errors_name_the_argument_and_write_nothing(elastic_ckpt, tmp_path, args, message):
    from tools.export_submodel import export_submodel, main as export_main

    out = tmp_path / "x" / "sub.ckpt"
    with pytest.raises(SystemExit) as e:
        export_main([str(elastic_ckpt), str(out)] + args)
    assert e.value.code == 2
    assert not (tmp_path / "x").exists()
    kw = {"--depth": "depth", "--experts": "experts", "--top-k": "top_k"}
    if args[0] != "--layers":
        pairs = dict(zip(args[::2], args[1::2]))
        with pytest.raises(ValueError, match=message):
            export_submodel(elastic_ckpt, out, **{kw[k]: int(v) for k, v in pairs.items()})


def test_moue_export_keeps_window_preserving_layers_only(tmp_path):
    from tools.export_submodel import plan_submodel

    cfg = TransformerConfig(preset="tiny", vocab_size=32, n_layers=4, ffn="moue",
                            moe=dict(num_experts=2, top_k=2, expert_hidden=8), moue=dict(window=2, state_dim=4))
    assert plan_submodel(cfg, layers=[0, 1, 2])[0] == [0, 1, 2]
    with pytest.raises(ValueError, match="break the MoUE window"):
        plan_submodel(cfg, depth=3)
    with pytest.raises(ValueError, match="width export is implemented for ffn=moe only"):
        plan_submodel(cfg, experts=4)
    full = TransformerConfig(preset="tiny", vocab_size=32, n_layers=4, ffn="moue",
                             moe=dict(num_experts=2, top_k=2, expert_hidden=8), moue=dict(window=4, state_dim=4))
    assert plan_submodel(full, depth=3)[0] == [0, 1, 3]


def test_moue_exported_prefix_sub_model_equals_the_parent(tmp_path):
    from tools.export_submodel import export_submodel

    torch.manual_seed(0)
    net = dict(preset="tiny", vocab_size=32, n_layers=4, ffn="moue", moe=dict(num_experts=2, top_k=2, expert_hidden=8),
               moue=dict(window=2, state_dim=4, router="per_layer"))
    parent = Transformer(TransformerConfig(**{**net, "moe": dict(net["moe"]), "moue": dict(net["moue"])})).eval()
    torch.save({"state_dict": {f"model.{k}": v for k, v in parent.state_dict().items()},
                "hyper_parameters": {"net": net}}, tmp_path / "p.ckpt")
    res = export_submodel(tmp_path / "p.ckpt", tmp_path / "s.ckpt", layers=[0, 1, 2], top_k=1)
    sub = Transformer(TransformerConfig(**res["net"])).eval()
    sub.load_state_dict({k.removeprefix("model."): v for k, v in torch.load(tmp_path / "s.ckpt")["state_dict"].items()})
    x = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(sub(x), parent(x, layers=[0, 1, 2], routing=RoutingLimit(top_k=1)))


@pytest.mark.slow
def test_elastic_grid_prints_one_point_per_setting_and_logs_a_figure(elastic_ckpt, tmp_path, capsys, data_cache):
    from tools.elastic_grid import main as grid_main

    points = grid_main([str(elastic_ckpt), "--depths", "2", "3", "--experts", "2", "4", "--top-k", "1", "2",
                        "--max-batches", "2", "--decode-tokens", "4", "--repeats", "1", "--logdir", str(tmp_path / "tb"),
                        "--cache-dir", str(data_cache)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines == points and len(points) == 8
    full = next(p for p in points if p["depth"] == 3 and p["experts"] == 4 and p["top_k"] == 2)
    smallest = next(p for p in points if p["depth"] == 2 and p["experts"] == 2 and p["top_k"] == 1)
    assert smallest["params_total"] < full["params_total"] and smallest["params_activated"] < full["params_activated"]
    assert all(p["val_loss"] > 0 and p["decode_tokens_per_s"] > 0 for p in points)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert "elastic/val_loss_vs_activated" in acc.Tags()["images"]
