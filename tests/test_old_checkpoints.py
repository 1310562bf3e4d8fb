"""Checkpoints written before the one-trunk refactor (tests/fixtures/, by tests/fixtures/make_fixtures.py at
commit 51fb86d) load through every normal path and give the same logits.

The old LM had `layers.i.*`, `pool.*`, `routing.*`, `norm.*` and split `wq` / `wkv` projections; the old
VideoAR had `blocks.i.*` and `norm.*`. A key map (`models.<family>.upgrade_state_dict`) is applied on
load, to the weights and to the optimizer state (so `ckpt_path=` resumes them).
"""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

import train
from tests.conftest import compose_train_cfg
from tests.fixtures.make_fixtures import FIXTURES, QUIET
from tests.helpers import ROOT, find_metrics, read_metric

FIX = ROOT / "tests" / "fixtures"
EXPECTED = torch.load(FIX / "expected.pt", weights_only=False)
LM_KINDS = ["lm", "moe", "moue"]


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    # the VideoAR fixture records its frozen tokenizer relative to the repository root
    monkeypatch.chdir(ROOT)


def _old_state(name: str) -> dict:
    return torch.load(FIX / f"{name}.ckpt", map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.parametrize("name", LM_KINDS)
def test_key_map_covers_every_old_tensor_and_is_idempotent(name):
    from models.transformer import Transformer, TransformerConfig, upgrade_state_dict

    old = {k.removeprefix("model."): v for k, v in _old_state(name).items()}
    assert any(k.startswith("layers.") for k in old) and not any(k.startswith("trunk.") for k in old)
    new, sources = upgrade_state_dict(old)
    hp = torch.load(FIX / f"{name}.ckpt", weights_only=False)["hyper_parameters"]
    model = Transformer(TransformerConfig.from_dict(dict(hp["net"])))
    assert set(new) == set(model.state_dict())
    assert sorted(k for olds in sources.values() for k in olds) == sorted(old)  # nothing dropped or doubled
    again, _ = upgrade_state_dict(new)
    assert again is new  # a current state dict passes through untouched
    # the fused projection is [q | k | v]: the old wq rows, then the old wkv rows
    wqkv = new["trunk.layers.0.attn.wqkv.weight"]
    assert torch.equal(wqkv, torch.cat([old["layers.0.attn.wq.weight"], old["layers.0.attn.wkv.weight"]]))


@pytest.mark.parametrize("name", LM_KINDS)
def test_lm_checkpoints_load_with_equal_logits_and_generations(name):
    from generate import load_module

    module = load_module(FIX / f"{name}.ckpt")
    exp = EXPECTED[name]
    with torch.no_grad():
        torch.testing.assert_close(module.model(exp["tokens"]), exp["logits"], atol=1e-6, rtol=1e-5)
        assert torch.equal(module.model.generate(exp["prompt"], 8, temperature=0.0), exp["greedy"])
    if name == "moue":
        assert module.moue_window == 2


@pytest.mark.parametrize("name", LM_KINDS)
def test_init_ckpt_loads_old_weights(name, tmp_path):
    from lit_modules.lm import LanguageModelModule

    hp = torch.load(FIX / f"{name}.ckpt", weights_only=False)["hyper_parameters"]
    module = LanguageModelModule(net=dict(hp["net"]), init_ckpt=str(FIX / f"{name}.ckpt"))
    module.configure_model()
    exp = EXPECTED[name]
    with torch.no_grad():
        torch.testing.assert_close(module.model(exp["tokens"]), exp["logits"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["lm", "moue"])
def test_ckpt_path_resumes_an_old_run_with_its_optimizer_state(name, tmp_path):
    """Resume the 3-step fixture run to 5 steps: the fused projection's Adam moments are the old ones
    concatenated, and training continues from the old weights."""
    from lit_modules.lm import LanguageModelModule

    seen = {}
    original = LanguageModelModule.on_train_start

    def capture(self):
        opt = self.optimizers().optimizer
        names = {id(p): n for n, p in self.named_parameters()}
        for group in opt.param_groups:
            for p in group["params"]:
                if names[id(p)] == "model.trunk.layers.0.attn.wqkv.weight":
                    seen["exp_avg"] = opt.state[p]["exp_avg"].clone()
        seen["step"] = self.global_step
        original(self)

    LanguageModelModule.on_train_start = capture
    try:
        overrides = QUIET + FIXTURES[name] + ["trainer.max_steps=5", f"ckpt_path={FIX / f'{name}.ckpt'}",
                                              f"data.cache_dir={tmp_path / 'cache'}"]
        cfg = compose_train_cfg(overrides, tmp_path / "run")
        train.run(cfg)
    finally:
        LanguageModelModule.on_train_start = original
    old = torch.load(FIX / f"{name}.ckpt", weights_only=False)
    opt = old["optimizer_states"][0]
    keys = [k for k in old["state_dict"] if k.startswith("model.")]
    # the old optimizer numbered the matrices first, in state-dict order (tied head excluded)
    mats = [k for k in keys if old["state_dict"][k].dim() >= 2 and k != "model.lm_head.weight"]
    wq, wkv = mats.index("model.layers.0.attn.wq.weight"), mats.index("model.layers.0.attn.wkv.weight")
    want = torch.cat([opt["state"][wq]["exp_avg"], opt["state"][wkv]["exp_avg"]])
    assert seen["step"] == 3 and torch.equal(seen["exp_avg"], want)
    losses = read_metric(find_metrics(tmp_path / "run"))
    assert sorted(losses) == [3, 4] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_videoar_checkpoint_loads_with_equal_logits_and_generation():
    from generate import load_videoar

    module = load_videoar(FIX / "videoar.ckpt")
    exp = EXPECTED["videoar"]
    with torch.no_grad():
        logits = module.net(exp["feats"], exp["labels"], exp["num_frames"])
        torch.testing.assert_close(logits, exp["logits"], atol=1e-6, rtol=1e-5)
        tokens = module.net.generate(module.tokenizer.quantizer, exp["gen_labels"], exp["num_frames"],
                                     guidance=exp["gen_guidance"],
                                     generator=torch.Generator().manual_seed(exp["gen_seed"]))
    assert all(torch.equal(a, b) for a, b in zip(tokens, exp["gen_tokens"]))


def test_videoar_init_ckpt_loads_old_weights():
    from lit_modules.videoar import VideoARModule

    hp = torch.load(FIX / "videoar.ckpt", weights_only=False)["hyper_parameters"]
    module = VideoARModule(net=dict(hp["net"]), tokenizer_ckpt=hp["tokenizer_ckpt"], init_ckpt=str(FIX / "videoar.ckpt"))
    module.configure_model()
    exp = EXPECTED["videoar"]
    with torch.no_grad():
        torch.testing.assert_close(module.net(exp["feats"], exp["labels"], exp["num_frames"]), exp["logits"],
                                   atol=1e-6, rtol=1e-5)


def test_generate_cli_and_conversion_tool_on_old_checkpoints(tmp_path, monkeypatch):
    import generate
    from tools.convert_moe_to_moue import convert

    monkeypatch.setattr(sys, "argv", ["generate.py", str(FIX / "lm.ckpt"), "--prompt", "Born", "-n", "1",
                                      "--max-new-tokens", "4"])
    generate.main()
    out = tmp_path / "clips"
    monkeypatch.setattr(sys, "argv", ["generate.py", str(FIX / "videoar.ckpt"), "--classes", "1", "--frames", "2",
                                      "--out", str(out), "--format", "gif"])
    generate.main()
    assert list(out.glob("*.gif"))
    # MoE -> MoUE conversion of an old MoE checkpoint: at window 1 the converted model is the MoE
    result = convert(FIX / "moe.ckpt", tmp_path / "converted", window=2, state_dim=8)
    from lit_modules.lm import LanguageModelModule

    moue = LanguageModelModule(net=result["net"], init_ckpt=str(result["path"]))  # what the written experiment does
    moue.configure_model()
    assert moue.moue_window == 1
    exp = EXPECTED["moe"]
    with torch.no_grad():
        torch.testing.assert_close(moue.model.eval()(exp["tokens"]), exp["logits"], atol=1e-5, rtol=1e-5)
    shutil.rmtree(tmp_path / "converted")
