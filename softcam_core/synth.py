"""Deterministic synthetic fundus, OCT and chest X-ray cohorts with exact lesion ground truth.

``make_cohort`` (and the ``softcam synth`` command) renders phantoms that look like their modality
and writes, inside ``out``::

    images/<modality>_<index>.png|.dcm   fundus RGB PNG, OCT grey PNG (W x round(0.97 W)), CXR DICOM
    labels.csv                           image,label,split (label = class name)
    annotations.json                     COCO: one box per lesion object, original image pixels
    masks/<stem>.png                     uint8 0/255 union of the lesions, same H x W as the image
    synth_meta.json                      per-image facts: lesion counts and boxes, artifact box, seeds

Same arguments give byte-identical files: every random draw comes from a ``numpy`` generator
seeded by ``(seed, modality, image index, stream)``, nothing reads the clock, and the DICOM UIDs
are derived from the same numbers.

Ground truth is geometric: each lesion is an anti-aliased shape, and its mask holds the pixels
whose centre lies inside that shape (coverage >= 0.5), which are exactly the pixels the lesion
visibly changed up to a one-pixel anti-aliasing fringe. OCT drusen follow the clinical convention:
the mask is the region between the elevated RPE and the normal RPE line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from annotations.geometry import Box

GENERATOR_VERSION = 4
MODALITIES = ("fundus", "oct", "cxr")
LESION_KINDS = {
    "fundus": ("hard_exudate", "haemorrhage", "microaneurysm"),
    "oct": ("drusen",),
    "cxr": ("opacity",),
}
BINARY_CLASSES = ("healthy", "diseased")
GRADE_CLASSES = ("grade0", "grade1", "grade2")
SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = {"fundus": ".png", "oct": ".png", "cxr": ".dcm"}
# burned-in text of the shortcut artifact, per modality (a site stamp, a device tag, a lead side marker)
ARTIFACT_TEXT = {"fundus": "S2", "oct": "HD2", "cxr": "L"}
# depth of the OCT RPE at the scan centre, as a fraction of the B-scan height (uniform between)
OCT_RPE_DEPTH = (0.32, 0.95)

# random streams per image. The background and the lesion-like events (their number, kinds, sizes,
# shapes and places) never see the label; only which events take the lesion's form does (drawn
# from their own stream), so healthy and diseased images differ only by the form of some events
# (and, when asked for, by the artifact)
_STREAM_BACKGROUND, _STREAM_LESIONS, _STREAM_NOISE, _STREAM_ARTIFACT, _STREAM_FORMS = 0, 1, 2, 3, 4
_COHORT_STREAM = 0x5EED


class SynthError(ValueError):
    """Bad arguments for a synthetic cohort; ``str(e)`` is one line naming the problem."""


# --------------------------------------------------------------------------------------------
# small shared helpers
# --------------------------------------------------------------------------------------------


def image_shape(modality: str, size: int) -> tuple[int, int]:
    """(H, W) in pixels of a rendered image: square, except OCT B-scans (W = size, H = round(0.97 size),
    the 512 x 496 aspect of a Spectralis scan)."""
    if modality == "oct":
        return int(round(size * 0.97)), size
    return size, size


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (H, W) float32; cached and read-only."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy += 0.5
    xx += 0.5
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _rng(seed: int, modality: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, MODALITIES.index(modality), index, stream]))


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]) -> np.ndarray:
    """Low-frequency texture (H, W) float32: white noise blurred by ``sigma`` pixels (per axis),
    rescaled to zero mean and unit std. Wide blurs are computed on a coarser grid and upsampled
    (bilinear), which looks the same and costs a fraction."""
    sigmas = np.broadcast_to(np.asarray(sigma, dtype=float), (2,))
    factors = np.maximum(1, np.floor(sigmas / 1.5)).astype(int)
    coarse_shape = tuple(int(math.ceil(s / f)) + 2 for s, f in zip(shape, factors))
    coarse = rng.standard_normal(coarse_shape, dtype=np.float32)
    coarse = ndimage.gaussian_filter(coarse, tuple(sigmas / factors), mode="reflect")
    if (factors > 1).any():
        zoomed = ndimage.zoom(coarse, tuple(float(f) for f in factors), order=1, mode="nearest", grid_mode=True)
        coarse = zoomed[: shape[0], : shape[1]]
    field_ = np.ascontiguousarray(coarse[: shape[0], : shape[1]])
    std = float(field_.std())
    return (field_ - field_.mean()) / (std if std > 0 else 1.0)


def _window(center_x: float, center_y: float, reach: float, height: int, width: int) -> tuple[slice, slice]:
    """Row and column slices covering a disc of radius ``reach`` around a point, clipped to the image."""
    x0 = max(0, int(math.floor(center_x - reach)))
    x1 = min(width, int(math.ceil(center_x + reach)) + 1)
    y0 = max(0, int(math.floor(center_y - reach)))
    y1 = min(height, int(math.ceil(center_y + reach)) + 1)
    return slice(y0, y1), slice(x0, x1)


def _blob(
    shape: tuple[int, int],
    center_x: float,
    center_y: float,
    radius: float,
    rng: np.random.Generator,
    *,
    aspect: float = 1.0,
    wobble: float = 0.12,
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """An irregular, anti-aliased elliptical blob.

    Returns ``(window, coverage, depth)`` over the window (row, col slices) of a (H, W) image:
    coverage in [0, 1] (1 inside, a one-pixel linear ramp at the edge; the blob's mask is
    ``coverage >= 0.5``) and depth in [0, 1] (1 at the centre, 0 at the edge) for soft profiles.
    ``radius`` is the semi-axis in pixels, ``aspect`` the ratio of the second axis to the first,
    ``wobble`` the relative amplitude of the boundary's low harmonics.
    """
    # at least ~0.8 px on the short axis after the wobble, so the blob covers a pixel centre wherever
    # it lies: nothing is drawn that the mask misses
    radius = max(radius, 1.1 / min(aspect, 1.0))
    angle = rng.uniform(0, math.pi)
    harmonics = [(k, rng.uniform(0, wobble) / k, rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4, 5)]
    reach = radius * max(1.0, aspect) * (1.0 + sum(a for _, a, _ in harmonics)) + 2.0
    rows, cols = _window(center_x, center_y, reach, *shape)
    yy, xx = _grid(*shape)
    dx = xx[rows, cols] - center_x
    dy = yy[rows, cols] - center_y
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    u = dx * cos_a + dy * sin_a
    v = (-dx * sin_a + dy * cos_a) / aspect
    dist = np.hypot(u, v)
    theta = np.arctan2(v, u)
    boundary = np.full_like(dist, radius)
    for k, amplitude, phase in harmonics:
        boundary += radius * amplitude * np.cos(k * theta + phase)
    # (boundary - dist) is the distance to the edge in pixels along the first axis; with aspect < 1
    # the ramp is steeper across the short axis, still about one pixel wide
    coverage = np.clip((boundary - dist) * max(1.0, 1.0 / aspect) + 0.5, 0.0, 1.0).astype(np.float32)
    depth = np.clip(1.0 - dist / np.maximum(boundary, 1e-3), 0.0, 1.0).astype(np.float32)
    return (rows, cols), coverage, depth


def _box_of(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight box ``(x0, y0, x1, y1)`` of a bool mask, exclusive end, image pixels; None when empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return None
    return float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)


def _big_enough(mask: np.ndarray) -> bool:
    """A lesion mask that spans at least MIN_LESION_SIDE_PX in both directions."""
    box = _box_of(mask)
    return box is not None and min(box[2] - box[0], box[3] - box[1]) >= MIN_LESION_SIDE_PX


def _boxes_overlap(a, b, margin: float = 0.0) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _draw_tree(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    start: tuple[float, float],
    angle: float,
    target_angle: float,
    width: float,
    length: float,
    *,
    value: int,
    inside,
    scale: float,
    step: float,
    steer: float = 0.08,
    branch_prob: float = 0.07,
    jitter: float = 0.12,
    min_width: float = 0.35,
) -> None:
    """Draw a branching vessel tree as tapering polylines.

    Coordinates, widths, lengths and ``step`` are in output pixels; ``scale`` is the supersampling
    factor of the canvas. The heading turns a fraction ``steer`` per step towards ``target_angle``
    (radians, image axes) with random ``jitter``; ``inside(x, y)`` stops a branch when it leaves
    the field. Children start thinner, at an angle, and follow their own heading.
    """
    stack = [(start[0], start[1], angle, target_angle, width, length)]
    run = 6  # steps drawn as one polyline: the width tapers between runs, not within one
    while stack:
        x, y, heading, target, w, remaining = stack.pop()
        points = [(x * scale, y * scale)]
        run_width = w
        while remaining > 0 and w >= min_width and inside(x, y):
            turn = (target - heading + math.pi) % (2 * math.pi) - math.pi
            heading += steer * turn + rng.normal(0.0, jitter)
            x, y = x + step * math.cos(heading), y + step * math.sin(heading)
            remaining -= step
            points.append((x * scale, y * scale))
            if rng.random() < branch_prob and w > 2 * min_width:
                side = 1.0 if rng.random() < 0.5 else -1.0
                child = heading + side * rng.uniform(0.45, 1.0)
                stack.append((x, y, child, child, w * rng.uniform(0.55, 0.75), remaining * rng.uniform(0.35, 0.6)))
                w *= 0.9
            w *= 0.99
            if len(points) > run:
                _polyline(draw, points, run_width * scale, value)
                points, run_width = [points[-1]], w
        if len(points) > 1:
            _polyline(draw, points, run_width * scale, value)


def _polyline(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], width: float, value: int) -> None:
    pen = max(1, int(round(width)))
    draw.line(points, fill=value, width=pen)
    if pen >= 3:  # round joins; thinner lines show no gaps once downsampled
        r = pen / 2.0
        for x, y in points[1:]:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=value)


# 5 x 7 bitmap glyphs for the burned-in artifact texts (ARTIFACT_TEXT): drawn here rather than with a
# font file so the pixels are identical on every machine and Pillow version
_GLYPHS = {
    "S": (".###.", "#...#", "#....", ".###.", "....#", "#...#", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
}


def _text_bitmap(text: str, scale: int, frame: bool) -> np.ndarray:
    """Bool bitmap of ``text`` in the 5 x 7 font, each font pixel ``scale`` x ``scale``, with one font
    pixel of padding (and an outline when ``frame``, like a lead side marker)."""
    glyph_rows = []
    for row in range(7):
        glyph_rows.append(".".join(_GLYPHS[ch][row] for ch in text))
    bits = np.array([[c == "#" for c in line] for line in glyph_rows], dtype=bool)
    bits = np.pad(bits, 2 if frame else 1)
    if frame:
        bits[0, :] = bits[-1, :] = bits[:, 0] = bits[:, -1] = True
    return np.kron(bits, np.ones((scale, scale), dtype=bool))


# --------------------------------------------------------------------------------------------
# per-image plan and rendering
# --------------------------------------------------------------------------------------------


# a pixel belongs to a lesion's mask when the lesion changes it by more than this (grey levels of
# the written image before noise: 0..255 fundus and OCT, 12-bit stored values CXR), so the mask
# carries (nearly) all of the |with lesion - without lesion| difference, anti-aliased rim included
MASK_THRESHOLD = 0.5
# every lesion is drawn at least this large: semi-axis >= 1.1 px, so its mask spans >= 2 x 2 pixels
MIN_LESION_RADIUS_PX = 1.1
MIN_LESION_SIDE_PX = 2


@dataclass
class Lesion:
    """One lesion object: its kind (COCO category name) and its bool mask (H, W)."""

    kind: str
    mask: np.ndarray

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Tight box ``(x0, y0, x1, y1)``, exclusive end, image pixels."""
        return _box_of(self.mask)


