import time

import pytest
import torch

from datamodules.synthetic_audio import AUDIO_CLASSES, render_synthetic_audio
from datamodules.synthetic_shapes import MOTIONS, NUM_SHAPE_CLASSES, SHAPES, class_names, render_moving_shapes

# ---------------------------------------------------------------------------
# moving shapes
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clips():
    return render_moving_shapes(48, 9, 32, seed=3)


def test_shapes_dtype_range_and_labels(clips):
    videos, labels = clips
    assert videos.shape == (48, 9, 32, 32, 3) and videos.dtype == torch.uint8
    assert labels.shape == (48,) and labels.dtype == torch.long
    # Balanced: every block of 12 consecutive clips holds each class once.
    assert torch.bincount(labels, minlength=NUM_SHAPE_CLASSES).tolist() == [4] * NUM_SHAPE_CLASSES
    assert videos.float().std() > 20  # not blank
    assert class_names()[0] == "circle-horizontal-slow" and class_names()[-1] == "triangle-vertical-fast"
    assert len(class_names(5)) == 5


def test_shapes_same_seed_identical_other_seed_different(clips):
    videos, labels = render_moving_shapes(48, 9, 32, seed=3)
    assert torch.equal(videos, clips[0]) and torch.equal(labels, clips[1])
    other, _ = render_moving_shapes(48, 9, 32, seed=4)
    assert not torch.equal(other, clips[0])


def test_shapes_prefix_stable_in_clips_and_frames(clips):
    # Clip i depends only on (seed, i) and positions are analytic in time.
    fewer, labels = render_moving_shapes(10, 5, 32, seed=3)
    assert torch.equal(fewer, clips[0][:10, :5]) and torch.equal(labels, clips[1][:10])


def test_num_classes_restricts_labels():
    _, labels = render_moving_shapes(20, 2, 16, seed=0, num_classes=4)
    assert set(labels.tolist()) == {0, 1, 2, 3}  # circles in the four motion groups


