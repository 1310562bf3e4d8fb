import ast
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import captions as C
from datamodules.synthetic_audio import AUDIO_CLASSES, audio_params, render_synthetic_audio
from datamodules.synthetic_shapes import MOTIONS, SHAPES, clip_params, render_moving_shapes


def _h(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# the renderers are unchanged by the parameter access
# ---------------------------------------------------------------------------

# Hashes computed with the renderers as they were before `clip_params` / `return_params` existed. Only the
# integer outputs are pinned here (float renders can differ in the last bit across CPUs and torch builds; the
# float outputs were checked bit-identical on the machine that made the change).
_SHAPE_HASHES = [
    (dict(num_clips=6, num_frames=5, size=24, seed=3), "71ccab13febc2715", "567eecd2fd1c7d6b", "548bc2c677a04cf0"),
    (dict(num_clips=4, num_frames=3, size=16, seed=0, background="textured", num_distractors=(0, 2)),
     "e7308693a6fff264", "8e2d0c30d038ebc0", "6f01de6164bf21b9"),
    (dict(num_clips=5, num_frames=4, size=20, seed=11, num_classes=4, background="plain"),
     "190cb73b007d4412", "70ee058ad40fa210", "9c67271aa369ca98"),
]
_AUDIO_HASHES = [
    (dict(num_clips=10, seconds=0.25, sample_rate=8000, seed=1), "d92e9591780f2571", "59ecf8375c96ad86"),
    (dict(num_clips=5, seconds=0.5, sample_rate=16000, seed=7, num_classes=3), "501a281d44d50eaf", "12627a407115839a"),
]


@pytest.mark.parametrize("kw,video_hash,label_hash,center_hash", _SHAPE_HASHES)
def test_shapes_renderer_bit_identical(kw, video_hash, label_hash, center_hash):
    videos, labels, info = render_moving_shapes(**kw, return_params=True)
    assert _h(labels) == label_hash
    plain_videos, plain_labels = render_moving_shapes(**kw)
    assert torch.equal(plain_videos, videos) and torch.equal(plain_labels, labels)
    # clip_params returns the renderer's own draws.
    ps = clip_params(**kw)
    assert [p["label"] for p in ps] == labels.tolist()
    assert np.array_equal(np.stack([p["shape"] for p in ps]), info["shape"].numpy())
    assert np.array_equal(np.stack([p["depth"] for p in ps]), info["depth"].numpy())
    assert np.allclose(np.stack([p["radius"] for p in ps]), info["radius"].numpy())
    assert [p["motion"] for p in ps] == info["motion"].tolist()


@pytest.mark.parametrize("kw,wave_hash,label_hash", _AUDIO_HASHES)
def test_audio_renderer_bit_identical(kw, wave_hash, label_hash):
    waves, labels, names = render_synthetic_audio(**kw)
    assert _h(labels) == label_hash
    waves2, labels2, names2, params = render_synthetic_audio(**kw, return_params=True)
    assert torch.equal(waves, waves2) and torch.equal(labels, labels2) and names == names2
    assert [p["label"] for p in params] == labels.tolist()
    assert [p["kind"] for p in params] == [AUDIO_CLASSES[i] for i in labels.tolist()]
    assert audio_params(**kw) == params


def test_captions_module_imports_no_framework():
    tree = ast.parse(Path(C.__file__).read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not mods & {"lightning", "pytorch_lightning", "hydra", "omegaconf"}


# ---------------------------------------------------------------------------
# captions agree with the rendered content
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered():
    kw = dict(num_clips=8, num_frames=4, size=32, seed=5)
    videos, labels, info = render_moving_shapes(**kw, return_params=True)
    return videos, labels, info, clip_params(**kw)


def test_colour_words_match_rendered_pixels(rendered):
    videos, labels, info, ps = rendered
    grid = torch.arange(32, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    checked = 0
    for i, p in enumerate(ps):
        fields = C.caption_fields(C.video_caption(p, 0))
        active = [k for k in range(len(p["shape"])) if p["shape"][k] >= 0]
        assert len(fields["objects"]) == len(active)
        for o, k in zip(fields["objects"], active):
            for f in (0, 3):
                c = info["center"][i, f]
                dist = lambda j: torch.hypot(xx - c[j, 0], yy - c[j, 1])  # noqa: E731
                # Well inside object k (any shape, any rotation) and clear of every object in front.
                mask = dist(k) <= 0.65 * float(p["radius"][k]) - 1.0
                for j in active:
                    if p["depth"][j] > p["depth"][k]:
                        mask &= dist(j) > C._OUTER_RADIUS[int(p["shape"][j])] * float(p["radius"][j]) + 1.0
                if int(mask.sum()) < 2:
                    continue
                pix = videos[i, f][mask].float()
                assert torch.allclose(pix, torch.as_tensor(p["color"][k], dtype=torch.float32) * 255, atol=1.0)
                assert C.colour_name(pix.mean(0) / 255.0) == o["colour"]
                checked += 1
    assert checked >= 12


def test_caption_words_match_labels_and_tracks(rendered):
    videos, labels, info, ps = rendered
    for i, p in enumerate(ps):
        main = C.caption_fields(C.video_caption(p, 1))["objects"][0]
        label = int(labels[i])
        assert main["size"] == "large" and main["shape"] == SHAPES[label // len(MOTIONS)]
        motion = MOTIONS[label % len(MOTIONS)]
        assert main["speed"] == ("quickly" if motion.endswith("fast") else "slowly")
        axis = {"from left to right": "horizontal", "from right to left": "horizontal",
                "upward": "vertical", "downward": "vertical"}[main["direction"]]
        assert motion.startswith(axis)
        step = info["center"][i, 1, 0] - info["center"][i, 0, 0]  # first displacement of the rendered track
        if not C.motion_fields(p["vel"][0], bounces=False)["direction"] == C.motion_fields(step.tolist())["direction"]:
            assert main["bouncing"]  # only a bounce in the first frame can flip it
        for f in range(videos.shape[1]):
            img = C.caption_fields(C.image_caption(p, f, 0))
            x, y = info["center"][i, f, 0].tolist()
            assert img["objects"][0]["position"] == C.position_name(x, y, 32)
            assert "slowly" not in C.image_caption(p, f, 1) and "moves" not in C.image_caption(p, f, 1)


def test_audio_descriptions_match_the_waveforms():
    waves, labels, _, params = render_synthetic_audio(10, 1.0, 16000, seed=2, return_params=True)
    for w, p in zip(waves.numpy().astype(np.float64), params):
        f = C.caption_fields(C.audio_description(p, 0))
        assert f["sound"] == p["kind"]
        sr = p["sample_rate"]
        note = w[int(p["onset"] * sr): int(p["release"] * sr)]
        if p["kind"] == "tone":
            spec = np.abs(np.fft.rfft(note * np.hanning(len(note))))
            peak = np.fft.rfftfreq(len(note), 1 / sr)[np.argmax(spec)]
            assert abs(peak - f["frequency"]) <= 0.03 * f["frequency"] + 5
        elif p["kind"] == "chirp":
            def dominant(x):
                return np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(np.abs(np.fft.rfft(x * np.hanning(len(x)))))]
            n = len(note)
            early, late = dominant(note[: n // 4]), dominant(note[-n // 4:])
            assert (late > early) == (f["direction"] == "rising")
        elif p["kind"] == "clicks":
            in_note = [t for t in p["onsets"] if p["onset"] <= t < p["release"]]
            assert abs(len(in_note) - p["rate"] * (p["release"] - p["onset"])) <= 2
    assert {p["kind"] for p in params} == set(AUDIO_CLASSES)


# ---------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------


def _random_scene(rng: np.random.Generator, size: int) -> dict:
    """A clip parameter dict with arbitrary values (beyond the renderer's ranges)."""
    k = int(rng.integers(1, 6))
    shape = rng.integers(0, 3, k)
    shape[1:][rng.random(k - 1) < 0.2] = -1
    radius = rng.uniform(0.05, 0.3, k) * size
    vel = rng.normal(0, 1.5, (k, 2)) * (rng.random((k, 1)) > 0.15)  # some objects stand still
    return dict(shape=shape, radius=radius, pos=rng.uniform(0, size, (k, 2)), vel=vel, spin=rng.normal(0, 0.1, k),
                color=rng.random((k, 3)), depth=rng.permutation(k), bound=radius * 1.3,
                background=["plain", "gradient", "stripes", "noise", "checker"][int(rng.integers(0, 5))],
                size=size, num_frames=int(rng.integers(1, 40)))


def test_video_and_image_captions_round_trip():
    rng = np.random.default_rng(0)
    scenes = clip_params(150, num_frames=16, size=32, seed=9)
    scenes += clip_params(60, num_frames=30, size=24, seed=4, background="textured", num_distractors=(0, 3))
    scenes += [_random_scene(rng, int(rng.choice([16, 32, 64]))) for _ in range(300)]
    seen = {"direction": set(), "colour": set(), "background": set(), "position": set()}
    for p in scenes:
        want = C.video_fields(p)
        seen["background"].add(want["background"])
        for o in want["objects"]:
            seen["direction"].add(o["direction"])
            seen["colour"].add(o["colour"])
        for t in range(C.CAPTION_TEMPLATES):
            assert C.caption_fields(C.video_caption(p, t)) == want, C.video_caption(p, t)
        frame = int(rng.integers(0, p["num_frames"]))
        want = C.image_fields(p, frame)
        seen["position"].update(o["position"] for o in want["objects"])
        for t in range(C.IMAGE_TEMPLATES):
            assert C.caption_fields(C.image_caption(p, frame, t)) == want, C.image_caption(p, frame, t)
    assert seen["direction"] == set(C.DIRECTIONS) | {"still"}
    assert seen["background"] == set(C.BACKGROUND_WORDS)
    assert seen["position"] == set(C.POSITIONS)
    assert len(seen["colour"]) >= 10


def _random_sound(rng: np.random.Generator) -> dict:
    kind = AUDIO_CLASSES[int(rng.integers(0, 5))]
    onset = rng.uniform(0, 1)
    p = {"kind": kind, "onset": onset, "release": onset + float(rng.choice([rng.uniform(0.0, 12.0), 1.0, 3.02]))}
    f = lambda: float(np.exp(rng.uniform(np.log(50), np.log(9000))))  # noqa: E731
    if kind == "tone":
        p["frequency"] = f()
    elif kind == "chord":
        third, extra = list(C.CHORD_QUALITIES)[int(rng.integers(0, len(C.CHORD_QUALITIES)))]
        p.update(root=f(), third=third, extra=extra)
    elif kind == "chirp":
        p.update(start_frequency=f(), end_frequency=f())
    elif kind == "clicks":
        p["rate"] = rng.uniform(0.6, 30)
    else:
        p.update(centre=f(), width_octaves=rng.uniform(0.3, 4.0))
    return p


def test_audio_descriptions_round_trip():
    rng = np.random.default_rng(1)
    sounds = audio_params(60, 0.5, 16000, seed=3) + audio_params(20, 2.0, 8000, seed=5)
    sounds += [_random_sound(rng) for _ in range(500)]
    qualities = set()
    for p in sounds:
        want = C.audio_fields(p)
        qualities.add(want.get("quality"))
        for t in range(C.AUDIO_TEMPLATES):
            assert C.caption_fields(C.audio_description(p, t)) == want, C.audio_description(p, t)
    assert qualities >= set(C.CHORD_QUALITIES.values())


# ---------------------------------------------------------------------------
# words, numbers and errors
# ---------------------------------------------------------------------------


def test_examples():
    chirp = {"kind": "chirp", "onset": 0.1, "release": 0.7, "start_frequency": 301.0, "end_frequency": 897.0}
    assert C.audio_description(chirp, 0) == "a chirp rising from 300 to 900 hertz, lasting 0.6 seconds"
    clicks = {"kind": "clicks", "onset": 0.0, "release": 1.0, "rate": 4.2}
    assert C.audio_description(clicks, 2) == "one second of clicks at four per second"
    chord = {"kind": "chord", "onset": 0.0, "release": 0.5, "root": 261.6, "third": 4, "extra": None}
    assert C.audio_description(chord, 0) == "a C major chord, lasting 0.5 seconds"
    chord.update(root=440.0, third=3, extra=12)
    assert C.audio_description(chord, 0) == "an A minor chord with an added octave, lasting 0.5 seconds"
    assert C.describe_motion((1.0, 0.0)) == "slowly from left to right"
    assert C.describe_motion((0.0, -2.0), spin=0.1, bounces=True, form="verb") == \
        "moves quickly upward while rotating and bounces off the edges"
    assert C.describe_motion((1.0, 1.0), form="gerund") == "moving quickly diagonally down and to the right"
    assert C.describe_motion((0.0, 0.0), spin=0.1, rotation_visible=False) == "still"
    assert C.describe_motion((2.0, 0.0), size=64) == "slowly from left to right"  # speeds scale with the frame
    assert C.position_name(2, 2, 32) == "top left" and C.position_name(16, 16, 32) == "centre"
    assert [C.format_number(x) for x in (0, 4, 10, 11, 0.5)] == ["zero", "four", "ten", "11", "0.5"]
    assert [C.round_frequency(x) for x in (123.0, 994.0, 996.0, 2449.0)] == [120, 990, 1000, 2400]
    assert C.note_name(261.63) == "C" and C.note_name(277.2) == "C sharp"


def test_colour_names():
    cases = {(1.0, 0.0, 0.0): "red", (1.0, 0.5, 0.0): "orange", (1.0, 1.0, 0.0): "yellow", (0.0, 0.8, 0.0): "green",
             (0.0, 1.0, 1.0): "cyan", (0.0, 0.2, 1.0): "blue", (0.6, 0.1, 0.9): "purple", (1.0, 0.5, 0.75): "pink",
             (1.0, 1.0, 1.0): "white", (0.5, 0.5, 0.5): "grey", (0.0, 0.0, 0.0): "black", (0.5, 0.3, 0.1): "brown"}
    for rgb, word in cases.items():
        assert C.colour_name(rgb) == word
    assert set(cases.values()) == set(C.COLOUR_NAMES)
    assert C.colour_name(np.array([255, 0, 0], dtype=np.uint8)) == "red"
    assert C.colour_name(torch.tensor([0, 0, 255], dtype=torch.uint8)) == "blue"
    assert C.colour_name((0.0, 1.0, 1.0), space="hsv") == "red"
    assert C.colour_name((2 / 3, 1.0, 1.0), space="hsv") == "blue"
    for bad in ((1.2, 0.0, 0.0), (0.1, 0.2), (math.nan, 0, 0)):
        with pytest.raises(ValueError):
            C.colour_name(bad)
    with pytest.raises(ValueError, match="space"):
        C.colour_name((0.1, 0.2, 0.3), space="lab")


def test_bad_template_index_errors():
    scene = clip_params(1, num_frames=3)[0]
    sound = audio_params(1, 0.2, 8000)[0]
    assert (C.CAPTION_TEMPLATES, C.IMAGE_TEMPLATES, C.AUDIO_TEMPLATES) == (5, 4, 3)
    for fn, count in ((lambda t: C.video_caption(scene, t), C.CAPTION_TEMPLATES),
                      (lambda t: C.image_caption(scene, 0, t), C.IMAGE_TEMPLATES),
                      (lambda t: C.audio_description(sound, t), C.AUDIO_TEMPLATES)):
        for bad in (-1, count, 1.0, True, "0"):
            with pytest.raises(ValueError, match=rf"\[0, {count - 1}\]"):
                fn(bad)
    with pytest.raises(ValueError, match="frame"):
        C.image_caption(scene, 3)
    with pytest.raises(TypeError):
        C.caption_fields(None)
