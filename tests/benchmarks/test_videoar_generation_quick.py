"""benchmarks/videoar_generation.py in quick mode: it runs, and its equivalence and pass-count claims hold
(timings are reported, never asserted)."""

from __future__ import annotations

from tests.helpers import load_benchmark


load = load_benchmark


def test_videoar_generation_quick_cached_equals_uncached_and_counts_passes():
    out = load("videoar_generation").main(["--quick"])
    cfg = out["config"]
    frames, scales = cfg["frames"], cfg["scales"]
    tokens_per_frame = sum(h * w for h, w in scales)
    assert cfg["tokens_per_frame"] == tokens_per_frame and cfg["video_tokens"] == frames * tokens_per_frame

    kv = out["kv_cache"]
    assert kv["tokens_equal"] is True
    assert kv["max_abs_logit_diff"] <= 1e-5 and kv["meets_logit_goal"] is True
    assert kv["max_abs_logit"] > 1e-3  # the logits are not trivially zero, so the diff means something
    assert kv["forward_passes"] == {"cached": frames * len(scales), "uncached": frames * len(scales)}
    assert kv["trunk_calls"]["cached"] == frames * len(scales) + 1  # + the condition prefix pass

    ns = out["next_scale_vs_raster"]
    assert ns["forward_passes"] == {"next_scale": frames * len(scales), "raster": frames * tokens_per_frame}
    assert ns["measured_forward_passes"] == ns["forward_passes"]
    assert ns["forward_pass_ratio_raster_over_next_scale"] == tokens_per_frame / len(scales)
    for v in (kv["ms_cached"], kv["ms_uncached"], ns["ms_next_scale_cached"], ns["ms_raster_cached"],
              out["aa_cached_over_cached"]["ratio"]):
        assert v > 0
