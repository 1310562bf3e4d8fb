"""MoUE pieces: topology masks, UELB, universal routing, trajectory state, the MoUE transformer."""

from __future__ import annotations

import math

import pytest
import torch

from models.moe.moue import (
    MoUEConfig,
    exposure,
    naive_balance_loss,
    staggered_rotational_mask,
    uelb_loss,
    uelb_target,
    window_blocks,
)


def brute_force_candidates(L, B, b, W, s, centered):
    """Paper definition: C_l = union_{j<W} block[(o_l + j) mod B], o_l = l*s (centred: - floor((W-1)/2))."""
    out = []
    for layer in range(L):
        o = layer * s - ((W - 1) // 2 if centered else 0)
        experts = set()
        for j in range(W):
            blk = (o + j) % B
            experts |= set(range(blk * b, (blk + 1) * b))
        out.append(experts)
    return out


@pytest.mark.parametrize(
    "L, B, b, W, s, centered",
    [(4, 4, 2, 2, 1, False), (6, 6, 3, 3, 1, True), (8, 4, 2, 2, 1, False), (5, 10, 1, 4, 2, False), (4, 4, 2, 1, 1, False), (4, 4, 2, 4, 1, False)],
)
def test_topology_mask_matches_definition(L, B, b, W, s, centered):
    mask = staggered_rotational_mask(L, B, b, W, s, centered)
    expected = brute_force_candidates(L, B, b, W, s, centered)
    assert mask.shape == (L, B * b)
    for layer in range(L):
        assert set(mask[layer].nonzero().flatten().tolist()) == expected[layer]
        assert mask[layer].sum() == W * b  # virtual width


def test_exposure_uniform_when_blocks_equal_layers_and_stride_one():
    mask = staggered_rotational_mask(6, 6, 4, 3, 1)
    assert (exposure(mask) == 3).all()
    # W = 1 is a standard MoE: layer l sees exactly its own block
    m1 = staggered_rotational_mask(4, 4, 2, 1, 1)
    assert [m1[l].nonzero().flatten().tolist() for l in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # W = B is full sharing
    assert staggered_rotational_mask(4, 4, 2, 4, 1).all()


def test_uelb_target_sums_to_one_and_matches_formula():
    mask = staggered_rotational_mask(8, 4, 2, 2, 1)  # B < L: non-uniform exposure not here, but width constant
    pi = uelb_target(mask)
    assert pi.sum() == pytest.approx(1.0)
    c = exposure(mask).float()
    torch.testing.assert_close(pi, c / (8 * 2 * 2))  # c_e / (L * W * b)
    assert torch.allclose(uelb_target(mask, "uniform"), torch.full((8,), 1 / 8))


def test_uelb_hand_computed():
    # 2 layers, pool of 3 experts; layer 0 sees {0,1}, layer 1 sees {1,2}
    allowed = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    pi = uelb_target(allowed)  # (1/2) * [1/2, 1/2 + 1/2, 1/2] = [0.25, 0.5, 0.25]
    torch.testing.assert_close(pi, torch.tensor([0.25, 0.5, 0.25]))
    f = torch.tensor([[0.75, 0.25, 0.0], [0.0, 0.5, 0.5]])
    P = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.3, 0.7]])
    # F = [0.375, 0.375, 0.25], Pbar = [0.3, 0.35, 0.35]
    expected = 0.375 * 0.3 / 0.25 + 0.375 * 0.35 / 0.5 + 0.25 * 0.35 / 0.25
    assert uelb_loss(f, P, pi).item() == pytest.approx(expected)
    # at the target F = Pbar = pi the loss is 1
    assert uelb_loss(pi.expand(2, 3), pi.expand(2, 3), pi).item() == pytest.approx(1.0)
    # naive: per-layer Switch loss over |C_l| = 2 candidates, averaged
    naive = (2 * (0.75 * 0.6 + 0.25 * 0.4) + 2 * (0.5 * 0.3 + 0.5 * 0.7)) / 2
    assert naive_balance_loss(f, P, allowed).item() == pytest.approx(naive)


def test_window_blocks_wraps():
    assert window_blocks(3, 4, 3) == [3, 0, 1]
    assert window_blocks(0, 4, 3, centered=True) == [3, 0, 1]


def test_topology_report_tool():
    from math import comb, log10

    from tools.moue_topology import report

    r = report(layers=4, experts=8, window=2, top_k=2)
    assert r["physical_width"] == 32 and r["virtual_width_per_layer"] == [16] * 4
    assert r["exposure"] == [2] * 32
    assert r["log10_routing_paths"] == pytest.approx(round(4 * log10(comb(16, 2)), 3))
    assert r["log10_routing_paths_full_sharing"] == pytest.approx(round(4 * log10(comb(32, 2)), 3))
