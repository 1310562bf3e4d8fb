"""Colour metrics: exact values on hand-made images."""

from __future__ import annotations

import math

import pytest
import torch

from models.tokenizers.metrics import chroma, colour_metrics, grey


def test_grey_copy_has_no_chroma_and_keeps_luma():
    x = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    g = grey(x)
    m = colour_metrics(g, x)
    assert chroma(g) == pytest.approx(0.0, abs=1e-7) and m["chroma_recon"] == pytest.approx(0.0, abs=1e-7)
    assert m["chroma_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert m["chroma_error"] == pytest.approx(m["chroma_real"], rel=1e-6)  # all of the colour is missing
    # mean over RGB is not BT.601 luma, but close: the luma PSNR is far above the chroma PSNR
    assert m["psnr_y"] > m["psnr_cbcr"] + 5


def test_identity_and_known_values():
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    m = colour_metrics(x.clone(), x)
    assert m["chroma_error"] == 0 and m["chroma_ratio"] == pytest.approx(1.0) and math.isinf(m["psnr_r"])
    # pure red (1, -1, -1) in [-1, 1]: chroma = mean(|1 - (-1/3)|, 2 x |-1 + 1/3|) = 8/9
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert chroma(red) == pytest.approx(8 / 9)
    # an error of 0.2 in [-1, 1] on the red channel only: 0.1 in [0, 1] -> 20 dB on R, inf on G and B
    off = red.clone()
    off[:, 0] -= 0.2
    m = colour_metrics(off, red)
    assert m["psnr_r"] == pytest.approx(20.0, abs=1e-4) and math.isinf(m["psnr_g"]) and math.isinf(m["psnr_b"])


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="RGB"):
        colour_metrics(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="differ"):
        colour_metrics(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 5, 5))


def test_tokenizer_colour_tool_reports_every_scale(tiny_tokenizer):
    from tools.tokenizer_colour import report

    res = report(str(tiny_tokenizer), clips=2, frames=5, size=16)
    assert [s["k"] for s in res["scales"]] == [1, 2, 3] and res["final"] == res["scales"][-1]
    assert res["final"]["chroma_real"] > 0 and {"chroma_ratio", "psnr_cbcr", "psnr"} <= set(res["final"])


def test_clip_strip_writes_a_png_of_clips_and_reconstructions(tiny_tokenizer, tmp_path):
    from PIL import Image

    from tools.clip_strip import clip_strip

    out = tmp_path / "strip.png"
    res = clip_strip(str(out), tokenizer=str(tiny_tokenizer), clips=2)
    assert res == {"out": str(out), "rows": 4, "frames": 5, "size": 16}
    with Image.open(out) as im:  # make_grid: 1-pixel padding around and between frames
        assert im.size == (5 * 17 + 1, 4 * 17 + 1) and im.mode == "RGB"
    with pytest.raises(ValueError, match="--tokenizer or --videoar"):
        clip_strip(str(tmp_path / "none.png"))


def ablation_args(**kw):
    """The namespace tools/colour_ablation.build reads, at its defaults unless overridden."""
    import argparse

    base = dict(video=1, time_stride=4, time_kernel=3, current_init="3d", past_rate=1.0, temporal_warmup=0, ch=None,
                ch_mult=None, dim=None)
    return argparse.Namespace(**{**base, **kw})


def test_colour_ablation_knobs_change_the_3d_kernels_as_documented():
    import models.tokenizers.causal_conv as cc
    from tools.colour_ablation import build, main

    net = build(ablation_args(current_init="2d", past_rate=0.03))
    convs = [m for m in net.modules() if isinstance(m, cc.CausalConv3d) and m.kt > 1]
    assert convs and all(float(m.conv.weight[:, :, :-1].abs().max()) == 0.0 for m in convs)
    # the temporal downsampling still starts as the identity on its own frame
    down = next(m for m in net.modules() if isinstance(m, cc.TimeDownsample)).conv.conv.weight
    c = down.shape[0]
    assert torch.equal(down[torch.arange(c), torch.arange(c), -1, 1, 1], torch.ones(c))
    # past_rate a: the effective past slices are a x the stored ones (Adam moves them a times as fast)
    net = build(ablation_args(past_rate=0.5))
    conv = next(m for m in net.modules() if isinstance(m, cc.CausalConv3d) and m.kt > 1).conv
    stored = conv.parametrizations.weight.original
    assert torch.allclose(conv.weight[:, :, :-1], 0.5 * stored[:, :, :-1]) and torch.equal(conv.weight[:, :, -1], stored[:, :, -1])
    net = build(ablation_args(time_stride=1, time_kernel=1))
    assert all(m.kt == 1 for m in net.modules() if isinstance(m, cc.CausalConv3d))
    res = main(["--steps", "1", "--batch", "2", "--train-clips", "2", "--eval-clips", "2", "--eval-every", "1"])
    assert [h["step"] for h in res["history"]] == [0, 1] and 0 <= res["final"]["chroma_ratio"] < 5
    # width and code knobs reach the network
    net = build(ablation_args(ch=8, ch_mult=[1, 2, 2], dim=12))
    assert net.cfg.ch == 8 and net.cfg.ch_mult == [1, 2, 2] and net.cfg.dim == 12
    assert net.encoder.conv_in.conv.out_channels == 8
    # still clips: training reports the chroma of still held-out clips too
    res = main(["--steps", "1", "--static-steps", "1", "--batch", "2", "--train-clips", "2", "--eval-clips", "2",
                "--eval-every", "1"])
    assert all("chroma_ratio_still" in h for h in res["history"])


