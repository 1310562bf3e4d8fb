"""LanguageModelModule: non-finite guard, schedule, clipping, checkpoint round trip."""

from __future__ import annotations

import math

import pytest
import torch

import train
from lit_modules.base import OptimConfig, warmup_cosine
from lit_modules.lm import LanguageModelModule
from tests.helpers import find_metrics, read_metric


def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, 10, 110, 0.1) for s in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_warmup_stable_decay_holds_the_peak_then_decays_over_the_last_fraction():
    """ERNIE 5.0's recipe: warm-up, constant, cosine decay to min_lr_ratio over the last half (1e-4 -> 1e-5)."""
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.5)
    f = cfg.lr_lambda(200)
    lrs = [f(s) for s in range(210)]
    assert lrs[0] < lrs[9] < 1.0 and lrs[:10] == [warmup_cosine(s, 10, 200, 0.1) for s in range(10)]
    assert all(v == 1.0 for v in lrs[10:101])  # stable until the decay starts at 200 - 100
    assert all(a >= b for a, b in zip(lrs[100:200], lrs[101:201]))
    assert lrs[150] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[200] == pytest.approx(0.1) and lrs[209] == pytest.approx(0.1)
    assert OptimConfig().lr_lambda(200)(150) == warmup_cosine(150, 100, 200, 0.1)  # cosine stays the default
    with pytest.raises(ValueError, match="model.optim.schedule must be"):
        OptimConfig(schedule="linear")
    with pytest.raises(ValueError, match="model.optim.decay_fraction"):
        OptimConfig(schedule="wsd", decay_fraction=1.5)


class _PoisonAt:
    """Makes the loss non-finite at the given training calls by poisoning the logits."""

    def __init__(self, module, calls):
        self.calls, self.n, self.forward = set(calls), 0, module.model.forward
        module.model.forward = self

    def __call__(self, tokens, *a, **kw):
        out = self.forward(tokens, *a, **kw)
        if torch.is_grad_enabled():
            if self.n in self.calls:
                out = out * float("nan")
            self.n += 1
        return out


def _fit_with_poison(make_cfg, policy, calls, steps=5):
    cfg = make_cfg([f"model.nonfinite={policy}", f"trainer.max_steps={steps}", "logger=csv", "test=false",
                    "trainer.limit_val_batches=0"])
    import hydra

    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    trainer = hydra.utils.instantiate(cfg.trainer, logger=[hydra.utils.instantiate(cfg.logger.csv)], _convert_="all")

    class Hook(__import__("lightning").Callback):
        def on_fit_start(self, trainer, pl_module):
            _PoisonAt(pl_module, calls)

    trainer.callbacks.append(Hook())
    trainer.fit(model, datamodule=dm)
    return model, trainer


def test_nonfinite_loss_error_names_the_step(make_cfg):
    with pytest.raises(FloatingPointError, match="global step 2"):
        _fit_with_poison(make_cfg, "error", {2})


def test_nonfinite_loss_skip_counts_and_keeps_weights_finite(make_cfg, tmp_path):
    model, trainer = _fit_with_poison(make_cfg, "skip", {1, 3}, steps=4)
    assert model.nonfinite_skipped == 2
    assert trainer.global_step == 4  # skipped batches do not count as optimiser steps
    assert all(torch.isfinite(p).all() for p in model.parameters())
    skipped = read_metric(find_metrics(tmp_path / "run"), "train/nonfinite_skipped")
    assert max(skipped.values()) == 2.0


def test_weight_decay_only_on_matrices():
    from lit_modules.base import param_groups

    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(m, 0.1)
    assert [p.dim() for p in decay["params"]] == [2] and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0


def test_checkpoint_round_trip_and_generate(make_cfg, tmp_path):
    cfg = make_cfg(["trainer.max_steps=3", "logger=csv", "test=false"])
    _, objects = train.run(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    module = LanguageModelModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    trained = objects["model"]
    for (n1, p1), (n2, p2) in zip(trained.state_dict().items(), module.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert module.tokenizer.vocab_size == module.net_cfg.vocab_size

    import generate

    samples = generate.main([str(ckpt), "--prompt", "She was born", "-n", "2", "--max-new-tokens", "6", "--seed", "1"])
    assert len(samples) == 2 and all(s.startswith("She was born") for s in samples)
    again = generate.main([str(ckpt), "--prompt", "She was born", "-n", "2", "--max-new-tokens", "6", "--seed", "1"])
    assert samples == again