def _main_object_track(video: torch.Tensor):
    """Per-frame coverage of the single object (plain background, no distractors)."""
    flat = video.reshape(video.shape[0], -1, 3).long()
    codes = flat[..., 0] * 65536 + flat[..., 1] * 256 + flat[..., 2]
    bg_code = torch.mode(codes[0]).values
    bg = torch.tensor([bg_code // 65536, (bg_code // 256) % 256, bg_code % 256])
    diff = (video.long() - bg).abs().sum(-1)  # [T, H, W]
    fg_col = flat[0][(diff[0].reshape(-1)) == diff[0].max()][0]
    # Coverage in [0, 1]: anti-aliased edge pixels lie between background and object colour.
    return (diff.float() / (fg_col - bg).abs().sum()).clamp(0, 1)


def test_labels_follow_the_visible_shape_and_motion():
    size, frames = 32, 9
    videos, labels, info = render_moving_shapes(36, frames, size, seed=7, background="plain",
                                                num_distractors=(0, 0), return_params=True)
    assert torch.equal(info["shape"][:, 0], labels // len(MOTIONS))
    assert torch.equal(info["motion"], labels % len(MOTIONS))
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    for video, label in zip(videos, labels.tolist()):
        shape, motion = SHAPES[label // 4], MOTIONS[label % 4]
        mask = _main_object_track(video)
        area = mask.sum((1, 2))
        assert (area > 0).all()
        cx = (mask * xs).sum((1, 2)) / area
        cy = (mask * ys).sum((1, 2)) / area
        dx, dy = cx.diff().abs(), cy.diff().abs()
        step = torch.sqrt(cx.diff() ** 2 + cy.diff() ** 2).median()
        if motion.startswith("horizontal"):
            assert dx.median() > 3 * dy.median(), (label, dx, dy)
        else:
            assert dy.median() > 3 * dx.median(), (label, dx, dy)
        if motion.endswith("slow"):
            assert 0.3 < step < 1.2, (label, step)
        else:
            assert 1.3 < step < 2.7, (label, step)
        # Shape from how much of its bounding box the object fills (the main object never rotates).
        m0 = mask[0] >= 0.5
        rows, cols = m0.any(1).nonzero(), m0.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill = m0.sum().item() / box.item()
        expected = {"circle": (0.68, 0.88), "square": (0.9, 1.01), "triangle": (0.4, 0.62)}[shape]
        assert expected[0] <= fill <= expected[1], (label, shape, fill)


def test_main_object_is_largest_and_objects_occlude():
    videos, labels, info = render_moving_shapes(24, 4, 32, seed=1, num_distractors=(2, 3), return_params=True)
    active = info["shape"] >= 0
    assert active[:, 0].all() and (active[:, 1:].sum(1) >= 2).all()
    # Main radius range (0.22-0.28) is above every distractor's (0.08-0.14).
    main = info["radius"][:, 0]
    assert (main[:, None] > info["radius"][:, 1:].masked_fill(~active[:, 1:], 0)).all()
    assert sorted(info["depth"][0].tolist()) == list(range(info["depth"].shape[1]))


def test_backgrounds_plain_vs_textured():
    def bg_colours(background: str) -> float:
        v, _ = render_moving_shapes(12, 1, 32, seed=2, background=background, num_distractors=(0, 0))
        corners = v[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]].float()  # [N, 4, 3]
        return corners.std(1).mean().item()

    assert bg_colours("plain") < 3.0 < bg_colours("textured")
    mixed, _ = render_moving_shapes(4, 1, 32, seed=2, background="mixed")
    assert mixed.shape == (4, 1, 32, 32, 3)


def test_shapes_invalid_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        render_moving_shapes(2, 2, 16, num_classes=13)
    with pytest.raises(ValueError, match="background"):
        render_moving_shapes(2, 2, 16, background="stripy")
    with pytest.raises(ValueError, match="num_distractors"):
        render_moving_shapes(2, 2, 16, num_distractors=(3, 1))


def test_shapes_render_fast_on_one_core():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        videos, _ = render_moving_shapes(256, 17, 32, seed=0)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    assert videos.shape == (256, 17, 32, 32, 3)
    assert elapsed < 10.0


# ---------------------------------------------------------------------------
# audio
# ---------------------------------------------------------------------------

SR = 16000


@pytest.fixture(scope="module")
def sounds():
    return render_synthetic_audio(40, 1.0, SR, seed=5)


def test_audio_shapes_range_and_balance(sounds):
    waves, labels, names = sounds
    assert waves.shape == (40, SR) and waves.dtype == torch.float32
    assert labels.dtype == torch.long and names == list(AUDIO_CLASSES) and len(names) >= 5
    assert torch.bincount(labels).tolist() == [8] * 5
    peaks = waves.abs().amax(1)
    assert (peaks < 1.0).all() and (peaks >= 0.49).all()
    assert torch.isfinite(waves).all()


def test_audio_determinism(sounds):
    waves, labels, _ = render_synthetic_audio(40, 1.0, SR, seed=5)
    assert torch.equal(waves, sounds[0]) and torch.equal(labels, sounds[1])
    assert not torch.equal(render_synthetic_audio(40, 1.0, SR, seed=6)[0], waves)
    prefix, _, _ = render_synthetic_audio(7, 1.0, SR, seed=5)
    assert torch.equal(prefix, waves[:7])
    _, few, names = render_synthetic_audio(9, 0.25, 8000, seed=0, num_classes=3)
    assert set(few.tolist()) == {0, 1, 2} and names == ["tone", "chord", "chirp"]


def _features(x: torch.Tensor) -> dict:
    """Class-revealing measurements of a 1 s clip."""
    # Dominant frequency over time: its range (octaves) and how monotonic it is (|r| ~ 1 for a sweep).
    spec = torch.stft(x, 512, 128, window=torch.hann_window(512), return_complex=True).abs()
    energy = spec.pow(2).sum(0)
    dominant = torch.log2((spec[:, energy > 0.05 * energy.max()].argmax(0).float() * SR / 512).clamp_min(1))
    steps = torch.arange(len(dominant), dtype=torch.float32)
    r = torch.corrcoef(torch.stack([steps, dominant]))[0, 1].item() if dominant.std() > 0 else 0.0
    # Fraction of near-silent 4 ms frames between the first and last loud one (gaps between clicks).
    frames = x[: len(x) // 64 * 64].view(-1, 64).pow(2).mean(1)
    loud = (frames > 0.1 * frames.max()).nonzero().view(-1)
    silent = (frames[loud.min() : loud.max() + 1] < 0.01 * frames.max()).float().mean().item()
    # 1 Hz spectrum: its peaks (partials) and how many bins carry energy (bandwidth).
    mag = torch.fft.rfft(x.double()).abs()
    mag = torch.nn.functional.avg_pool1d(mag.view(1, 1, -1), 5, 1, 2).view(-1)
    is_peak = (mag[1:-1] > mag[:-2]) & (mag[1:-1] >= mag[2:]) & (mag[1:-1] > 0.2 * mag.max())
    peaks: list[float] = []
    for f in (is_peak.nonzero().view(-1) + 1).tolist():
        if not peaks or f - peaks[-1] >= 0.03 * f:  # merge the split top of one vibrato-smeared partial
            peaks.append(float(f))
    return {"sweep": (dominant.max() - dominant.min()).item(), "r": r, "silent": silent, "peaks": peaks,
            "bandwidth": int((mag > 0.1 * mag.max()).sum())}


def test_audio_labels_follow_their_class(sounds):
    waves, labels, names = sounds
    for x, label in zip(waves, labels.tolist()):
        name, f = names[label], _features(x)
        if name in ("tone", "chord"):
            assert f["silent"] < 0.2 and f["bandwidth"] < 300, (name, f)
            ratios = [p / f["peaks"][0] for p in f["peaks"]]
            harmonic = all(abs(q - round(q)) < 0.04 for q in ratios)
            # A tone's strong partials are harmonics of its lowest one; a chord's thirds/fifths are not.
            assert harmonic == (name == "tone"), (name, f["peaks"])
            if name == "tone":
                assert f["sweep"] < 0.2, (name, f)
        elif name == "chirp":
            assert f["sweep"] >= 0.9 and abs(f["r"]) > 0.95, (name, f)
        elif name == "clicks":
            assert f["silent"] > 0.6, (name, f)
        else:
            assert name == "noise_burst"
            assert f["silent"] < 0.2 and abs(f["r"]) < 0.5 and f["bandwidth"] > 1000, (name, f)


def test_audio_invalid_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        render_synthetic_audio(2, 0.1, SR, num_classes=9)
    with pytest.raises(ValueError):
        render_synthetic_audio(2, 0.0, SR)