def test_colour_ablation_image_steps_train_only_the_current_frame_slices():
    import models.tokenizers.causal_conv as cc
    from tools.colour_ablation import build, main

    net = build(ablation_args())
    x = torch.rand(2, 3, 1, 32, 32) * 2 - 1  # 1-frame clips, as in the image stage
    out = net(x)
    (out["recon"] - x).abs().mean().backward()
    convs = [m.conv for m in net.modules() if isinstance(m, cc.CausalConv3d) and m.kt > 1]
    # a single frame's past is the zero padding: the past slices get no gradient, the current ones do
    assert convs and all(float(c.weight.grad[:, :, :-1].abs().max()) == 0.0 for c in convs)
    assert any(float(c.weight.grad[:, :, -1].abs().max()) > 0 for c in convs)
    res = main(["--steps", "2", "--image-steps", "1", "--temporal-warmup", "1", "--batch", "1", "--train-clips", "2",
                "--eval-clips", "2", "--eval-every", "1"])
    assert [h["step"] for h in res["history"]] == [0, 1, 2] and res["config"]["image_steps"] == 1
    with pytest.raises(SystemExit):
        main(["--image-steps", "1", "--video", "0"])


def test_colour_ablation_image_clips_sets_the_distinct_clips_per_image_step():
    from tools.colour_ablation import image_batch, main

    train = torch.arange(6 * 9, dtype=torch.float32).view(6, 1, 9, 1, 1).expand(6, 3, 9, 2, 2).contiguous()
    x, idx = image_batch(train, 8, 2, torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 1, 2, 2) and idx.view(2, 4).unique(dim=1).shape == (2, 1)  # 4 frames of each of 2 clips
    clip_of_frame = (x[:, 0, 0, 0, 0] // 9).long()  # the pixel value encodes clip * 9 + frame
    assert torch.equal(clip_of_frame, idx)
    x, idx = image_batch(train, 8, None, torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 1, 2, 2) and torch.equal((x[:, 0, 0, 0, 0] // 9).long(), idx)
    res = main(["--steps", "1", "--image-steps", "1", "--image-clips", "2", "--batch", "1", "--train-clips", "2",
                "--eval-clips", "2", "--eval-every", "1"])
    assert res["config"]["image_clips"] == 2 and [h["step"] for h in res["history"]] == [0, 1]
    for bad in (["--image-steps", "1", "--image-clips", "3"], ["--image-clips", "2"]):  # 3 does not divide 32
        with pytest.raises(SystemExit):
            main(bad)


def test_colour_ablation_frame_ramp_weighs_off_grid_frames_from_zero_to_one():
    from tools.colour_ablation import frame_weights, main

    # 9 frames, tau 4: frames 0, 4, 8 start the latent frames
    assert frame_weights(9, 4, 0, 100).tolist() == [1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert frame_weights(9, 4, 50, 100).tolist() == [1, .5, .5, .5, 1, .5, .5, .5, 1]
    assert frame_weights(9, 4, 500, 100).tolist() == [1.0] * 9
    assert frame_weights(9, 4, 500, 0).tolist() == [1, 0, 0, 0, 1, 0, 0, 0, 1]  # 0: never
    res = main(["--steps", "1", "--frame-ramp", "0", "--batch", "1", "--train-clips", "2", "--eval-clips", "2",
                "--eval-every", "1"])
    assert res["config"]["frame_ramp"] == 0 and [h["step"] for h in res["history"]] == [0, 1]
