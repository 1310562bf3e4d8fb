"""Regional compilation (`model.compile=true`: torch.compile of each trunk block) gives the eager losses.

Compiled with the `aot_eager` backend (the graph capture and autograd of torch.compile without
inductor's code generation), which is what runs in reasonable time on a 2-core CPU.
"""

from __future__ import annotations

import pytest
import torch

import train
from tests.conftest import TINY, compose_train_cfg
from tests.helpers import find_metrics, read_metric

STEPS = ["logger=csv", "test=false", "trainer.max_steps=5", "trainer.val_check_interval=null",
         "trainer.limit_val_batches=0", "model.net.dropout=0.0"]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def overrides(family: str, tokenizer) -> list[str]:
    if family == "lm":
        return [*TINY, *STEPS]
    return ["experiment=videoar", f"model.tokenizer_ckpt={tokenizer}", "model.net.preset=tiny", "data.image_size=16",
            "data.num_frames=5", "data.num_clips=8", "data.batch_size=4", "model.sample.num_clips=0",
            "~callbacks.rich_progress_bar", "~callbacks.model_summary", "trainer.enable_progress_bar=false",
            "extras.print_config=false", *STEPS]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["lm", "videoar"])
def test_regional_compile_gives_the_eager_losses(family, tokenizer, tmp_path, data_cache):
    torch._dynamo.reset()
    losses = {}
    for mode in ("eager", "compiled"):
        extra = ["model.compile=true", "model.compile_backend=aot_eager"] if mode == "compiled" else []
        cfg = compose_train_cfg(overrides(family, tokenizer) + extra, tmp_path / mode,
                                data_cache if family == "lm" else None)
        torch._dynamo.utils.counters.clear()
        _, objects = train.run(cfg)
        losses[mode] = read_metric(find_metrics(tmp_path / mode))
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == (mode == "compiled"), graphs  # the blocks really went through dynamo
        blocks = objects["model"].network.trunk.layers
        assert all((getattr(b, "_compiled_call_impl", None) is not None) == (mode == "compiled") for b in blocks)
    assert sorted(losses["eager"]) == list(range(5)) and sorted(losses["compiled"]) == list(range(5))
    for step, value in losses["eager"].items():
        assert abs(losses["compiled"][step] - value) <= 1e-5, (step, value, losses["compiled"][step])
