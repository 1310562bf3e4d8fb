"""Deterministic procedural videos of moving, bouncing, occluding coloured shapes.

Each clip shows one *main* object (always the largest) and a few smaller distractors moving over a
plain or textured background. The clip's class is read off the main object:

    label = 4 * shape + motion
    shape:  0 circle, 1 square, 2 triangle (pointing up); the main object never rotates
    motion: 0 horizontal-slow, 1 horizontal-fast, 2 vertical-slow, 3 vertical-fast

"horizontal" means the velocity is within 15 degrees of the x axis (either sign), "vertical" of the
y axis; "slow" is 0.5-0.9 and "fast" 1.6-2.4 pixels per frame at 32 px (scaled with `size`).
Bouncing off a wall flips a velocity component, which keeps both the axis and the speed, so the
class is visible in every part of a clip however long it is. With `num_classes < 12` only labels
`0 .. num_classes - 1` occur (e.g. 4 = circles in the four motion groups). `class_names()` gives
the names ("circle-horizontal-slow", ...). `clip_params(...)` returns the per-clip parameters
(shapes, colours, velocities, background, ...) that the renderer draws for the same arguments.

Distractors (smaller circles, squares and triangles) move in any direction at 0.3-2 px/frame, rotate,
and bounce; all objects are composited in a random per-clip depth order, so objects occlude each
other (the main object too). Backgrounds are dark and low-contrast (plain colour, gradient, drifting
stripes, smooth colour noise or a checkerboard) and objects are bright and saturated.

Every random parameter of clip i comes from a generator seeded with (seed, i), so clip i does not
depend on `num_clips`, and positions are analytic in time, so a longer render extends a shorter
one: `render(n, t)[0][:, :t'] == render(n, t')[0]` for t' <= t. Rasterisation is vectorised torch
over pixels with signed-distance anti-aliasing (no PIL / OpenCV).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "MOTIONS",
    "NUM_SHAPE_CLASSES",
    "SHAPES",
    "class_names",
    "clip_params",
    "render_moving_shapes",
]

SHAPES = ("circle", "square", "triangle")
MOTIONS = ("horizontal-slow", "horizontal-fast", "vertical-slow", "vertical-fast")
NUM_SHAPE_CLASSES = len(SHAPES) * len(MOTIONS)
BACKGROUNDS = ("mixed", "plain", "textured")
_TEXTURES = ("gradient", "stripes", "noise", "checker")

# Speeds in pixels per frame for a 32 px frame; scaled linearly with the frame size.
_SLOW = (0.5, 0.9)
_FAST = (1.6, 2.4)
_AXIS_JITTER = math.radians(15.0)
# Half-extent ("radius") of objects as a fraction of the frame size. Every main size beats every
# distractor in area (the smallest main triangle covers ~0.106 of the frame, the largest distractor ~0.075).
_MAIN_RADIUS = (0.22, 0.28)
_DISTRACTOR_RADIUS = (0.08, 0.14)
# Polygon sizes relative to the radius, chosen so the three shapes look about equally big.
_SQUARE_HALF_SIDE = 0.85
_TRIANGLE_CIRCUMRADIUS = 1.3
_NOISE_GRID = 6


def class_names(num_classes: int = NUM_SHAPE_CLASSES) -> list[str]:
    """Names of labels 0 .. num_classes - 1, e.g. "triangle-vertical-fast"."""
    _check_num_classes(num_classes)
    return [f"{SHAPES[c // len(MOTIONS)]}-{MOTIONS[c % len(MOTIONS)]}" for c in range(num_classes)]


def _check_num_classes(num_classes: int) -> None:
    if not 1 <= num_classes <= NUM_SHAPE_CLASSES:
        raise ValueError(f"num_classes must be in [1, {NUM_SHAPE_CLASSES}], got {num_classes}")


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (all in [0, 1]) to RGB [..., 3]."""
    k = (np.stack([5.0, 3.0, 1.0], -1) + h[..., None] * 6.0) % 6.0
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _balanced_labels(num_clips: int, num_classes: int, seed: int) -> np.ndarray:
    """Each block of num_classes consecutive clips holds every class once (prefix-stable)."""
    labels = np.empty(num_clips, dtype=np.int64)
    for block in range(-(-num_clips // num_classes)):
        perm = np.random.default_rng([seed, 1, block]).permutation(num_classes)
        start = block * num_classes
        labels[start : start + num_classes] = perm[: num_clips - start]
    return labels


def _clip_params(i: int, seed: int, label: int, size: int, max_objects: int,
                 num_distractors: tuple[int, int], background: str) -> dict:
    """All random parameters of clip i (a fixed draw order keeps them identical across calls)."""
    rng = np.random.default_rng([seed, 0, i])
    scale = size / 32.0
    k = max_objects
    shape = np.full(k, -1, dtype=np.int64)
    radius = np.zeros(k)
    pos = np.zeros((k, 2))
    vel = np.zeros((k, 2))
    angle0 = np.zeros(k)
    spin = np.zeros(k)

    # Main object (slot 0).
    main_shape, motion = divmod(label, len(MOTIONS))
    shape[0] = main_shape
    radius[0] = rng.uniform(*_MAIN_RADIUS) * size
    lo, hi = _FAST if motion % 2 else _SLOW
    speed = rng.uniform(lo, hi) * scale
    theta = rng.uniform(-_AXIS_JITTER, _AXIS_JITTER) + (math.pi if rng.random() < 0.5 else 0.0)
    if motion >= 2:
        theta += math.pi / 2
    vel[0] = speed * math.cos(theta), speed * math.sin(theta)
    pos_u = rng.random(2)

    # Distractors (slots 1..): drawn for every slot so the stream does not depend on how many are used.
    n_active = int(rng.integers(num_distractors[0], num_distractors[1] + 1))
    d_shape = rng.integers(0, len(SHAPES), size=k - 1)
    d_radius = rng.uniform(*_DISTRACTOR_RADIUS, size=k - 1) * size
    d_pos_u = rng.random((k - 1, 2))
    d_speed = rng.uniform(0.3, 2.0, size=k - 1) * scale
    d_theta = rng.uniform(0.0, 2 * math.pi, size=k - 1)
    d_angle = rng.uniform(0.0, 2 * math.pi, size=k - 1)
    d_spin = rng.uniform(-0.15, 0.15, size=k - 1)
    shape[1 : 1 + n_active] = d_shape[:n_active]
    radius[1:] = d_radius
    vel[1:, 0] = d_speed * np.cos(d_theta)
    vel[1:, 1] = d_speed * np.sin(d_theta)
    angle0[1:] = d_angle
    spin[1:] = d_spin

    # Bright, saturated objects; dark, low-contrast backgrounds.
    color = _hsv_to_rgb(rng.random(k), rng.uniform(0.55, 1.0, k), rng.uniform(0.75, 1.0, k))
    depth = rng.permutation(k)

    bg_kind = rng.random()
    textured = background == "textured" or (background == "mixed" and bg_kind < 0.5)
    texture = int(rng.integers(0, len(_TEXTURES))) if textured else -1
    bg_colors = _hsv_to_rgb(rng.random(2), rng.uniform(0.0, 0.7, 2), rng.uniform(0.05, 0.4, 2))
    bg_dir = rng.uniform(0.0, 2 * math.pi)
    bg_freq = rng.uniform(1.5, 5.0)  # stripe periods per frame width
    bg_drift = rng.uniform(-0.08, 0.08)  # stripe phase change per frame (radians / 2 pi)
    bg_cells = int(rng.integers(3, 7))
    noise = rng.random((_NOISE_GRID, _NOISE_GRID))

    # Positions: a uniform point of the range where the object stays inside the frame.
    bound = _bounding_radius(shape, radius, rotating=np.arange(k) > 0)
    lo_p = bound
    hi_p = np.maximum(size - bound, bound)
    pos[0] = lo_p[0] + pos_u * (hi_p[0] - lo_p[0])
    pos[1:] = lo_p[1:, None] + d_pos_u * (hi_p[1:, None] - lo_p[1:, None])
    return dict(shape=shape, radius=radius, pos=pos, vel=vel, angle0=angle0, spin=spin, color=color,
                depth=depth, texture=texture, bg_colors=bg_colors, bg_dir=bg_dir, bg_freq=bg_freq,
                bg_drift=bg_drift, bg_cells=bg_cells, noise=noise, bound=bound, motion=motion)


def _bounding_radius(shape: np.ndarray, radius: np.ndarray, rotating: np.ndarray) -> np.ndarray:
    """Distance from the centre to the farthest point of the shape (any rotation if `rotating`)."""
    square = _SQUARE_HALF_SIDE * radius * np.where(rotating, math.sqrt(2.0), 1.0)
    tri = _TRIANGLE_CIRCUMRADIUS * radius
    return np.where(shape == 1, square, np.where(shape == 2, tri, radius))


def _bounce(p0: torch.Tensor, v: torch.Tensor, t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Position at times t of points moving at v and reflecting off [lo, hi] (triangle wave)."""
    span = (hi - lo).clamp_min(1e-6)
    q = torch.remainder(p0 - lo + v * t, 2 * span)
    return lo + torch.where(q <= span, q, 2 * span - q)


def _polygon_sdf(px: torch.Tensor, py: torch.Tensor, angle: torch.Tensor, sides: int, apothem: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance to a regular polygon (max of edge half-planes; exact inside)."""
    # Normals start pointing down (+y in image coordinates) so a triangle points up.
    d = None
    for j in range(sides):
        a = angle + math.pi / 2 + 2 * math.pi * j / sides
        dist = px * torch.cos(a) + py * torch.sin(a)
        d = dist if d is None else torch.maximum(d, dist)
    return d - apothem


def _render_backgrounds(params: list[dict], num_frames: int, size: int) -> torch.Tensor:
    """Backgrounds [n, T, 3, H, W] in [0, 1]."""
    n = len(params)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    t = torch.arange(num_frames, dtype=torch.float32)
    out = torch.empty(n, num_frames, 3, size, size)
    for i, p in enumerate(params):
        c0 = torch.tensor(p["bg_colors"][0], dtype=torch.float32).view(3, 1, 1)
        c1 = torch.tensor(p["bg_colors"][1], dtype=torch.float32).view(3, 1, 1)
        texture = _TEXTURES[p["texture"]] if p["texture"] >= 0 else "plain"
        u = math.cos(p["bg_dir"]) * xx + math.sin(p["bg_dir"]) * yy
        if texture == "plain":
            out[i] = c0
            continue
        if texture == "gradient":
            w = ((u - u.min()) / (u.max() - u.min())).expand(num_frames, 1, size, size)
        elif texture == "stripes":
            phase = 2 * math.pi * (p["bg_freq"] * u.unsqueeze(0) + p["bg_drift"] * t.view(-1, 1, 1))
            w = (0.5 + 0.5 * torch.sin(phase)).unsqueeze(1)
        elif texture == "noise":
            grid = torch.tensor(p["noise"], dtype=torch.float32).view(1, 1, _NOISE_GRID, _NOISE_GRID)
            w = torch.nn.functional.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)
            w = w.clamp(0, 1).expand(num_frames, 1, size, size)
        else:  # checker
            cells = p["bg_cells"]
            w = ((torch.floor(xx * cells) + torch.floor(yy * cells)) % 2).expand(num_frames, 1, size, size)
        out[i] = c0 + (c1 - c0) * w
    return out


def _render_chunk(params: list[dict], num_frames: int, size: int) -> torch.Tensor:
    """Clips [n, T, H, W, 3] uint8 for a chunk of parameter dicts."""
    def stack(key: str) -> torch.Tensor:
        return torch.as_tensor(np.stack([p[key] for p in params]), dtype=torch.float32)

    shape = torch.as_tensor(np.stack([p["shape"] for p in params]))  # [n, K]
    # Composite back to front: reorder every per-object tensor by depth once.
    order = torch.as_tensor(np.stack([np.argsort(p["depth"]) for p in params]))
    shape = shape.gather(1, order)

    def by_depth(x: torch.Tensor) -> torch.Tensor:
        idx = order.view(*order.shape, *([1] * (x.dim() - 2))).expand_as(x)
        return x.gather(1, idx)

    radius = by_depth(stack("radius"))
    pos, vel = by_depth(stack("pos")), by_depth(stack("vel"))
    angle0, spin = by_depth(stack("angle0")), by_depth(stack("spin"))
    color = by_depth(stack("color"))  # [n, K, 3]
    bound = by_depth(stack("bound"))

    t = torch.arange(num_frames, dtype=torch.float32).view(1, -1, 1)  # [1, T, 1]
    lo, hi = bound.unsqueeze(1), (size - bound).clamp_min(bound).unsqueeze(1)
    cx = _bounce(pos[..., 0].unsqueeze(1), vel[..., 0].unsqueeze(1), t, lo, hi)  # [n, T, K]
    cy = _bounce(pos[..., 1].unsqueeze(1), vel[..., 1].unsqueeze(1), t, lo, hi)
    angle = angle0.unsqueeze(1) + spin.unsqueeze(1) * t

    grid = torch.arange(size, dtype=torch.float32) + 0.5
    px = grid.view(1, 1, 1, 1, -1) - cx[..., None, None]  # [n, T, K, 1, W]
    py = grid.view(1, 1, 1, -1, 1) - cy[..., None, None]  # [n, T, K, H, 1]
    r = radius.view(radius.shape[0], 1, -1, 1, 1)
    ang = angle[..., None, None]
    sdf = torch.sqrt(px * px + py * py) - r
    kind = shape.view(shape.shape[0], 1, -1, 1, 1)
    if bool((shape == 1).any()):
        sq = _polygon_sdf(px, py, ang, 4, _SQUARE_HALF_SIDE * r)
        sdf = torch.where(kind == 1, sq, sdf)
    if bool((shape == 2).any()):
        tri = _polygon_sdf(px, py, ang, 3, 0.5 * _TRIANGLE_CIRCUMRADIUS * r)
        sdf = torch.where(kind == 2, tri, sdf)
    # One-pixel-wide linear ramp across the edge: cheap anti-aliasing.
    alpha = (0.5 - sdf).clamp(0.0, 1.0) * (kind >= 0)  # [n, T, K, H, W]

    img = _render_backgrounds(params, num_frames, size)  # [n, T, 3, H, W]
    for k in range(alpha.shape[2]):
        a = alpha[:, :, k].unsqueeze(2)  # [n, T, 1, H, W]
        col = color[:, k].view(-1, 1, 3, 1, 1)
        img = img + (col - img) * a
    return (img * 255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2).contiguous()


def _draw_params(num_clips: int, num_frames: int, size: int, seed: int, num_classes: int, background: str,
                 num_distractors: tuple[int, int]) -> tuple[np.ndarray, list[dict]]:
    """Validate the arguments, then draw the labels and every clip's parameters (shared by the
    renderer and `clip_params`, so both see the very same draws)."""
    if num_clips < 0 or num_frames < 1 or size < 4:
        raise ValueError(f"need num_clips >= 0, num_frames >= 1, size >= 4; got {num_clips}, {num_frames}, {size}")
    _check_num_classes(num_classes)
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    lo_d, hi_d = int(num_distractors[0]), int(num_distractors[1])
    if not 0 <= lo_d <= hi_d:
        raise ValueError(f"num_distractors must be (min, max) with 0 <= min <= max, got {num_distractors}")
    labels = _balanced_labels(num_clips, num_classes, seed)
    params = [_clip_params(i, seed, int(labels[i]), size, 1 + hi_d, (lo_d, hi_d), background)
              for i in range(num_clips)]
    return labels, params


def clip_params(
    num_clips: int,
    num_frames: int = 1,
    size: int = 32,
    seed: int = 0,
    num_classes: int = NUM_SHAPE_CLASSES,
    background: str = "mixed",
    num_distractors: tuple[int, int] = (1, 3),
) -> list[dict]:
    """The per-clip parameters `render_moving_shapes` draws for the same arguments (nothing rendered).

    One dict per clip (numpy values, object slot 0 = main object, later slots = distractors):
    "shape" [K] (index into SHAPES, -1 = unused slot), "radius" [K] px, "pos" [K, 2] (x, y) px at
    frame 0, "vel" [K, 2] px/frame (before any bounce; +y points down), "angle0" [K], "spin" [K]
    rad/frame, "color" [K, 3] RGB in [0, 1], "depth" [K] (compositing rank, higher = in front),
    "bound" [K] px, "motion" (index into MOTIONS), background draws ("texture", "bg_colors", ...),
    plus "label", "size", "num_frames" and "background" ("plain" or the texture name:
    "gradient", "stripes", "noise", "checker"). Mutating the dicts does not affect rendering.
    """
    labels, params = _draw_params(num_clips, num_frames, size, seed, num_classes, background, num_distractors)
    out = []
    for label, p in zip(labels, params):
        q = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in p.items()}
        q.update(label=int(label), size=int(size), num_frames=int(num_frames),
                 background=_TEXTURES[p["texture"]] if p["texture"] >= 0 else "plain")
        out.append(q)
    return out


def render_moving_shapes(
    num_clips: int,
    num_frames: int,
    size: int = 32,
    seed: int = 0,
    num_classes: int = NUM_SHAPE_CLASSES,
    background: str = "mixed",
    num_distractors: tuple[int, int] = (1, 3),
    return_params: bool = False,
    chunk: int = 32,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict]:
    """Clips uint8 [N, T, H, W, 3] and labels int64 [N] (see the module docstring for the classes).

    background: "plain" (one colour), "textured" (gradient, drifting stripes, smooth noise or
    checkerboard) or "mixed" (each clip picks plain or textured with equal odds).
    num_distractors: (min, max) smaller objects per clip, inclusive.
    return_params: also return a dict of per-clip ground truth: "shape" [N, K] (-1 = unused slot,
    slot 0 = main object), "motion" [N], "center" [N, T, K, 2] (x, y in pixels, pixel centres at
    i + 0.5), "radius" [N, K], "depth" [N, K] (compositing rank, higher = in front).
    chunk: clips rasterised at once (bounds memory at ~chunk * T * K * H * W floats).
    """
    labels, params = _draw_params(num_clips, num_frames, size, seed, num_classes, background, num_distractors)
    max_objects = 1 + int(num_distractors[1])
    videos = torch.empty(num_clips, num_frames, size, size, 3, dtype=torch.uint8)
    for start in range(0, num_clips, max(1, chunk)):
        videos[start : start + chunk] = _render_chunk(params[start : start + chunk], num_frames, size)
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    if not return_params:
        return videos, labels_t

    def stack(key: str, dtype=torch.float32) -> torch.Tensor:
        if not params:
            return torch.zeros(0)
        return torch.as_tensor(np.stack([p[key] for p in params]), dtype=dtype)

    t = torch.arange(num_frames, dtype=torch.float32).view(1, -1, 1)
    bound = stack("bound").unsqueeze(1)
    hi = (size - bound).clamp_min(bound)
    pos, vel = stack("pos"), stack("vel")
    if num_clips:
        center = torch.stack([_bounce(pos[..., d].unsqueeze(1), vel[..., d].unsqueeze(1), t, bound, hi)
                              for d in range(2)], dim=-1)
    else:
        center = torch.zeros(0, num_frames, max_objects, 2)
    info = {
        "shape": stack("shape", torch.long),
        "motion": torch.as_tensor([p["motion"] for p in params], dtype=torch.long),
        "center": center,
        "radius": stack("radius"),
        "depth": stack("depth", torch.long),
    }
    return videos, labels_t, info
