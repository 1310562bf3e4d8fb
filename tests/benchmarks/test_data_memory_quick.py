"""benchmarks/data_memory.py in quick mode: it runs, prints its JSON, and lazy decoding keeps setup's
memory flat while eager decoding holds every decoded clip (timings are reported, never asserted)."""

from __future__ import annotations


import pytest

from tests.helpers import load_benchmark

load = load_benchmark


def test_data_memory_quick_eager_grows_with_the_files_lazy_does_not(tmp_path, capsys):
    pytest.importorskip("av")
    bench = load("data_memory")
    out = bench.main(["--quick", "--dir", str(tmp_path)])
    assert capsys.readouterr().out.strip().startswith("{")
    n = out["settings"]["n"]
    by = {(r["decode"], r["files"]): r for r in out["results"]}
    assert set(by) == {(d, k) for d in ("eager", "lazy") for k in (n, 4 * n)}
    assert all(r["items"] == r["files"] for r in out["results"])
    assert out["same_checksum_eager_lazy"]  # both modes served the same pixels
    # eager setup holds every decoded clip; lazy setup only lists the files
    assert by[("eager", 4 * n)]["setup_growth_mb"] >= 0.9 * out["decoded_mb_large"]
    assert by[("lazy", 4 * n)]["setup_growth_mb"] < 0.25 * out["decoded_mb_large"]
    assert out["growth_n_to_4n_mb"]["eager"] > out["growth_n_to_4n_mb"]["lazy"]
