"""Template captions for the synthetic media, built from the renderers' own parameters (no network).

Video / image captions describe a moving-shapes clip from `synthetic_shapes.clip_params(...)`:
every object is named by size ("large" = the main object, "small" = a distractor), colour word,
shape, and either its motion (video) or its position in the frame (image), over a background
kind. Audio descriptions describe a clip from `synthetic_audio.audio_params(...)`.

    video_caption(p, 0)  -> "a large red circle moves slowly from left to right and a small blue
                             square moves quickly upward while rotating, over a striped background"
    image_caption(p, 3)  -> "a large red circle in the top left and a small blue square in the centre,
                             on a striped background"
    audio_description(a, 0) -> "a chirp rising from 300 to 900 hertz, lasting 0.6 seconds"

`caption_fields(caption)` parses any caption made here back into its fields; it returns exactly
`video_fields(p)`, `image_fields(p, frame)` or `audio_fields(a)` for every template, so a generated
caption can be scored field by field against the ground truth.

Conventions: image coordinates (+y points down, so "upward" means vy < 0); directions are the
initial ones (a bounce flips a velocity component later); numbers 0-10 are spelled as words and
larger ones as digits; frequencies are rounded to 10 Hz below 1000 Hz and to 100 Hz above;
durations to 0.1 s; spelling is British ("colour", "grey", "centre").
"""

from __future__ import annotations

import colorsys
import math
import re
from typing import Any, Sequence

import numpy as np

__all__ = [
    "AUDIO_TEMPLATES",
    "BACKGROUND_WORDS",
    "CAPTION_TEMPLATES",
    "CHORD_QUALITIES",
    "COLOUR_NAMES",
    "DIRECTIONS",
    "IMAGE_TEMPLATES",
    "NOTE_NAMES",
    "POSITIONS",
    "audio_description",
    "audio_fields",
    "caption_fields",
    "colour_name",
    "describe_motion",
    "format_number",
    "image_caption",
    "image_fields",
    "motion_fields",
    "note_name",
    "position_name",
    "round_frequency",
    "video_caption",
    "video_fields",
]

CAPTION_TEMPLATES = 5
IMAGE_TEMPLATES = 4
AUDIO_TEMPLATES = 3

# ---------------------------------------------------------------------------
# colours
# ---------------------------------------------------------------------------

COLOUR_NAMES = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink",
                "white", "grey", "black", "brown")
# Prototypes (hue in degrees, saturation, value) of each word: a few shades per hue so that light,
# full and dark versions of a hue each have a nearby prototype.
_COLOUR_PROTOTYPES = (
    ("red", (0.0, 1.0, 1.0)), ("red", (0.0, 0.8, 0.6)), ("red", (355.0, 0.75, 0.85)),
    ("orange", (30.0, 1.0, 1.0)), ("orange", (30.0, 0.6, 1.0)),
    ("yellow", (55.0, 1.0, 1.0)), ("yellow", (55.0, 0.5, 1.0)), ("yellow", (55.0, 1.0, 0.65)),
    ("green", (120.0, 1.0, 1.0)), ("green", (120.0, 0.5, 1.0)), ("green", (120.0, 1.0, 0.55)),
    ("green", (120.0, 0.5, 0.6)), ("green", (90.0, 1.0, 0.9)),
    ("cyan", (180.0, 1.0, 1.0)), ("cyan", (180.0, 0.5, 1.0)), ("cyan", (180.0, 1.0, 0.55)),
    ("blue", (225.0, 1.0, 1.0)), ("blue", (220.0, 0.5, 1.0)), ("blue", (230.0, 1.0, 0.55)),
    ("blue", (230.0, 0.7, 0.3)),
    ("purple", (275.0, 1.0, 1.0)), ("purple", (275.0, 0.5, 1.0)), ("purple", (275.0, 1.0, 0.55)),
    ("purple", (300.0, 1.0, 0.5)),
    ("pink", (330.0, 0.6, 1.0)), ("pink", (345.0, 0.4, 1.0)), ("pink", (320.0, 1.0, 1.0)),
    ("white", (0.0, 0.0, 1.0)),
    ("grey", (0.0, 0.0, 0.5)), ("grey", (0.0, 0.0, 0.75)),
    ("black", (0.0, 0.0, 0.0)),
    ("brown", (25.0, 0.8, 0.45)), ("brown", (30.0, 0.6, 0.6)), ("brown", (20.0, 0.7, 0.3)),
)


