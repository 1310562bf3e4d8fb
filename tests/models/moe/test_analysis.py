"""Routing analysis per group: counts, frequencies, top sets, IoU, entropy, report layers, markdown."""

from __future__ import annotations

import math

import pytest
import torch

from models.moe.analysis import (activation_frequency, normalized_entropy, report_layers, route_counts,
                                 routing_markdown, routing_tables, top_experts, topset_iou)


def _two_groups(num_layers: int = 3, E: int = 8) -> dict[str, torch.Tensor]:
    """k=1: group a routes half its tokens to expert 0 and half to 1, group b to 1 and 2."""
    a, b = torch.zeros(num_layers, E, dtype=torch.long), torch.zeros(num_layers, E, dtype=torch.long)
    a[:, [0, 1]] = 10
    b[:, [1, 2]] = 10
    return {"b": b, "a": a}


def test_route_counts_matches_loop():
    g = torch.Generator().manual_seed(0)
    N, k, G, E = 200, 2, 3, 8
    routes = torch.randint(0, E, (N, k), generator=g)
    groups = torch.randint(-1, G, (N,), generator=g)
    ref = torch.zeros(G, E, dtype=torch.long)
    for n in range(N):
        if groups[n] >= 0:
            for e in routes[n]:
                ref[groups[n], e] += 1
    out = route_counts(routes, groups, G, E)
    assert out.dtype == torch.int64 and torch.equal(out, ref)
    assert int(out.sum()) == k * int((groups >= 0).sum())


def test_frequency_top_set_and_iou():
    counts = _two_groups()
    freq = activation_frequency(counts["a"])
    torch.testing.assert_close(freq.sum(1), torch.ones(3))
    assert torch.equal(activation_frequency(torch.zeros(2, 4, dtype=torch.long)), torch.zeros(2, 4))
    assert top_experts(freq[0]).nonzero().flatten().tolist() == [0, 1]
    assert top_experts(torch.zeros(8)).nonzero().flatten().tolist() == [0, 1]  # ties: lower index
    assert top_experts(torch.ones(8), fraction=0.3).sum() == 3  # ceil(2.4)
    freqs = torch.stack([activation_frequency(counts["a"])[0], activation_frequency(counts["b"])[0]])
    iou = topset_iou(freqs)
    torch.testing.assert_close(iou, torch.tensor([[1.0, 1 / 3], [1 / 3, 1.0]]))
    empty = topset_iou(torch.cat([freqs, torch.zeros(1, 8)]))
    assert empty[2].isnan().all() and empty[:, 2].isnan().all() and empty[0, 1] == pytest.approx(1 / 3)


def test_normalized_entropy():
    counts = torch.tensor([[5, 5, 5, 5], [0, 7, 0, 0], [0, 0, 0, 0], [2, 2, 0, 0]])
    ne = normalized_entropy(counts)
    assert ne[0] == pytest.approx(1.0) and ne[1] == 0.0 and ne[2].isnan() and ne[3] == pytest.approx(0.5)


@pytest.mark.parametrize("L,expected", [(1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (4, [0, 1, 3]), (12, [0, 5, 11])])
def test_report_layers(L, expected):
    assert report_layers(L) == expected


def test_tables_and_markdown():
    tables = routing_tables(_two_groups(num_layers=12), fraction=0.25)
    assert tables["groups"] == ["a", "b"] and tables["layers"] == [0, 5, 11]
    assert tables["roles"] == ["first", "middle", "last"] and tables["top_k"] == 2
    for iou in tables["iou"]:
        assert iou[0, 1] == pytest.approx(1 / 3)
    assert tables["frequency"][0].shape == (2, 8) and tables["entropy"].shape == (2, 12)
    torch.testing.assert_close(tables["entropy"], torch.full((2, 12), math.log(2) / math.log(8)))
    assert tables["top3"][0][0].tolist() == [0, 1, 2] and float(tables["concentration"][0][1]) == 1.0
    md = routing_markdown(tables, step=7)
    assert "layer 1 (first), step 7" in md and "layer 6 (middle)" in md and "layer 12 (last)" in md
    assert "| a | 1.00 | 0.33 |" in md and "| b | 0.33 | 1.00 |" in md
    assert f"| a | {' | '.join(['0.33'] * 12)} |" in md  # NE = log 2 / log 8
    assert "- b: top-3 experts 1, 2, 0; top 25% carry 100.0% of pairs" in md


def test_tables_reject_mismatched_shapes():
    with pytest.raises(ValueError):
        routing_tables({"a": torch.zeros(2, 4, dtype=torch.long), "b": torch.zeros(3, 4, dtype=torch.long)})
