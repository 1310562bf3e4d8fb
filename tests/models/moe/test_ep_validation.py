"""Expert-parallel set-up errors (single process; the collectives are tested in tests/test_expert_parallel.py)."""

from __future__ import annotations

import pytest

from lit_modules.parallel import ExpertParallelStrategy
from models.moe.layer import MoEConfig, MoELayer
from models.parallelize import enable_expert_parallel


class FakeMesh:
    """What the checks read of a 1-D DeviceMesh; they all run before any collective."""

    def __init__(self, size: int, ndim: int = 1):
        self._size, self.ndim = size, ndim

    def size(self) -> int:
        return self._size


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_strategy_rejects_bad_expert_parallel_size(size):
    with pytest.raises(ValueError, match="trainer.strategy.expert_parallel_size"):
        ExpertParallelStrategy(expert_parallel_size=size)


def test_strategy_keeps_size():
    assert ExpertParallelStrategy(expert_parallel_size=4).expert_parallel_size == 4


@pytest.mark.parametrize(
    "cfg, mesh, match",
    [
        (dict(num_experts=6), FakeMesh(4), "model.net.moe.num_experts=6 must be divisible by trainer.strategy.expert_parallel_size=4"),
        (dict(capacity_factor=1.25), FakeMesh(2), "model.net.moe.capacity_factor=null"),
    ],
)
def test_enable_expert_parallel_errors_name_the_config_keys(cfg, mesh, match):
    model = MoELayer(8, MoEConfig(expert_hidden=8, **cfg))
    with pytest.raises(ValueError, match=match):
        enable_expert_parallel(model, mesh)


def test_layer_rejects_2d_mesh_and_moue():
    layer = MoELayer(8, MoEConfig(expert_hidden=8))
    with pytest.raises(ValueError, match="1-D mesh"):
        layer.enable_expert_parallel(FakeMesh(2, ndim=2))
    from models.layers.trunk import Trunk, TrunkConfig

    trunk = Trunk(TrunkConfig(n_layers=2, d_model=16, n_heads=2, ffn="moue"))
    with pytest.raises(ValueError, match="model.net.ffn=moe only"):
        enable_expert_parallel(trunk, FakeMesh(2))