def _cone(h: float, s: float, v: float) -> np.ndarray:
    """HSV (h in turns) as a point of the HSV cone: chroma s*v around the hue circle, height v."""
    return np.array([s * v * math.cos(2 * math.pi * h), s * v * math.sin(2 * math.pi * h), v])


_PROTOTYPE_POINTS = np.stack([_cone(h / 360.0, s, v) for _, (h, s, v) in _COLOUR_PROTOTYPES])
_PROTOTYPE_WORDS = tuple(word for word, _ in _COLOUR_PROTOTYPES)


def colour_name(colour: Any, space: str = "rgb") -> str:
    """Basic colour word (one of COLOUR_NAMES) nearest to an RGB or HSV colour.

    colour: 3 numbers (list, numpy array or tensor). Floats are in [0, 1] (HSV hue in turns);
    an integer array / tensor (e.g. uint8 pixels) is read as 0-255 RGB. The word of the nearest
    prototype shade (a few per word) in the HSV cone wins (ties go to the earlier prototype), so
    the result is deterministic.
    """
    arr = np.asarray(colour.detach().cpu() if hasattr(colour, "detach") else colour)
    if arr.shape != (3,):
        raise ValueError(f"colour must have 3 components, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        if space != "rgb":
            raise ValueError("integer colours must be 0-255 RGB")
        arr = arr.astype(np.float64) / 255.0
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError(f"colour components must be in [0, 1], got {arr.tolist()}")
    if space == "rgb":
        h, s, v = colorsys.rgb_to_hsv(*arr)
    elif space == "hsv":
        h, s, v = arr
    else:
        raise ValueError(f"space must be 'rgb' or 'hsv', got {space!r}")
    d = np.linalg.norm(_PROTOTYPE_POINTS - _cone(h, s, v), axis=1)
    return _PROTOTYPE_WORDS[int(np.argmin(d))]


# ---------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_NUM_RE = r"(\d+(?:\.\d+)?|" + "|".join(_NUMBER_WORDS) + r")"


def format_number(x: float) -> str:
    """Whole numbers 0-10 as words, other whole numbers as digits, anything else with one decimal."""
    if float(x) == int(x):
        n = int(x)
        return _NUMBER_WORDS[n] if 0 <= n <= 10 else str(n)
    return f"{x:.1f}"


def _parse_number(text: str) -> float:
    return float(_NUMBER_WORDS.index(text)) if text in _NUMBER_WORDS else float(text)


def round_frequency(hz: float) -> int:
    """Frequencies as said aloud: to the nearest 10 Hz below 1000 Hz, to the nearest 100 Hz above."""
    step = 10 if hz < 995 else 100
    return int(step * round(hz / step))


def _round_seconds(s: float) -> float:
    return max(round(float(s), 1), 0.1)


def _seconds_text(s: float) -> str:
    return f"{format_number(s)} second" + ("" if s == 1.0 else "s")


# ---------------------------------------------------------------------------
# motion and position
# ---------------------------------------------------------------------------

DIRECTIONS = ("from left to right", "diagonally up and to the right", "upward", "diagonally up and to the left",
              "from right to left", "diagonally down and to the left", "downward",
              "diagonally down and to the right")  # counter-clockwise from +x, 45 degree sectors
STILL = "still"
SPEED_WORDS = ("slowly", "quickly")
_SLOW_FAST_SPLIT = 1.25  # px / frame at 32 px: between the renderer's slow (0.5-0.9) and fast (1.6-2.4)
_STILL_SPEED = 0.05
_VISIBLE_SPIN = 0.02  # rad / frame


def motion_fields(vel: Sequence[float], spin: float = 0.0, bounces: bool = False, size: int = 32,
                  rotation_visible: bool = True) -> dict:
    """Motion words of one object: {"speed", "direction", "rotating", "bouncing"}.

    vel: (vx, vy) in px per frame (+y down). Speeds are compared at the 32 px scale (divided by
    size / 32): below 0.05 the object stands still (speed None, direction "still"), below 1.25 it
    moves "slowly", else "quickly". The direction is the nearest of the 8 compass sectors.
    rotating: |spin| >= 0.02 rad / frame and `rotation_visible` (a spinning circle looks still).
    """
    vx, vy = float(vel[0]), float(vel[1])
    speed = math.hypot(vx, vy) * 32.0 / size
    rotating = bool(rotation_visible and abs(float(spin)) >= _VISIBLE_SPIN)
    if speed < _STILL_SPEED:
        return {"speed": None, "direction": STILL, "rotating": rotating, "bouncing": False}
    angle = math.atan2(-vy, vx)  # counter-clockwise with y up
    sector = int(round(angle / (math.pi / 4))) % 8
    return {"speed": SPEED_WORDS[speed >= _SLOW_FAST_SPLIT], "direction": DIRECTIONS[sector],
            "rotating": rotating, "bouncing": bool(bounces)}


def _motion_phrase(m: dict, form: str) -> str:
    if form not in ("verb", "gerund", "bare"):
        raise ValueError(f"form must be 'verb', 'gerund' or 'bare', got {form!r}")
    if m["direction"] == STILL:
        base = {"verb": "stands still", "gerund": "standing still", "bare": "still"}[form]
    else:
        verb = {"verb": "moves ", "gerund": "moving ", "bare": ""}[form]
        base = f"{verb}{m['speed']} {m['direction']}"
    if form == "bare":
        return base + (", rotating" if m["rotating"] else "") + (", bouncing" if m["bouncing"] else "")
    if m["rotating"]:
        base += " while rotating"
    if m["bouncing"]:
        base += " and " + ("bounces" if form == "verb" else "bouncing") + " off the edges"
    return base


def describe_motion(vel: Sequence[float], spin: float = 0.0, bounces: bool = False, size: int = 32,
                    rotation_visible: bool = True, form: str = "bare") -> str:
    """Motion as words, e.g. "slowly from left to right", "quickly upward, rotating, bouncing", "still".

    form: "bare" (as above), "verb" ("moves slowly from left to right while rotating and bounces
    off the edges", "stands still") or "gerund" ("moving ...", "standing still").
    """
    return _motion_phrase(motion_fields(vel, spin, bounces, size, rotation_visible), form)


POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
_POSITION_PHRASES = {"top left": "in the top left", "top": "at the top", "top right": "in the top right",
                     "left": "on the left", "centre": "in the centre", "right": "on the right",
                     "bottom left": "in the bottom left", "bottom": "at the bottom",
                     "bottom right": "in the bottom right"}


def position_name(x: float, y: float, size: int) -> str:
    """Cell of a 3 x 3 grid holding the point (x, y) px of a size x size frame, e.g. "top left"."""
    col = min(max(int(3 * float(x) / size), 0), 2)
    row = min(max(int(3 * float(y) / size), 0), 2)
    return POSITIONS[3 * row + col]


# ---------------------------------------------------------------------------
# shapes: fields from renderer parameters
# ---------------------------------------------------------------------------

SHAPE_WORDS = ("circle", "square", "triangle")  # = synthetic_shapes.SHAPES
BACKGROUND_WORDS = {"plain": "plain", "gradient": "gradient", "stripes": "striped", "noise": "mottled",
                    "checker": "checkered"}
_LARGE_RADIUS = 0.18  # fraction of the frame: main objects are 0.22-0.28, distractors 0.08-0.14
# Radii of the circles inscribed in / circumscribed about each shape, relative to `radius` (see
# synthetic_shapes: square half side 0.85, triangle circumradius 1.3).
_INNER_RADIUS = (1.0, 0.85, 0.65)
_OUTER_RADIUS = (1.0, 0.85 * math.sqrt(2.0), 1.3)


ATTRIBUTES = {"colour": COLOUR_NAMES, "shape": SHAPE_WORDS, "background": tuple(BACKGROUND_WORDS)}


def main_attributes(params: dict) -> dict[str, str]:
    """The main object's colour and shape and the background of a clip (`synthetic_shapes.clip_params`):
    {"colour", "shape", "background"}, each one of `ATTRIBUTES`' words."""
    words = _object_words(params, 0)
    return {"colour": words["colour"], "shape": words["shape"], "background": _background(params)}


def attribute_label(params: dict) -> int:
    """`main_attributes` as one mixed-radix class: (colour * 3 + shape) * 5 + background, over `ATTRIBUTES`
    in order. A classifier with one head per attribute reads it back with `split_attribute_label`."""
    attrs = main_attributes(params)
    label = 0
    for name, words in ATTRIBUTES.items():
        label = label * len(words) + words.index(attrs[name])
    return label


def attribute_names() -> list[str]:
    """Class names of `attribute_label` in label order ("red circle plain", ...)."""
    names = [""]
    for words in ATTRIBUTES.values():
        names = [f"{n} {w}".strip() for n in names for w in words]
    return names


def split_attribute_label(label: Any, sizes: Sequence[int]) -> list:
    """A mixed-radix label (int or int tensor) -> one value per attribute of the given sizes."""
    out = []
    for size in reversed(list(sizes)):
        out.append(label % size)
        label = label // size
    return out[::-1]


def _background(params: dict) -> str:
    bg = params.get("background")
    if bg is None:  # a raw parameter dict: derive from the texture index
        bg = ("gradient", "stripes", "noise", "checker")[params["texture"]] if params["texture"] >= 0 else "plain"
    if bg not in BACKGROUND_WORDS:
        raise ValueError(f"unknown background {bg!r}; expected one of {tuple(BACKGROUND_WORDS)}")
    return bg


def _active(params: dict) -> list[int]:
    return [k for k, s in enumerate(np.asarray(params["shape"]).tolist()) if s >= 0]


def _bounds(params: dict, k: int) -> tuple[float, float]:
    size = float(params["size"])
    b = float(np.asarray(params["bound"])[k])
    return b, max(size - b, b)


def _bounces(params: dict, k: int) -> bool:
    """Whether object k reaches a wall within the clip's frames (its path is then reflected)."""
    frames = int(params.get("num_frames", 1))
    lo, hi = _bounds(params, k)
    p0, v = np.asarray(params["pos"][k], dtype=np.float64), np.asarray(params["vel"][k], dtype=np.float64)
    end = p0 + v * (frames - 1)
    return bool(np.any(np.minimum(p0, end) < lo) or np.any(np.maximum(p0, end) > hi))


def _center(params: dict, k: int, frame: int) -> np.ndarray:
    """Centre (x, y) of object k at `frame`, reflected off the walls as the renderer does."""
    lo, hi = _bounds(params, k)
    span = max(hi - lo, 1e-6)
    p0, v = np.asarray(params["pos"][k], dtype=np.float64), np.asarray(params["vel"][k], dtype=np.float64)
    q = np.remainder(p0 - lo + v * frame, 2 * span)
    return lo + np.where(q <= span, q, 2 * span - q)


def _object_words(params: dict, k: int) -> dict:
    shape = int(np.asarray(params["shape"])[k])
    rel = float(np.asarray(params["radius"])[k]) / float(params["size"])
    return {"size": "large" if rel >= _LARGE_RADIUS else "small",
            "colour": colour_name(np.clip(np.asarray(params["color"][k], dtype=np.float64), 0.0, 1.0)),
            "shape": SHAPE_WORDS[shape]}


def video_fields(params: dict) -> dict:
    """Ground-truth caption fields of a clip (a dict from `synthetic_shapes.clip_params`).

    {"modality": "video", "background": "plain" | "gradient" | "stripes" | "noise" | "checker",
     "objects": [{"size", "colour", "shape", "speed", "direction", "rotating", "bouncing"}, ...]}
    with the main object first, then the distractors in slot order. "bouncing" needs the dict's
    "num_frames" (clip_params stores it).
    """
    size = int(params["size"])
    objects = []
    for k in _active(params):
        shape = int(np.asarray(params["shape"])[k])
        m = motion_fields(params["vel"][k], float(np.asarray(params["spin"])[k]), _bounces(params, k), size,
                          rotation_visible=shape != 0)
        objects.append({**_object_words(params, k), **m})
    return {"modality": "video", "background": _background(params), "objects": objects}


def _covered(params: dict, k: int, frame: int) -> bool:
    """Whether object k is certainly hidden at `frame` behind one object in front of it."""
    depth = np.asarray(params["depth"])
    shape, radius = np.asarray(params["shape"]), np.asarray(params["radius"], dtype=np.float64)
    ck, outer_k = _center(params, k, frame), _OUTER_RADIUS[int(shape[k])] * float(radius[k])
    for j in _active(params):
        if depth[j] > depth[k]:
            inner = _INNER_RADIUS[int(shape[j])] * float(radius[j])
            if float(np.linalg.norm(_center(params, j, frame) - ck)) + outer_k <= inner:
                return True
    return False


def image_fields(params: dict, frame: int = 0) -> dict:
    """Ground-truth caption fields of one frame: {"modality": "image", "background",
    "objects": [{"size", "colour", "shape", "position"}, ...]}; objects hidden entirely behind
    another object are left out."""
    if not 0 <= int(frame) < int(params.get("num_frames", frame + 1)):
        raise ValueError(f"frame must be in [0, {int(params['num_frames']) - 1}], got {frame}")
    size = int(params["size"])
    objects = []
    for k in _active(params):
        if _covered(params, k, frame):
            continue
        x, y = _center(params, k, frame)
        objects.append({**_object_words(params, k), "position": position_name(x, y, size)})
    return {"modality": "image", "background": _background(params), "objects": objects}


# ---------------------------------------------------------------------------
# shapes: captions
# ---------------------------------------------------------------------------

def _check_template(template: int, count: int) -> int:
    if isinstance(template, bool) or not isinstance(template, (int, np.integer)) or not 0 <= template < count:
        raise ValueError(f"template must be an int in [0, {count - 1}], got {template!r}")
    return int(template)


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _noun(o: dict, article: bool = True) -> str:
    words = f"{o['size']} {o['colour']} {o['shape']}"
    return (("an " if words[0] in "aeiou" else "a ") + words) if article else words


def _bg_phrase(bg: str) -> str:
    return f"a {BACKGROUND_WORDS[bg]} background"


def video_caption(params: dict, template: int = 0) -> str:
    """Caption of a clip (a dict from `synthetic_shapes.clip_params`); templates 0 .. CAPTION_TEMPLATES - 1:

    0 "a large red circle moves slowly from left to right and a small blue square moves quickly
       upward while rotating, over a striped background"
    1 "on a striped background, a large red circle moves ... and a small blue square moves ..."
    2 "a video of a large red circle moving slowly from left to right and ..., on a striped background"
    3 "striped background; large red circle, slowly from left to right; small blue square, quickly upward, rotating"
    4 "in this clip a large red circle moves ..., with a striped background behind"
    """
    t = _check_template(template, CAPTION_TEMPLATES)
    f = video_fields(params)
    objs, bg = f["objects"], f["background"]
    if t == 3:
        parts = [f"{BACKGROUND_WORDS[bg]} background"]
        parts += [f"{_noun(o, article=False)}, {_motion_phrase(o, 'bare')}" for o in objs]
        return "; ".join(parts)
    form = "gerund" if t == 2 else "verb"
    body = _join([f"{_noun(o)} {_motion_phrase(o, form)}" for o in objs])
    if t == 0:
        return f"{body}, over {_bg_phrase(bg)}"
    if t == 1:
        return f"on {_bg_phrase(bg)}, {body}"
    if t == 2:
        return f"a video of {body}, on {_bg_phrase(bg)}"
    return f"in this clip {body}, with {_bg_phrase(bg)} behind"


def image_caption(params: dict, frame: int = 0, template: int = 0) -> str:
    """Caption of frame `frame` of a clip (no motion words); templates 0 .. IMAGE_TEMPLATES - 1:

    0 "a large red circle in the top left and a small blue square in the centre, on a striped background"
    1 "an image of a large red circle in the top left and ..., over a striped background"
    2 "striped background; large red circle, top left; small blue square, centre"
    3 "on a striped background, a large red circle in the top left and ..."
    """
    t = _check_template(template, IMAGE_TEMPLATES)
    f = image_fields(params, frame)
    objs, bg = f["objects"], f["background"]
    if t == 2:
        return "; ".join([f"{BACKGROUND_WORDS[bg]} background"]
                         + [f"{_noun(o, article=False)}, {o['position']}" for o in objs])
    body = _join([f"{_noun(o)} {_POSITION_PHRASES[o['position']]}" for o in objs])
    if t == 0:
        return f"{body}, on {_bg_phrase(bg)}"
    if t == 1:
        return f"an image of {body}, over {_bg_phrase(bg)}"
    return f"on {_bg_phrase(bg)}, {body}"


# ---------------------------------------------------------------------------
# audio
# ---------------------------------------------------------------------------

NOTE_NAMES = ("C", "C sharp", "D", "D sharp", "E", "F", "F sharp", "G", "G sharp", "A", "A sharp", "B")
# (third in semitones, extra note in semitones or None) -> quality words
CHORD_QUALITIES = {
    (4, None): "major",
    (3, None): "minor",
    (4, 10): "dominant seventh",
    (4, 11): "major seventh",
    (3, 10): "minor seventh",
    (3, 11): "minor major seventh",
    (4, 12): "major with an added octave",
    (3, 12): "minor with an added octave",
}


def note_name(hz: float) -> str:
    """Pitch class of the equal-tempered note nearest to `hz` (A4 = 440 Hz), e.g. "C sharp"."""
    semitones = int(round(12.0 * math.log2(float(hz) / 440.0)))
    return NOTE_NAMES[(semitones + 9) % 12]


def audio_fields(params: dict) -> dict:
    """Ground-truth description fields of a sound (a dict from `synthetic_audio.audio_params`).

    Always {"modality": "audio", "sound": kind, "duration": note length in s (onset to release,
    rounded to 0.1)} plus, by kind: tone {"frequency"}; chord {"root", "quality"}; chirp
    {"direction", "start", "end"}; clicks {"rate"} (per second, rounded); noise_burst {"centre",
    "width"} (Hz, whole octaves). Frequencies are rounded with `round_frequency`.
    """
    kind = params["kind"]
    f: dict[str, Any] = {"modality": "audio", "sound": kind,
                         "duration": _round_seconds(params["release"] - params["onset"])}
    if kind == "tone":
        f["frequency"] = round_frequency(params["frequency"])
    elif kind == "chord":
        f["root"] = note_name(params["root"])
        f["quality"] = CHORD_QUALITIES[(int(params["third"]), params["extra"])]
    elif kind == "chirp":
        f0, f1 = params["start_frequency"], params["end_frequency"]
        f.update(direction="rising" if f1 > f0 else "falling", start=round_frequency(f0), end=round_frequency(f1))
    elif kind == "clicks":
        f["rate"] = max(int(round(params["rate"])), 1)
    elif kind == "noise_burst":
        f.update(centre=round_frequency(params["centre"]), width=max(int(round(params["width_octaves"])), 1))
    else:
        raise ValueError(f"unknown sound kind {kind!r}")
    return f


def _sound_phrase(f: dict, variant: int) -> str:
    kind = f["sound"]
    if kind == "tone":
        return (f"a steady tone at {f['frequency']} hertz", f"a tone of {f['frequency']} hertz")[variant]
    if kind == "chord":
        article = "an" if f["root"][0] in "AEF" else "a"
        chord = f"{f['root']} {f['quality']} chord"
        if f["quality"].endswith(" octave"):  # "a C major chord with an added octave"
            chord = f"{f['root']} {f['quality'].split(' with ')[0]} chord with an added octave"
        return (f"{article} {chord}", f"the notes of {article} {chord}")[variant]
    if kind == "chirp":
        return (f"a chirp {f['direction']} from {f['start']} to {f['end']} hertz",
                f"a {f['direction']} chirp that sweeps from {f['start']} to {f['end']} hertz")[variant]
    if kind == "clicks":
        return (f"clicks at {format_number(f['rate'])} per second",
                f"a train of clicks, {format_number(f['rate'])} per second")[variant]
    width = f"{format_number(f['width'])} octave" + ("" if f["width"] == 1 else "s") + " wide"
    return (f"a burst of noise around {f['centre']} hertz, {width}",
            f"a band of noise {width} centred on {f['centre']} hertz")[variant]


def audio_description(params: dict, template: int = 0) -> str:
    """Description of a sound (a dict from `synthetic_audio.audio_params`); templates 0 .. AUDIO_TEMPLATES - 1:

    0 "a chirp rising from 300 to 900 hertz, lasting 0.6 seconds"
    1 "the sound of a rising chirp that sweeps from 300 to 900 hertz for 0.6 seconds"
    2 "0.6 seconds of a chirp rising from 300 to 900 hertz"
    (likewise "a steady tone at 440 hertz", "a C major chord", "clicks at four per second",
    "a burst of noise around 2000 hertz, two octaves wide").
    """
    t = _check_template(template, AUDIO_TEMPLATES)
    f = audio_fields(params)
    dur = _seconds_text(f["duration"])
    if t == 0:
        return f"{_sound_phrase(f, 0)}, lasting {dur}"
    if t == 1:
        return f"the sound of {_sound_phrase(f, 1)} for {dur}"
    return f"{dur} of {_sound_phrase(f, 0)}"


# ---------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------

def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJECT_RE = re.compile(r"\b(?:an? )?(large|small) (" + _alternation(COLOUR_NAMES) + r") ("
                        + _alternation(SHAPE_WORDS) + r")\b")
_DIRECTION_RE = re.compile(r"\b(" + _alternation(DIRECTIONS) + r")\b")
_POSITION_RE = re.compile(r"\b(" + _alternation(POSITIONS) + r")\b")
_BACKGROUND_RE = re.compile(r"\b(" + _alternation(BACKGROUND_WORDS.values()) + r") background\b")
_CHORD_RE = re.compile(r"\b(" + _alternation(NOTE_NAMES) + r") (major|minor|dominant)((?: major)? seventh)?"
                       r" chord( with an added octave)?")


def _parse_scene(caption: str) -> dict | None:
    text = caption.lower()
    matches = list(_OBJECT_RE.finditer(text))
    if not matches:
        return None
    bg = _BACKGROUND_RE.search(text)
    background = None
    if bg is not None:
        background = {v: k for k, v in BACKGROUND_WORDS.items()}[bg.group(1)]
        text = text[: bg.start()] + " " * (bg.end() - bg.start()) + text[bg.end():]
    objects, moving = [], False
    for i, m in enumerate(matches):
        seg = text[m.end(): matches[i + 1].start() if i + 1 < len(matches) else len(text)]
        o: dict[str, Any] = {"size": m.group(1), "colour": m.group(2), "shape": m.group(3)}
        d = _DIRECTION_RE.search(seg)
        if d is not None or re.search(r"\bstill\b", seg):
            moving = True
            speed = re.search(r"\b(slowly|quickly)\b", seg)
            o.update(speed=speed.group(1) if speed else None, direction=d.group(1) if d else STILL,
                     rotating="rotating" in seg, bouncing="bounc" in seg)
        else:
            p = _POSITION_RE.search(seg)
            o["position"] = p.group(1) if p else None
        objects.append(o)
    return {"modality": "video" if moving else "image", "background": background, "objects": objects}


def _parse_audio(caption: str) -> dict:
    text = caption.lower()
    kinds = [("chirp", "chirp"), ("chord", "chord"), ("click", "clicks"), ("noise", "noise_burst"), ("tone", "tone")]
    kind = next((k for word, k in kinds if word in text), None)
    f: dict[str, Any] = {"modality": "audio", "sound": kind}
    dur = re.search(r"\b" + _NUM_RE + r" seconds?\b", text)
    f["duration"] = _parse_number(dur.group(1)) if dur else None
    hz = [int(x) for x in re.findall(r"\b(\d+) hertz\b", text)]
    if kind == "tone":
        f["frequency"] = hz[0] if hz else None
    elif kind == "chord":
        m = _CHORD_RE.search(caption)
        if m is None:
            f.update(root=None, quality=None)
        else:
            quality = m.group(2) + (m.group(3) or "") + (" with an added octave" if m.group(4) else "")
            f.update(root=m.group(1), quality=quality)
    elif kind == "chirp":
        m = re.search(r"\bfrom (\d+) to (\d+) hertz\b", text)
        d = re.search(r"\b(rising|falling)\b", text)
        f.update(direction=d.group(1) if d else None, start=int(m.group(1)) if m else None,
                 end=int(m.group(2)) if m else None)
    elif kind == "clicks":
        m = re.search(r"\b" + _NUM_RE + r" per second\b", text)
        f["rate"] = int(_parse_number(m.group(1))) if m else None
    elif kind == "noise_burst":
        m = re.search(r"\b" + _NUM_RE + r" octaves? wide\b", text)
        f.update(centre=hz[0] if hz else None, width=int(_parse_number(m.group(1))) if m else None)
    return f


def caption_fields(caption: str) -> dict:
    """Parse a caption (any template of video_caption / image_caption / audio_description) back into
    its fields: the same dict as video_fields / image_fields / audio_fields of the captioned item.
    Fields that cannot be found in free text are None (a caption with no shape words is read as audio)."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    scene = _parse_scene(caption)
    return scene if scene is not None else _parse_audio(caption)


# ----------------------------------------------------------------------------- verifiable scoring

VISUAL_FIELDS = ("colour", "shape", "background", "direction")


def visual_labels(caption: str) -> dict:
    """The scored fields of an image / video caption: the main (large, else first) object's colour,
    shape and direction, and the background (None where the caption does not say)."""
    f = caption_fields(caption)
    objs = f.get("objects") or []
    o = next((x for x in objs if x.get("size") == "large"), objs[0] if objs else {})
    return {"colour": o.get("colour"), "shape": o.get("shape"), "background": f.get("background"),
            "direction": o.get("direction")}


def caption_hits(medium: str, caption: str, truth: str) -> dict[str, bool]:
    """Per field, whether a generated caption states what the true caption of the same item states.

    image / video: `VISUAL_FIELDS` the truth states; audio: the sound's kind and its duration (within
    0.1 s). A caption that cannot be parsed gets every field wrong. This is the verifier of the
    captioning evaluation (tools/eval_ernie5.py) and of multimodal RL (lit_modules/ernie5_rl.py)."""
    if medium == "audio":
        t, g = caption_fields(truth), caption_fields(caption)
        dur = g.get("duration") is not None and t.get("duration") is not None \
            and abs(g["duration"] - t["duration"]) <= 0.1 + 1e-9
        return {"kind": g.get("sound") is not None and g.get("sound") == t.get("sound"), "duration": bool(dur)}
    if medium not in ("image", "video"):
        raise ValueError(f"medium must be image, video or audio, got {medium!r}")
    t, g = visual_labels(truth), visual_labels(caption)
    return {k: g[k] == t[k] for k in VISUAL_FIELDS if t[k] is not None}


def caption_reward(medium: str, caption: str, truth: str) -> float:
    """The fraction of the true caption's fields the generated caption gets right (0 to 1)."""
    hits = caption_hits(medium, caption, truth)
    return sum(hits.values()) / len(hits) if hits else 0.0