@dataclass
class Rendered:
    """A rendered image: ``pixels`` uint8 (H, W, 3) fundus, uint8 (H, W) OCT, uint16 (H, W) CXR
    (12-bit stored values), the lesion objects, the artifact box (x0, y0, x1, y1) or None, and
    ``confounders``: how many lesion look-alikes (events drawn in the confounder form) of each kind."""

    pixels: np.ndarray
    lesions: list[Lesion] = field(default_factory=list)
    artifact_box: tuple[float, float, float, float] | None = None
    confounders: dict[str, int] = field(default_factory=dict)

    def mask(self) -> np.ndarray:
        """Union of the lesion masks, bool (H, W)."""
        out = np.zeros(self.pixels.shape[:2], dtype=bool)
        for lesion in self.lesions:
            out |= lesion.mask
        return out


def _lesion_load(label: str) -> str:
    """'none', 'moderate' (binary diseased), 'mild' (grade1) or 'severe' (grade2)."""
    return {"healthy": "none", "grade0": "none", "diseased": "moderate", "grade1": "mild", "grade2": "severe"}[label]


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A number in [low, high] whose logarithm is uniform: small values as common as large ones."""
    if high <= low:
        return float(low)
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _wide_count(rng: np.random.Generator, low: int, high: int) -> int:
    """An integer in [low, high], log-uniform in (count + 1): few is common, many is regular."""
    value = int(math.floor(math.exp(rng.uniform(math.log(low + 1), math.log(high + 2))))) - 1
    return max(low, min(high, value))


# fewest lesion-like events per image: grade1 (1-3 lesions) stays below grade2 (all events)
MIN_EVENTS = 4


def _lesion_events(load: str, n_events: int, rng: np.random.Generator) -> set[int]:
    """Which of the ``n_events`` placed events take the lesion's form (the others are confounders).

    Every draw happens whatever the load, so the stream stays aligned across labels. Binary
    'moderate': one lesion in 15 % of the images, else half to all of the events (uniform); grade1 ('mild') 1-3;
    grade2 ('severe') every event. 'none': no lesion."""
    order = rng.permutation(n_events)
    single = rng.random() < 0.15
    moderate = 1 if single or n_events < 2 else int(rng.integers(max(2, (n_events + 1) // 2), n_events + 1))
    mild = min(int(rng.integers(1, 4)), max(1, n_events - 1))
    count = {"none": 0, "mild": mild, "moderate": moderate, "severe": n_events}[load] if n_events else 0
    return {int(i) for i in order[:count]}


def render_image(
    modality: str,
    size: int,
    seed: int,
    index: int,
    label: str,
    *,
    artifact: bool = False,
    draw_lesions: bool = True,
    lesions_as_confounders: bool = False,
    confounders: bool = True,
) -> Rendered:
    """Render image ``index`` of a cohort.

    Every image carries lesion-like *events* (their number, kinds, sizes, shapes and places drawn
    without the label). ``label`` (healthy/diseased or grade0..2) only sets how many of them take
    the lesion's form; the rest take the confounder form, which changes the same pixel values per
    colour channel (fundus: the lesion's colour split over two places; OCT: the deposit above a flat
    RPE instead of under a lifted one; CXR: the nodule's densities shuffled into a mottled shadow), so
    global intensity statistics cannot tell the classes apart.

    ``draw_lesions=False`` renders the same image without its lesions (every other random draw
    unchanged, the lesion masks still computed): how the tests check that the masks cover the
    changed pixels. ``lesions_as_confounders=True`` renders the lesion events in the confounder
    form (no lesions): how the tests check that a diseased image is its healthy twin but for them.
    ``confounders=False`` leaves the confounder-form events out (healthy images carry none) and
    draws every event of a (binary) diseased image as a lesion: an easy cohort whose classes differ
    in global intensity statistics, for demos, never for benchmarks.
    """
    load = "none" if lesions_as_confounders else _lesion_load(label)
    if not confounders and load == "moderate":
        load = "severe"  # the easy variant: every event of a diseased image is a lesion
    rng_bg = _rng(seed, modality, index, _STREAM_BACKGROUND)
    rng_lesion = _rng(seed, modality, index, _STREAM_LESIONS)
    rng_noise = _rng(seed, modality, index, _STREAM_NOISE)
    rng_forms = _rng(seed, modality, index, _STREAM_FORMS)
    forms = lambda n_events: (_lesion_events(load, n_events, rng_forms), confounders)  # noqa: E731
    renderer = {"fundus": _render_fundus, "oct": _render_oct, "cxr": _render_cxr}[modality]
    rendered, region, corners = renderer(size, forms, rng_bg, rng_lesion, rng_noise, draw_lesions)
    if artifact:
        _burn_artifact(rendered, modality, size, region, corners, _rng(seed, modality, index, _STREAM_ARTIFACT))
    return rendered


def _burn_artifact(rendered: Rendered, modality: str, size: int, region, corners: list[str], rng: np.random.Generator) -> None:
    """Burn the shortcut artifact (bright text or side marker) into a corner of ``region``
    (x0, y0, x1, y1 pixels: the part of the image the model sees), clear of the lesions."""
    scale = max(1, int(round(size / 128)))
    bitmap = _text_bitmap(ARTIFACT_TEXT[modality], scale, frame=modality == "cxr")
    height, width = rendered.pixels.shape[:2]
    bh, bw = bitmap.shape
    margin = max(2, int(round(0.015 * size)))
    left, top = max(0, int(math.ceil(region[0]))), max(0, int(math.ceil(region[1])))
    right, bottom = min(width, int(math.floor(region[2]))), min(height, int(math.floor(region[3])))
    lesion_boxes = [lesion.box for lesion in rendered.lesions]
    order = rng.permutation(len(corners))
    for corner in (corners[i] for i in order):
        jitter_x, jitter_y = (int(j) for j in rng.integers(0, max(1, margin), size=2))
        x0 = left + margin + jitter_x if corner.endswith("left") else right - margin - jitter_x - bw
        y0 = top + margin + jitter_y if corner.startswith("top") else bottom - margin - jitter_y - bh
        box = (float(x0), float(y0), float(x0 + bw), float(y0 + bh))
        if any(_boxes_overlap(box, other, margin=1.0) for other in lesion_boxes):
            continue
        region = rendered.pixels[y0 : y0 + bh, x0 : x0 + bw]
        if modality == "cxr":
            region[bitmap] = 4095  # lead marker: fully attenuating, the brightest value a 12-bit image has
        else:
            region[bitmap] = 235
        rendered.artifact_box = box
        return
    raise AssertionError("no corner free of lesions for the artifact")  # corners lie outside the lesion field


# --------------------------------------------------------------------------------------------
# fundus
# --------------------------------------------------------------------------------------------


def _render_fundus(size, forms, rng_bg, rng_lesion, rng_noise, draw_lesions):
    height = width = size
    yy, xx = _grid(height, width)
    cx = width / 2 + rng_bg.uniform(-0.01, 0.01) * size
    cy = height / 2 + rng_bg.uniform(-0.01, 0.01) * size
    radius = 0.46 * size
    r = np.hypot(xx - cx, yy - cy) / radius
    fov = np.clip((1.0 - r) * radius + 0.5, 0.0, 1.0)  # anti-aliased field-of-view stop

    eye = 1.0 if rng_bg.random() < 0.5 else -1.0  # +1: disc on the right (a right eye in this view)
    disc_x = cx + eye * rng_bg.uniform(0.40, 0.48) * radius
    disc_y = cy + rng_bg.uniform(-0.06, 0.04) * radius
    disc_r = rng_bg.uniform(0.10, 0.12) * radius
    fovea_x = disc_x - eye * rng_bg.uniform(0.66, 0.74) * radius
    fovea_y = disc_y + rng_bg.uniform(0.02, 0.08) * radius

    # retina: orange-red, pigmentation varies between people; illumination falls off to the rim
    red = rng_bg.uniform(190, 228)
    base = np.array([red, red * rng_bg.uniform(0.36, 0.48), red * rng_bg.uniform(0.12, 0.22)], dtype=np.float32)
    light_dx, light_dy = rng_bg.uniform(-0.15, 0.15, size=2)
    rl = np.hypot((xx - cx) / radius - light_dx, (yy - cy) / radius - light_dy)
    illumination = 1.02 - 0.28 * rl**2 - 0.25 * np.clip(r, 0, 1) ** 8
    texture = 1.0 + 0.05 * _smooth_noise(rng_bg, (height, width), size / 40) + 0.02 * _smooth_noise(rng_bg, (height, width), size / 120)
    shade = illumination * texture
    macula = np.exp(-((xx - fovea_x) ** 2 + (yy - fovea_y) ** 2) / (2 * (0.16 * radius) ** 2))
    fovea = np.exp(-((xx - fovea_x) ** 2 + (yy - fovea_y) ** 2) / (2 * (0.035 * radius) ** 2))
    # macular pigment absorbs blue and green more than red
    macula_gain = np.stack([1 - 0.25 * macula - 0.15 * fovea, 1 - 0.40 * macula - 0.25 * fovea, 1 - 0.45 * macula - 0.3 * fovea], axis=-1)
    img = base[None, None, :] * shade[..., None] * macula_gain

    # optic disc: bright yellowish rim around a paler cup
    disc_d = np.hypot(xx - disc_x, yy - disc_y)
    disc_alpha = 1.0 - _smoothstep(disc_r * 0.85, disc_r * 1.08, disc_d)
    cup_x = disc_x + eye * 0.12 * disc_r
    cup_alpha = 1.0 - _smoothstep(disc_r * 0.25, disc_r * 0.55, np.hypot(xx - cup_x, yy - disc_y))
    disc_colour = np.array([250, 185, 105], dtype=np.float32) * rng_bg.uniform(0.92, 1.02)
    cup_colour = np.array([255, 228, 165], dtype=np.float32)
    img = img * (1 - 0.85 * disc_alpha[..., None]) + disc_colour * 0.85 * disc_alpha[..., None]
    img = img * (1 - 0.8 * cup_alpha[..., None]) + cup_colour * 0.8 * cup_alpha[..., None]

    # vessels: arteries and veins leave the disc in four arcades; the temporal ones arch around
    # the macula, the nasal ones run to the nasal rim
    scale = 2.0
    canvas_veins = Image.new("L", (int(width * scale), int(height * scale)), 0)
    canvas_arteries = Image.new("L", canvas_veins.size, 0)
    inside = lambda x, y: math.hypot(x - cx, y - cy) < radius * 0.99  # noqa: E731
    step = 0.025 * radius
    for draw, vessel_width in ((ImageDraw.Draw(canvas_arteries), 0.016), (ImageDraw.Draw(canvas_veins), 0.022)):
        for vertical in (-1.0, 1.0):
            start_angle = math.atan2(vertical, -eye * 0.35) + rng_bg.normal(0, 0.1)
            target = math.atan2(vertical * 0.25, -eye) + rng_bg.normal(0, 0.08)
            _draw_tree(draw, rng_bg, (cup_x, disc_y + vertical * 0.2 * disc_r), start_angle, target, vessel_width * radius,
                       1.5 * radius, value=255, inside=inside, scale=scale, step=step, steer=0.07, jitter=0.07)
            start_angle = math.atan2(vertical, eye * 0.6) + rng_bg.normal(0, 0.1)
            target = math.atan2(vertical * 0.4, eye) + rng_bg.normal(0, 0.1)
            _draw_tree(draw, rng_bg, (cup_x, disc_y + vertical * 0.2 * disc_r), start_angle, target, vessel_width * radius * 0.75,
                       0.8 * radius, value=255, inside=inside, scale=scale, step=step, steer=0.1, jitter=0.08)
    veins = np.asarray(canvas_veins.reduce(int(scale)), dtype=np.float32) / 255.0
    arteries = np.asarray(canvas_arteries.reduce(int(scale)), dtype=np.float32) / 255.0
    artery_colour = np.array([165, 38, 22], dtype=np.float32) * (base[0] / 210)
    vein_colour = np.array([115, 18, 14], dtype=np.float32) * (base[0] / 210)
    img = img * (1 - 0.75 * arteries[..., None]) + artery_colour * 0.75 * arteries[..., None]
    img = img * (1 - 0.85 * veins[..., None]) + vein_colour * 0.85 * veins[..., None]

    # lesion-like events around the posterior pole, inside the field, clear of the disc and each
    # other. Each event has two places: its own and one for the second half of its confounder form
    def free_place(reach: float, taken: list) -> tuple[float, float] | None:
        for _ in range(60):
            px = fovea_x + rng_lesion.normal(0, 0.38) * radius
            py = fovea_y + rng_lesion.normal(0, 0.38) * radius
            if math.hypot(px - cx, py - cy) + reach * 1.3 > radius * 0.93:
                continue
            if math.hypot(px - disc_x, py - disc_y) < disc_r * 1.4 + reach * 1.3:
                continue
            extent = _fundus_extent(reach)
            if min(px, py) < extent or max(px, py) > size - extent:
                continue  # the whole window inside the image, wherever the event is drawn
            box = (px - reach * 1.45, py - reach * 1.45, px + reach * 1.45, py + reach * 1.45)
            if any(_boxes_overlap(box, other, margin=2.0) for other in taken):
                continue
            taken.append(box)
            return px, py
        return None  # crowded field: skip this event rather than overlap another

    taken: list[tuple[float, float, float, float]] = []
    events = []
    for kind, reach in _fundus_events(rng_lesion, size):
        place = free_place(reach, taken)
        if place is None:
            continue
        second = free_place(reach, taken)
        if second is None:
            taken.pop()
            continue
        window, alpha = _fundus_shape((height, width), kind, place[0], place[1], reach, rng_lesion)
        if not _big_enough(alpha > 0.02):
            continue  # too faint to draw a lesion of 2 x 2 px: no event (whatever the label)
        shift = (int(round(second[1] - place[1])), int(round(second[0] - place[0])))
        events.append((kind, window, alpha, shift))
    lesion_events, with_confounders = forms(len(events))

    lesions: list[Lesion] = []
    confounders = {f"{kind}_split": 0 for kind in LESION_KINDS["fundus"]}
    colours = {kind: np.asarray(rgb, dtype=np.float32) for kind, rgb in _FUNDUS_RGB.items()}
    for number, (kind, window, alpha, shift) in enumerate(events):
        colour = colours[kind]
        if number in lesion_events:
            change = alpha[..., None] * (colour - img[window])
            mask = np.zeros((height, width), dtype=bool)
            mask[window] = np.abs(change).max(axis=2) > MASK_THRESHOLD
            if draw_lesions:
                img[window] += change
            if _big_enough(mask):
                lesions.append(Lesion(kind, mask))
            continue
        if not with_confounders:
            continue
        # confounder form: the lesion's own change, green at its place, red and blue at the second
        # place, so each colour channel gains exactly the values a lesion would give it; only
        # where all channels change together is there a lesion
        confounders[f"{kind}_split"] += 1
        rows, cols = window
        moved = (slice(rows.start + shift[0], rows.stop + shift[0]), slice(cols.start + shift[1], cols.stop + shift[1]))
        for channel, (target_rows, target_cols) in ((1, window), (0, moved), (2, moved)):
            patch = img[target_rows, target_cols, channel]
            img[target_rows, target_cols, channel] = patch + alpha * (colour[channel] - patch)

    img += 1.6 * rng_noise.standard_normal(img.shape, dtype=np.float32)
    img = img * fov[..., None]
    pixels = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    # the tag goes in a corner of the square circumscribing the retina (what the fundus crop keeps),
    # outside the circle
    region = (cx - radius, cy - radius, cx + radius, cy + radius)
    return Rendered(pixels, lesions, confounders=confounders), region, ["top-left", "top-right", "bottom-left", "bottom-right"]


_FUNDUS_RGB = {
    "hard_exudate": (250.0, 228.0, 105.0),  # waxy yellow deposits, in clusters
    "haemorrhage": (92.0, 14.0, 8.0),  # blot haemorrhage: dark red, darker core
    "microaneurysm": (120.0, 12.0, 10.0),  # tiny round red dot
}


def _fundus_events(rng: np.random.Generator, size: int) -> list[tuple[str, float]]:
    """Lesion-like events, drawn without the label: (kind, reach in pixels). 4-30 per image
    (log-uniform), kinds 40 / 35 / 25 %, sizes log-uniform: exudate clusters 2-6 % of the image
    side, haemorrhages 1.2-3.4 %, microaneurysms 1.2 px to 0.9 % (at least 2 x 2 px)."""
    events = []
    for _ in range(_wide_count(rng, MIN_EVENTS, 30)):
        kind = LESION_KINDS["fundus"][int(rng.choice(3, p=(0.4, 0.35, 0.25)))]
        if kind == "hard_exudate":
            reach = _log_uniform(rng, 0.02, 0.06) * size
        elif kind == "haemorrhage":
            reach = _log_uniform(rng, 0.012, 0.034) * size
        else:
            reach = _log_uniform(rng, MIN_LESION_RADIUS_PX + 0.1, max(MIN_LESION_RADIUS_PX + 0.2, 0.009 * size))
        events.append((kind, max(reach, MIN_LESION_RADIUS_PX + 0.1)))
    return events


def _fundus_extent(reach: float) -> float:
    """Half side in pixels of the window that holds an event of ``reach`` (its dots included)."""
    return 1.6 * reach + 3.0


def _fundus_shape(shape, kind, px, py, reach, rng):
    """Opacity of one event over its window: ``(window, alpha)`` with alpha (h, w) float32 in [0, 1];
    the window reaches ``_fundus_extent(reach)`` around (px, py)."""
    height, width = shape
    window = _window(px, py, _fundus_extent(reach), height, width)
    rows, cols = window
    alpha = np.zeros((rows.stop - rows.start, cols.stop - cols.start), dtype=np.float32)

    def add(dot_window, dot_alpha):
        (r, c) = dot_window
        r0, r1 = max(r.start, rows.start), min(r.stop, rows.stop)
        c0, c1 = max(c.start, cols.start), min(c.stop, cols.stop)
        local = (slice(r0 - rows.start, r1 - rows.start), slice(c0 - cols.start, c1 - cols.start))
        part = dot_alpha[r0 - r.start : r1 - r.start, c0 - c.start : c1 - c.start]
        alpha[local] = 1.0 - (1.0 - alpha[local]) * (1.0 - part)  # the same as blending dot after dot

    if kind == "hard_exudate":
        for _ in range(int(rng.integers(6, 14))):
            dx, dy = np.clip(rng.normal(0, reach / 2.2, size=2), -0.9 * reach, 0.9 * reach)
            dot_r = rng.uniform(0.18, 0.38) * reach
            dot_window, coverage, _ = _blob(shape, px + dx, py + dy, dot_r, rng, aspect=rng.uniform(0.6, 1.0), wobble=0.2)
            add(dot_window, 0.92 * coverage)
    elif kind == "haemorrhage":
        dot_window, coverage, depth = _blob(shape, px, py, reach, rng, aspect=rng.uniform(0.55, 1.0), wobble=0.15)
        add(dot_window, coverage * (0.72 + 0.2 * depth))
    else:
        dot_window, coverage, _ = _blob(shape, px, py, reach, rng, aspect=1.0, wobble=0.03)
        add(dot_window, 0.9 * coverage)
    return window, alpha


# --------------------------------------------------------------------------------------------
# OCT B-scan
# --------------------------------------------------------------------------------------------


def _render_oct(size, forms, rng_bg, rng_lesion, rng_noise, draw_lesions):
    height, width = image_shape("oct", size)
    yy, xx = _grid(height, width)
    x = xx[0]
    u = (x - width / 2) / width  # -0.5 .. 0.5
    fovea_x = width * rng_bg.uniform(0.42, 0.58)
    # RPE (top of the band) curves like the back of the eye, tilted by the scan angle. Its depth in the
    # frame varies as much as a B-scan's does when the operator places it: drusen (on the RPE) can sit
    # anywhere from a third of the way down to near the bottom, so a fixed location prior (a centred
    # Gaussian) does not find them
    rpe = height * (rng_bg.uniform(*OCT_RPE_DEPTH) - rng_bg.uniform(0.0, 0.35) * u**2 + rng_bg.uniform(-0.08, 0.08) * u)
    pit = np.exp(-0.5 * ((x - fovea_x) / (width * rng_bg.uniform(0.06, 0.08))) ** 2)
    nasal = 1.0 if rng_bg.random() < 0.5 else -1.0
    side = np.clip(nasal * (x - fovea_x) / width, -0.5, 0.5)  # > 0 towards the optic nerve
    h = height
    rpe_thickness = 0.022 * h
    thickness = {  # pixels; the inner layers vanish in the foveal pit, the outer nuclear layer thickens
        "os": 0.022 * h,
        "ez": 0.011 * h,
        "myoid": 0.014 * h,
        "elm": 0.005 * h,
        "onl": (0.055 + 0.035 * pit) * h,
        "opl": 0.016 * h * (1 - 0.85 * pit),
        "inl": 0.03 * h * (1 - 0.9 * pit),
        "ipl": 0.03 * h * (1 - 0.9 * pit),
        "gcl": 0.033 * h * (1 - 0.95 * pit),
        "nfl": (0.022 + 0.05 * np.clip(side + 0.1, 0, None)) * h * (1 - 0.97 * pit),
    }

    # lesion-like events: dome-shaped lifts of the outer retina. In the lesion form (a druse) the RPE
    # rides on top, lifted off Bruch's membrane by a medium-reflective deposit; in the confounder form
    # the same deposit lies above a flat RPE. Per column the two forms hold the same layers with the
    # same thicknesses, only the order of the RPE band and the deposit differs, so they give the
    # same pixel values: only the lifted RPE tells a druse
    domes: list[np.ndarray] = []
    for half_width, peak in _oct_events(rng_lesion, width, height):
        for _ in range(60):
            centre = rng_lesion.uniform(0.06 * width + half_width, 0.94 * width - half_width)
            span = (x > centre - half_width - 4) & (x < centre + half_width + 4)
            if not any(dome[span].any() for dome in domes):
                break
        else:
            continue
        t = np.clip((x - centre) / half_width, -1.0, 1.0)
        domes.append((peak * (1 - t**2) ** 1.1).astype(np.float32))
    lesion_events, with_confounders = forms(len(domes))
    if not with_confounders:
        domes = [dome for k, dome in enumerate(domes) if k in lesion_events]
        lesion_events = set(range(len(domes)))
    confounders = {"deposit_above_rpe": len(domes) - len(lesion_events)}

    bm = rpe + rpe_thickness  # Bruch's membrane stays put

    def layered(with_lesions: bool, flat: bool = False) -> tuple[np.ndarray, dict]:
        """Noise-free reflectivity (H, W) and the layer boundaries, with or without the lesion events
        (``flat``: without any event)."""
        drawn = [] if flat else [dome for k, dome in enumerate(domes) if with_lesions or k not in lesion_events]
        lift = np.sum(drawn, axis=0) if drawn else np.zeros(width, dtype=np.float32)
        druse = np.zeros(width, dtype=bool)
        if with_lesions:
            for k in lesion_events:
                druse |= domes[k] > 0
        lifted = rpe - lift  # top of the RPE-deposit complex
        # boundaries from the RPE upwards; the outer retina rides on the lift and the outer nuclear
        # layer absorbs most of the displacement, so the inner retina barely moves
        boundaries = {}
        level = lifted
        for name in ("os", "ez", "myoid", "elm"):
            level = level - thickness[name]
            boundaries[name] = level
        level = level - np.maximum(thickness["onl"] - 0.9 * lift, 0.25 * thickness["onl"])
        boundaries["onl"] = level
        for name in ("opl", "inl", "ipl", "gcl", "nfl"):
            level = level - thickness[name]
            boundaries[name] = level
        # (top boundary of layer, reflectivity), from the vitreous down; columns without a lift hold
        # a zero-thickness deposit
        layers = [
            (boundaries["nfl"], 0.80),
            (boundaries["gcl"], 0.40),
            (boundaries["ipl"], 0.56),
            (boundaries["inl"], 0.20),
            (boundaries["opl"], 0.52),
            (boundaries["onl"], 0.13),
            (boundaries["elm"], 0.40),
            (boundaries["myoid"], 0.20),
            (boundaries["ez"], 0.85),
            (boundaries["os"], 0.36),
            (lifted, np.where(druse, 0.95, 0.58)),  # druse: the lifted RPE; else the deposit (if any)
            (np.where(druse, lifted + rpe_thickness, rpe), np.where(druse, 0.58, 0.95)),  # then the other
            (bm, np.zeros(width)),  # choroid, added below
        ]
        out = np.full((height, width), 0.03, dtype=np.float32)
        previous = 0.03
        for top, value in layers:
            out += (value - previous) * np.clip(yy - top[None, :] + 0.5, 0.0, 1.0)
            previous = value
        return out, boundaries

    img = layered(draw_lesions)[0]
    boundaries = layered(False, flat=True)[1]  # the vessels sit where they would without any event, whatever the label
    lesions = []
    if lesion_events:
        # each druse's mask: the pixels it changes, per column from the highest to the lowest changed
        # pixel (the displaced outer retina, the lifted RPE and the deposit); drusen share no columns
        change = np.abs(layered(True)[0] - layered(False)[0]) * 255.0
        for k in sorted(lesion_events):
            columns = ndimage.binary_dilation(domes[k] > 0, iterations=2)
            changed = (change > MASK_THRESHOLD) & columns[None, :]
            below_top = np.maximum.accumulate(changed, axis=0)
            above_bottom = np.maximum.accumulate(changed[::-1], axis=0)[::-1]
            mask = below_top & above_bottom
            if _big_enough(mask):
                lesions.append(Lesion("drusen", mask))

    below_bm = yy - bm[None, :]
    choroid_depth = h * rng_bg.uniform(0.13, 0.2)
    vessels = _smooth_noise(rng_bg, (height, width), (2.0 * size / 256, 4.0 * size / 256))
    choroid = (0.62 * np.exp(-np.clip(below_bm, 0, None) / choroid_depth) * np.clip(0.75 + 0.3 * vessels, 0.2, 1.2) + 0.05)
    img += np.where(below_bm > 0, choroid, 0.0)

    # retinal vessels in the inner layers cast shadows down through the outer retina
    for _ in range(int(rng_bg.integers(2, 5))):
        vx = rng_bg.uniform(0.05, 0.95) * width
        vy_top = boundaries["gcl"][min(width - 1, int(vx))]
        vr = rng_bg.uniform(0.006, 0.012) * width
        column = np.exp(-0.5 * ((x - vx) / vr) ** 2)
        img *= 1.0 - 0.45 * column[None, :] * (yy > vy_top + vr)
        img += 0.25 * np.exp(-0.5 * (((xx - vx) / vr) ** 2 + ((yy - vy_top) / vr) ** 2))

    # speckle: multiplicative, slightly elongated along the A-scan lateral direction
    speckle = np.exp(0.36 * _smooth_noise(rng_noise, (height, width), (0.6 * size / 256, 1.1 * size / 256)) - 0.065)
    img = img * speckle + 0.03 * np.abs(rng_noise.standard_normal((height, width)))
    pixels = np.clip(np.rint(255 * np.clip(img, 0, 1) ** 0.9), 0, 255).astype(np.uint8)

    return Rendered(pixels, lesions, confounders=confounders), (0, 0, width, height), ["top-left", "top-right", "bottom-left", "bottom-right"]


def _oct_events(rng: np.random.Generator, width: int, height: int) -> list[tuple[float, float]]:
    """Lesion-like events, drawn without the label: (half width, peak height) in pixels. 4-10 per
    scan; peaks log-uniform, 15 % small (2-5 px), the rest 5 px to 9 % of the scan height, half widths
    1.6-3.5 x the peak (at least 3 px), shrunk until they fit side by side in 85 % of the scan."""
    low, small = max(2.0, 2.0 * width / 256), 5.0 * width / 256
    high = max(small, 0.09 * height)
    plan = [[_log_uniform(rng, low, small) if rng.random() < 0.15 else _log_uniform(rng, small, high), rng.uniform(1.6, 3.5)]
            for _ in range(_wide_count(rng, MIN_EVENTS, 10))]
    for _ in range(30):
        if sum(2 * max(3.0, min(peak * ratio, 0.09 * width)) + 8 for peak, ratio in plan) <= 0.85 * width:
            break
        for entry in plan:
            entry[0] = max(low, entry[0] * 0.9)
    return [(float(np.clip(peak * ratio, 3.0, 0.09 * width)), float(peak)) for peak, ratio in plan]


# --------------------------------------------------------------------------------------------
# chest X-ray
# --------------------------------------------------------------------------------------------

# 12-bit stored value = _CXR_OFFSET + _CXR_GAIN * attenuation (attenuation in 0..1)
_CXR_OFFSET, _CXR_GAIN = 160.0, 3700.0
CXR_RESCALE_SLOPE, CXR_RESCALE_INTERCEPT = 1.0, -1024.0


def _render_cxr(size, forms, rng_bg, rng_lesion, rng_noise, draw_lesions):
    height = width = size
    yy, xx = _grid(height, width)
    u = xx / width
    v = yy / height
    shift_u, shift_v = rng_bg.uniform(-0.015, 0.015, size=2)
    u = u - shift_u
    v = v - shift_v
    lung_scale = rng_bg.uniform(0.94, 1.05)

    # body outline: neck widening into the shoulders
    half_width = 0.13 + 0.35 * _smoothstep(-0.02, 0.16, v)
    body = np.clip((half_width - np.abs(u - 0.5)) * width / 3.0, 0.0, 1.0)
    soft_tissue = body * (0.30 + 0.16 * np.clip(1 - ((u - 0.5) / np.maximum(half_width, 1e-3)) ** 2, 0, 1))

    # lungs: rounded apices, straight-ish lateral walls, cut below by the diaphragm domes and
    # medially by the mediastinum and heart
    def lung(centre_u, dome_top, dome_centre):
        a = 0.165 * lung_scale * (0.8 + 0.2 * _smoothstep(0.15, 0.45, v))
        vc = 0.36
        cap = (np.abs(u - centre_u) / a) ** 2.2 + (np.clip(vc - v, 0, None) / (0.24 * lung_scale)) ** 2.2
        dome = dome_top + 0.11 * ((u - dome_centre) / 0.17) ** 2
        return (cap < 1.0) & (v < dome)

    right = lung(0.30, rng_bg.uniform(0.69, 0.72), 0.30)
    left = lung(0.70, rng_bg.uniform(0.72, 0.75), 0.70)
    heart_u, heart_v = 0.55 + rng_bg.uniform(-0.01, 0.02), 0.65 + rng_bg.uniform(-0.01, 0.015)
    heart_a, heart_b, tilt = 0.175 * rng_bg.uniform(0.92, 1.1), 0.115, -0.5
    hu, hv = u - heart_u, v - heart_v
    heart = ((hu * math.cos(tilt) + hv * math.sin(tilt)) / heart_a) ** 2 + ((-hu * math.sin(tilt) + hv * math.cos(tilt)) / heart_b) ** 2 < 1
    mediastinum = (np.abs(u - 0.5) < 0.065 + 0.02 * _smoothstep(0.3, 0.5, v)) & (v > 0.05)
    knob = (u - 0.565) ** 2 + (v - 0.33) ** 2 < 0.035**2  # aortic knob
    lungs_hard = (right | left) & ~heart & ~mediastinum & ~knob
    lungs = ndimage.gaussian_filter(lungs_hard.astype(np.float32), 0.012 * size)

    atten = soft_tissue - 0.27 * lungs * body
    atten += 0.10 * ndimage.gaussian_filter((heart | mediastinum | knob).astype(np.float32), 0.006 * size) * body
    spine = np.exp(-0.5 * ((u - 0.5) / 0.03) ** 4) * _smoothstep(0.0, 0.1, v)
    vertebrae = 1.0 + 0.25 * np.cos(2 * math.pi * v / 0.055) * _smoothstep(0.4, 0.8, v)  # faint bodies behind the heart
    atten += 0.09 * spine * vertebrae * body
    atten -= 0.1 * np.exp(-0.5 * ((u - 0.5) / 0.013) ** 2) * (1 - _smoothstep(0.25, 0.33, v)) * body  # tracheal air
    below = (~(right | left)) & (v > 0.62) & (np.abs(u - 0.5) > 0.08)
    atten += 0.05 * ndimage.gaussian_filter(below.astype(np.float32), 0.01 * size) * body  # liver and spleen

    # bones and pulmonary vessels, drawn as polylines on a supersampled canvas
    scale = 2
    ribs = Image.new("L", (width * scale, height * scale), 0)
    rib_draw = ImageDraw.Draw(ribs)
    rib_width = 0.018 * size
    to_canvas = lambda pu, pv: ((pu + shift_u) * width * scale, (pv + shift_v) * height * scale)  # noqa: E731
    for side in (-1.0, 1.0):
        for k in range(10):
            v0 = 0.10 + 0.064 * k + rng_bg.normal(0, 0.004)
            # posterior rib: leaves the spine, arches up and out, then turns down the lateral wall
            reach = 0.19 + 0.02 * math.sin(math.pi * k / 9)
            points = [to_canvas(0.5 + side * (0.03 + reach * (1 + math.cos(phi))), v0 + 0.07 - 0.085 * math.sin(phi))
                      for phi in np.linspace(0.97 * math.pi, -0.45, 16)]
            pen = int(round(rib_width * scale * (1 + 0.3 * k / 9)))
            rib_draw.line(points, fill=125, width=pen, joint="curve")
            rib_draw.line(points, fill=80, width=max(1, int(round(pen * 0.45))), joint="curve")  # bright cortex, paler marrow
            if k > 6:
                continue  # the lower anterior ribs hide behind the diaphragm
            # anterior rib: fainter, from the lateral wall down towards the sternum
            points = [to_canvas(0.5 + side * (0.43 - 0.28 * t), v0 + 0.05 + 0.11 * t - 0.03 * math.sin(math.pi * t))
                      for t in np.linspace(0, 1, 8)]
            rib_draw.line(points, fill=55, width=int(round(rib_width * scale * 0.8)), joint="curve")
        clavicle = [to_canvas(0.5 + side * (0.05 + 0.3 * t), 0.17 - 0.075 * t + 0.025 * math.sin(math.pi * t))
                    for t in np.linspace(0, 1, 10)]
        rib_draw.line(clavicle, fill=255, width=int(round(0.026 * size * scale)), joint="curve")
    bone = np.asarray(ribs.reduce(scale), dtype=np.float32) / 255.0
    atten += 0.13 * bone * body

    tree = Image.new("L", (width * scale, height * scale), 0)
    tree_draw = ImageDraw.Draw(tree)
    for side in (-1.0, 1.0):
        hilum = ((0.5 + side * 0.1 + shift_u) * width, (0.44 + shift_v) * height)
        for base_angle in (-1.3, -0.8, -0.3, 0.2, 0.7, 1.2, 1.6):
            angle = math.atan2(math.sin(base_angle), side * math.cos(base_angle)) + rng_bg.normal(0, 0.12)
            _draw_tree(tree_draw, rng_bg, hilum, angle, angle, 0.008 * size, 0.32 * size, value=255,
                       inside=lambda px, py: 0 <= px < width and 0 <= py < height, scale=scale, step=0.015 * size,
                       steer=0.0, branch_prob=0.22, jitter=0.09, min_width=0.25)
    vessels = ndimage.gaussian_filter(np.asarray(tree.reduce(scale), dtype=np.float32) / 255.0, 0.4 * size / 256)
    # vessel markings fade towards the periphery, where the vessels are thin
    from_hilum = np.hypot(np.abs(u - 0.5) - 0.1, v - 0.44)
    hila = np.exp(-0.5 * (((np.abs(u - 0.5) - 0.1) / 0.04) ** 2 + ((v - 0.44) / 0.06) ** 2))
    atten += (0.07 * vessels * np.exp(-from_hilum / 0.2) + 0.06 * hila) * lungs
    atten += 0.015 * _smooth_noise(rng_bg, (height, width), 0.02 * size) * body
    atten = ndimage.gaussian_filter(atten, 0.6 * size / 256)

    # lesion-like events in the lung fields. The lesion form is a nodular opacity, densest at its
    # centre with an ill-defined margin; the confounder form (a reticular shadow: overlapping
    # interstitial markings) has the very same densities on the very same pixels, shuffled, so it is
    # mottled where the opacity is smooth. Same pixel values, other arrangement: only the texture
    # tells an opacity
    inner = ndimage.distance_transform_edt(lungs_hard)
    events = []
    taken: list[tuple[float, float, float, float]] = []
    for radius in _cxr_events(rng_lesion, size):
        candidates = np.flatnonzero(inner.ravel() > 0.9 * radius)
        if candidates.size == 0:
            continue
        for _ in range(60):
            pick = int(candidates[rng_lesion.integers(candidates.size)])
            py, px = divmod(pick, width)
            box = (px - 1.4 * radius, py - 1.4 * radius, px + 1.4 * radius, py + 1.4 * radius)
            if not any(_boxes_overlap(box, other, margin=2.0) for other in taken):
                break
        else:
            continue
        window, coverage, depth = _blob((height, width), px + 0.5, py + 0.5, radius, rng_lesion, aspect=rng_lesion.uniform(0.65, 1.0), wobble=0.2)
        mottle = np.clip(1.0 + 0.25 * _smooth_noise(rng_lesion, coverage.shape, 0.015 * size), 0.5, 1.5)
        density = rng_lesion.uniform(0.24, 0.34) * coverage * (0.25 + 0.75 * _smoothstep(0.0, 0.6, depth)) * mottle * lungs_hard[window]
        if not _big_enough(density * _CXR_GAIN > MASK_THRESHOLD):
            continue  # a sliver at the lung edge: no event (whatever the label)
        taken.append(box)
        events.append((window, density.astype(np.float32)))
    # the confounder's arrangement, drawn for every event whatever its form: the densities in
    # ascending order fill grains of grain x grain pixels taken in random order, so each grain is
    # nearly uniform and neighbouring grains differ (a mottle that survives resizing)
    grain = max(1, int(round(size / 256)))
    shuffles = []
    for window, density in events:
        rows, cols = np.nonzero(density > 0)
        rows, cols = rows + window[0].start, cols + window[1].start
        grains = (rows // grain) * (width // grain + 1) + cols // grain
        _, grain_index = np.unique(grains, return_inverse=True)
        grain_order = rng_lesion.random(int(grain_index.max()) + 1)
        slots = np.lexsort((rng_lesion.random(grain_index.size), grain_order[grain_index]))  # pixels, grain by grain
        values = np.argsort(density[density > 0], kind="stable")  # pixels, faintest first
        source = np.empty_like(slots)
        source[slots] = values  # the k-th slot takes the k-th faintest value
        shuffles.append(source)
    lesion_events, with_confounders = forms(len(events))
    confounders = {"reticular_shadow": (len(events) - len(lesion_events)) if with_confounders else 0}
    lesions = []
    for number, (window, density) in enumerate(events):
        if number in lesion_events:
            mask = np.zeros((height, width), dtype=bool)
            mask[window] = density * _CXR_GAIN > MASK_THRESHOLD
            if draw_lesions:
                atten[window] += density
            if _big_enough(mask):
                lesions.append(Lesion("opacity", mask))
            continue
        if not with_confounders:
            continue
        footprint = density > 0
        patch = np.zeros_like(density)
        patch[footprint] = density[footprint][shuffles[number]]
        atten[window] += patch

    atten += 0.01 * rng_noise.standard_normal((height, width)).astype(np.float32)  # quantum noise
    stored = np.clip(np.rint(_CXR_OFFSET + _CXR_GAIN * atten), 0, 4095).astype(np.uint16)
    return Rendered(stored, lesions, confounders=confounders), (0, 0, width, height), ["top-left", "top-right"]


def _cxr_events(rng: np.random.Generator, size: int) -> list[float]:
    """Lesion-like events, drawn without the label: radii in pixels, 6-24 per image; a tenth are small
    (1.2-4 px: a 2 x 2 px nodule, whose mottled form looks much the same), the rest log-uniform from 4 px to
    9 % of the image side (a large mass)."""
    low, small = MIN_LESION_RADIUS_PX + 0.1, 4.0 * size / 256
    high = max(small, 0.09 * size)
    return [_log_uniform(rng, low, small) if rng.random() < 0.1 else _log_uniform(rng, small, high)
            for _ in range(_wide_count(rng, 6, 24))]


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def cxr_window() -> tuple[float, float]:
    """Default (center, width) of the synthetic radiographs in rescaled units (after slope/intercept):
    it spans attenuation 0.02 (air) to 0.92 (dense bone)."""
    low = _CXR_OFFSET + _CXR_GAIN * 0.02
    high = _CXR_OFFSET + _CXR_GAIN * 0.92
    to_rescaled = lambda s: s * CXR_RESCALE_SLOPE + CXR_RESCALE_INTERCEPT  # noqa: E731
    return (to_rescaled(low) + to_rescaled(high)) / 2, to_rescaled(high) - to_rescaled(low)


def _dicom_bytes(stored: np.ndarray, seed: int, index: int, burned_in: bool) -> bytes:
    """A DX DICOM file (MONOCHROME2, 12 bits stored in 16) with FAKE patient identifiers, so that
    de-identification has something to remove. UIDs derive from (seed, index): reproducible."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    height, width = stored.shape
    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    entropy = ["softcam-synth", str(GENERATOR_VERSION), str(seed)]
    study_uid = generate_uid(entropy_srcs=entropy + ["study", str(index)])
    series_uid = generate_uid(entropy_srcs=entropy + ["series", str(index)])
    sop_uid = generate_uid(entropy_srcs=entropy + ["sop", str(index)])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.Manufacturer = "SoftCAM synthetic phantom"
    ds.SeriesDescription = "Synthetic chest PA"
    ds.StudyDescription = "SYNTHETIC DATA - NOT A PATIENT"
    # fake identifiers: present on purpose, removed by softcam_core.imaging.deidentify
    ds.PatientName = f"SYNTH^PATIENT^{index:04d}"
    ds.PatientID = f"SYN{seed:04d}{index:06d}"
    ds.PatientBirthDate = f"19{40 + (seed + index) % 50:02d}{1 + index % 12:02d}{1 + index % 28:02d}"
    ds.PatientSex = "F" if index % 2 else "M"
    ds.InstitutionName = "Synthetic General Hospital"
    ds.InstitutionAddress = "1 Phantom Road, Nowhere"
    ds.ReferringPhysicianName = "SYNTH^REFERRER"
    ds.OperatorsName = "SYNTH^OPERATOR"
    ds.AccessionNumber = f"ACC{seed:04d}{index:06d}"
    ds.StudyID = f"{index:06d}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240102"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.BurnedInAnnotation = "YES" if burned_in else "NO"
    spacing = round(430.0 / width, 6)  # a 43 cm detector
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = height, width
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleSlope = CXR_RESCALE_SLOPE
    ds.RescaleIntercept = CXR_RESCALE_INTERCEPT
    ds.RescaleType = "US"
    center, width_ = cxr_window()
    ds.WindowCenter = round(center, 1)
    ds.WindowWidth = round(width_, 1)
    ds.VOILUTFunction = "LINEAR"
    ds.PixelData = stored.astype("<u2").tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def assign_labels_and_splits(n: int, classes: tuple[str, ...], split: tuple[float, float, float], rng: np.random.Generator):
    """Balanced labels (class counts differ by at most one) in a seeded order, and a split stratified
    per class in which every split holds every class whenever that class has >= 3 images.

    Returns (labels list[str], splits list[str]), one entry per image index.
    """
    labels = [classes[i % len(classes)] for i in range(n)]
    labels = [labels[i] for i in rng.permutation(n)]
    splits = [""] * n
    for name in classes:
        members = [i for i in range(n) if labels[i] == name]
        members = [members[i] for i in rng.permutation(len(members))]
        count = len(members)
        n_test = int(round(split[2] * count))
        n_val = int(round(split[1] * count))
        if count >= 3:  # every split gets at least one of each class
            n_test = max(1, n_test) if split[2] > 0 else 0
            n_val = max(1, n_val) if split[1] > 0 else 0
            n_val = min(n_val, count - n_test - (1 if split[0] > 0 else 0))
        n_train = count - n_test - n_val
        for position, i in enumerate(members):
            splits[i] = "train" if position < n_train else "val" if position < n_train + n_val else "test"
    return labels, splits


def _validate(modality, n, seed, size, artifact_rate, split):
    if modality not in MODALITIES:
        raise SynthError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise SynthError(f"--n must be a positive number of images, got {n!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SynthError(f"--seed must be a non-negative integer, got {seed!r}")
    if not isinstance(size, (int, np.integer)) or not 32 <= size <= 4096:
        raise SynthError(f"--size must be between 32 and 4096 pixels, got {size!r}")
    if not 0.0 <= float(artifact_rate) <= 1.0:
        raise SynthError(f"--artifact-rate must be between 0 and 1, got {artifact_rate!r}")
    if len(split) != 3 or any(f < 0 for f in split) or not math.isclose(sum(split), 1.0, abs_tol=1e-6):
        raise SynthError(f"split fractions (train, val, test) must be three non-negative numbers summing to 1, got {split!r}")


def make_cohort(
    modality: str,
    n: int,
    seed: int,
    out: str | os.PathLike,
    *,
    size: int = 256,
    artifact_rate: float = 0.0,
    grades: bool = False,
    split: tuple[float, float, float] = (0.6, 0.2, 0.2),
    confounders: bool = True,
    progress: bool = False,
) -> Path:
    """Write a deterministic synthetic cohort of ``n`` images to ``out`` and return its path.

    ``modality``: fundus | oct | cxr. ``size``: image side in pixels (OCT: width; height is
    round(0.97 size)). Classes: healthy / diseased, or with ``grades`` grade0 (no lesions),
    grade1 (few, small) and grade2 (many, large); counts balanced to within one image.
    ``artifact_rate``: fraction of the non-healthy images that get the burned-in shortcut tag (never
    a healthy one). ``split``: train/val/test fractions, stratified per class. ``confounders=False``:
    the easy variant without lesion look-alikes (docs/synth.md), never a benchmark. An existing
    ``out`` is replaced only when it is an earlier synthetic cohort (it has ``synth_meta.json``)
    or empty. Same arguments give byte-identical files.
    """
    split = tuple(float(f) for f in split)
    _validate(modality, n, seed, size, artifact_rate, split)
    n, seed, size = int(n), int(seed), int(size)
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "synth_meta.json").is_file())):
        raise SynthError(f"{out}: exists and is not an empty folder or an earlier synthetic cohort; choose another --out")

    classes = GRADE_CLASSES if grades else BINARY_CLASSES
    cohort_rng = np.random.default_rng(np.random.SeedSequence([seed, MODALITIES.index(modality), _COHORT_STREAM]))
    labels, splits = assign_labels_and_splits(n, classes, split, cohort_rng)
    diseased = [i for i in range(n) if labels[i] != classes[0]]
    n_artifact = int(round(artifact_rate * len(diseased)))
    with_artifact = set(int(i) for i in cohort_rng.permutation(np.array(diseased, dtype=int))[:n_artifact]) if diseased else set()

    # build in a sibling folder and swap it in at the end, so an interrupted run leaves no half cohort
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "images").mkdir(parents=True)
    (staging / "masks").mkdir()

    categories = [{"id": k + 1, "name": kind, "supercategory": "lesion"} for k, kind in enumerate(LESION_KINDS[modality])]
    category_id = {c["name"]: c["id"] for c in categories}
    coco_images, coco_annotations, meta_images, rows = [], [], {}, []
    indices = range(n)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"synth {modality}", unit="img")
    try:
        for i in indices:
            stem = f"{modality}_{i:04d}"
            file_name = stem + IMAGE_SUFFIX[modality]
            rendered = render_image(modality, size, seed, i, labels[i], artifact=i in with_artifact, confounders=confounders)
            height, width = rendered.pixels.shape[:2]
            if modality == "cxr":
                data = _dicom_bytes(rendered.pixels, seed, i, burned_in=rendered.artifact_box is not None)
            else:
                data = _png_bytes(rendered.pixels)
            (staging / "images" / file_name).write_bytes(data)
            (staging / "masks" / f"{stem}.png").write_bytes(_png_bytes(rendered.mask().astype(np.uint8) * 255))
            rows.append((file_name, labels[i], splits[i]))
            coco_images.append({"id": i + 1, "file_name": file_name, "width": width, "height": height})
            lesion_records = []
            for lesion in rendered.lesions:
                x0, y0, x1, y1 = lesion.box
                area = int(lesion.mask.sum())
                coco_annotations.append({
                    "id": len(coco_annotations) + 1, "image_id": i + 1, "category_id": category_id[lesion.kind],
                    "bbox": [float(v) for v in Box(x0, y0, x1, y1).to_xywh()], "area": float(area), "iscrowd": 0,
                })
                lesion_records.append({"kind": lesion.kind, "box": [x0, y0, x1, y1], "area": area})
            counts = {kind: sum(1 for lesion in rendered.lesions if lesion.kind == kind) for kind in LESION_KINDS[modality]}
            meta_images[file_name] = {
                "stem": stem, "index": i, "label": labels[i], "split": splits[i], "width": width, "height": height,
                "lesion_counts": counts, "lesions": lesion_records,
                "artifact": None if rendered.artifact_box is None else {"text": ARTIFACT_TEXT[modality], "box": list(rendered.artifact_box)},
                "confounders": rendered.confounders,
                "seed_entropy": [seed, MODALITIES.index(modality), i],
            }

        with open(staging / "labels.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["image", "label", "split"])
            writer.writerows(rows)
        coco = {
            "info": {"description": f"SoftCAM synthetic {modality} cohort", "version": str(GENERATOR_VERSION),
                     "contributor": "softcam synth", "seed": seed},
            "images": coco_images, "annotations": coco_annotations, "categories": categories,
        }
        (staging / "annotations.json").write_text(json.dumps(coco, indent=1) + "\n", encoding="utf-8")
        meta = {
            "generator": "softcam_core.synth", "version": GENERATOR_VERSION, "modality": modality, "n": n, "seed": seed,
            "size": size, "artifact_rate": float(artifact_rate), "artifact_text": ARTIFACT_TEXT[modality],
            "grades": bool(grades), "confounders": bool(confounders), "split_fractions": list(split), "classes": list(classes),
            "lesion_kinds": list(LESION_KINDS[modality]), "images": meta_images,
        }
        if modality == "cxr":
            center, width_ = cxr_window()
            meta["dicom"] = {"bits_stored": 12, "rescale_slope": CXR_RESCALE_SLOPE, "rescale_intercept": CXR_RESCALE_INTERCEPT,
                             "window_center": round(center, 1), "window_width": round(width_, 1)}
        (staging / "synth_meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def register_cli(subparsers) -> None:
    """Add ``softcam synth`` to the CLI."""
    parser = subparsers.add_parser(
        "synth",
        help="write a deterministic synthetic cohort (fundus, OCT or DICOM chest X-ray) with lesion masks and boxes",
        description="Render a synthetic cohort with exact ground-truth lesions: images/, labels.csv "
        "(image,label,split), annotations.json (COCO boxes), masks/<stem>.png and synth_meta.json. "
        "Same arguments give byte-identical files.",
    )
    parser.add_argument("--modality", required=True, choices=MODALITIES, help="kind of image to render")
    parser.add_argument("--n", type=int, required=True, help="number of images (classes balanced)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; an earlier cohort there is replaced)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (OCT: width; height is 0.97 x) (default 256)")
    parser.add_argument("--artifact-rate", type=float, default=0.0,
                        help="fraction of diseased images that carry a burned-in shortcut tag (default 0)")
    parser.add_argument("--grades", action="store_true", help="three grades by lesion load (grade0..grade2) instead of healthy/diseased")
    parser.add_argument("--no-confounders", dest="confounders", action="store_false",
                        help="easy variant: no lesion look-alikes, so global intensity statistics give the class away "
                        "(for demos; never a benchmark)")
    parser.set_defaults(func=_cli_synth)


def _cli_synth(args) -> int:
    out = make_cohort(args.modality, args.n, args.seed, args.out, size=args.size, artifact_rate=args.artifact_rate,
                      grades=args.grades, confounders=args.confounders, progress=True)
    with open(out / "labels.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    by_class = {}
    by_split = {}
    for row in rows:
        by_class[row["label"]] = by_class.get(row["label"], 0) + 1
        by_split[row["split"]] = by_split.get(row["split"], 0) + 1
    classes = ", ".join(f"{count} {name}" for name, count in sorted(by_class.items()))
    splits = " / ".join(f"{name} {by_split.get(name, 0)}" for name in SPLITS)
    print(f"wrote {len(rows)} {args.modality} images ({classes}; {splits}) to {out}")
    return 0
