"""tools/routing_report.py --combine: per-run routing tables averaged over runs, cell by cell."""

from __future__ import annotations

import pytest
import torch

from models.io import atomic_torch_save
from models.moe.analysis import routing_tables
from tools.routing_report import combine_tables, main


def _counts(text_experts, image_experts, layers=3, experts=4):
    """{group: [L, E]} with each group's pairs on the given experts at every layer."""
    out = {}
    for name, chosen in (("text", text_experts), ("image", image_experts)):
        c = torch.zeros(layers, experts, dtype=torch.int64)
        c[:, chosen] = 10
        out[name] = c
    return out


def test_combine_averages_each_cell_over_runs(tmp_path):
    # top 25% of 4 experts = 1 expert: run a shares it (IoU 1), run b does not (IoU 0)
    a, b = _counts([0], [0]), _counts([0], [1])
    c = combine_tables([routing_tables(a), routing_tables(b)])
    assert c["runs"] == 2 and c["groups"] == ["image", "text"] and c["layers"] == [0, 1, 2]
    assert float(c["iou_mean"][0][0, 1]) == pytest.approx(0.5)
    assert float(c["iou_std"][0][0, 1]) == pytest.approx(2 ** -0.5)
    assert float(c["iou_mean"][0][0, 0]) == 1.0 and float(c["iou_std"][0][0, 0]) == 0.0
    # entropy: one expert of 4 -> 0 in both runs
    assert torch.equal(c["entropy_mean"], torch.zeros(2, 3, dtype=torch.float64))

    paths = []
    for name, counts in (("a", a), ("b", b)):
        paths.append(tmp_path / f"{name}.counts.pt")
        atomic_torch_save(counts, paths[-1])
    out = tmp_path / "combined.md"
    md = main(["--combine", *map(str, paths), "--out", str(out)])
    assert out.read_text() == md and "over 2 runs" in md
    assert "| image | 1.00 ± 0.00 | 0.50 ± 0.71 |" in md


def test_combine_refuses_mismatched_runs_and_names_bad_files(tmp_path):
    with pytest.raises(ValueError, match="run 1 has groups"):
        combine_tables([routing_tables(_counts([0], [0])), routing_tables({"text": torch.ones(3, 4, dtype=torch.int64)})])
    bad = tmp_path / "broken.counts.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.counts.pt"):
        main(["--combine", str(bad)])
    with pytest.raises(SystemExit):
        main([])  # neither a checkpoint nor --combine
