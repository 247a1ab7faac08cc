"""Deterministic synthetic fundus, OCT and chest X-ray cohorts: a fair benchmark with exact lesion masks.

``make_cohort`` (and the ``softcam synth`` command) renders phantoms that look like their modality
and writes, inside ``out``::

    images/<modality>_<index>.png|.dcm   fundus RGB PNG, OCT grey PNG (W x round(0.97 W)), CXR DICOM
    labels.csv                           image,label,split (label = class name)
    annotations.json                     COCO: one box per lesion object, original image pixels
    masks/<stem>.png                     uint8 0/255 union of the lesions, same H x W as the image
    synth_meta.json                      per-image facts: lesion counts and boxes, confounder counts,
                                         artifact box (or null), seeds; ``artifact_images`` lists the
                                         images that carry the shortcut artifact

Fair by construction (generator version 2; docs/synth.md has the details and the measured figures):

* Only the lesions discriminate. Anatomy, acquisition (exposure, colour balance, gamma, noise) and
  class-independent *confounders* (lesion look-alikes of the same brightness and size: fundus
  drusen, glints, reflexes, pigment spots, naevi, dark-red vessel knots; OCT RPE undulations,
  hyper-reflective foci, vessel shadows; CXR granulomas, end-on vessels, soft shadows, nipple
  shadows, ECG electrodes) come from random streams that never see the label: a diseased image
  without its lesions is pixel for pixel its healthy twin.
* Lesion counts vary from one (a quarter of the diseased images) to two dozen, sizes from a
  2-3 px dot (``MIN_LESION_RADIUS_PX``) to a large blob, anywhere in the field of view.
* A lesion's mask holds the pixels it changes (by more than ``MASK_THRESHOLD`` on the noise-free
  render), so the masks carry >= 95 % (in practice > 99.9 %) of the |diseased - lesion-free|
  difference; OCT drusen masks span the lifted RPE, the deposit and the outer retina they displace.

Same arguments give byte-identical files: every random draw comes from a ``numpy`` generator
seeded by ``(seed, modality, image index, stream)``, nothing reads the clock, and the DICOM UIDs
are derived from the same numbers.
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

GENERATOR_VERSION = 2
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

# random streams per image: the background (anatomy, acquisition, confounders) never depends on the
# label, so healthy and diseased images differ only by their lesions (and, when asked for, by the artifact)
_STREAM_BACKGROUND, _STREAM_LESIONS, _STREAM_NOISE, _STREAM_ARTIFACT = 0, 1, 2, 3
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

# A lesion's mask holds the pixels it changes by more than this many output units (grey levels for
# fundus and OCT, 12-bit stored values for CXR), measured on the noise-free float render before the
# per-image exposure transform: its anti-aliased rim included, so the mask carries (nearly) all of
# the |with lesion - without lesion| difference of the written image.
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
    ``confounders``: how many class-independent lesion look-alikes of each kind were drawn."""

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


def _lesion_count(load: str, rng: np.random.Generator) -> int:
    """Lesion objects to place: binary 'moderate' one lesion in a quarter of the images, else 2-24
    (log-uniform); grade1 ('mild') 1-4; grade2 ('severe') 10-24."""
    if load == "none":
        return 0
    if load == "mild":
        return int(rng.integers(1, 5))
    if load == "severe":
        return int(rng.integers(10, 25))
    return 1 if rng.random() < 0.25 else _wide_count(rng, 2, 24)


def _size_range(load: str) -> tuple[float, float]:
    """Where in its kind's size range (0 smallest .. 1 largest, log scale) a lesion may fall."""
    return {"none": (0.0, 1.0), "moderate": (0.0, 1.0), "mild": (0.0, 0.55), "severe": (0.45, 1.0)}[load]


def _sized(rng: np.random.Generator, load: str, low: float, high: float) -> float:
    """A lesion dimension in [low, high] pixels, log-uniform over the part of the range ``load`` allows."""
    a, b = _size_range(load)
    lo, hi = math.log(low), math.log(max(high, low))
    return float(math.exp(lo + (hi - lo) * rng.uniform(a, b)))


def _soft_spot(shape: tuple[int, int], center_x: float, center_y: float, sigma: float, *, aspect: float = 1.0,
               angle: float = 0.0, truncate: float = 2.5) -> tuple[tuple[slice, slice], np.ndarray]:
    """A Gaussian spot (no hard edge): ``(window, profile)`` with profile (h, w) float32 in [0, 1], 1
    at the centre, exactly 0 beyond ``truncate`` sigmas (so its footprint is finite). ``sigma`` is in
    pixels along the first axis, ``aspect`` the ratio of the second axis to the first."""
    reach = truncate * sigma * max(1.0, aspect) + 1.0
    rows, cols = _window(center_x, center_y, reach, *shape)
    yy, xx = _grid(*shape)
    dx = xx[rows, cols] - center_x
    dy = yy[rows, cols] - center_y
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = (-dx * math.sin(angle) + dy * math.cos(angle)) / aspect
    d2 = (u * u + v * v) / (sigma * sigma)
    floor = math.exp(-0.5 * truncate * truncate)
    profile = np.clip((np.exp(-0.5 * d2) - floor) / (1.0 - floor), 0.0, 1.0).astype(np.float32)
    return (rows, cols), profile


def _composite(img: np.ndarray, window, alpha: np.ndarray, colour) -> None:
    """Alpha-blend ``colour`` into ``img[window]`` in place; ``alpha`` (h, w) in [0, 1]."""
    if img.ndim == 3:
        a = alpha[..., None]
        img[window] = img[window] * (1 - a) + np.asarray(colour, dtype=np.float32) * a
    else:
        img[window] = img[window] * (1 - alpha) + float(colour) * alpha


def _lesion_mask(shape: tuple[int, int], window, delta: np.ndarray) -> np.ndarray:
    """Bool (H, W) mask of the pixels of ``window`` where ``delta`` (h, w[, c]) exceeds MASK_THRESHOLD."""
    change = np.abs(delta)
    if change.ndim == 3:
        change = change.max(axis=2)
    mask = np.zeros(shape, dtype=bool)
    mask[window] = change > MASK_THRESHOLD
    return mask


def _big_enough(mask: np.ndarray) -> bool:
    box = _box_of(mask)
    return box is not None and min(box[2] - box[0], box[3] - box[1]) >= MIN_LESION_SIDE_PX


def render_image(
    modality: str,
    size: int,
    seed: int,
    index: int,
    label: str,
    *,
    artifact: bool = False,
    draw_lesions: bool = True,
) -> Rendered:
    """Render image ``index`` of a cohort.

    ``label`` is a class name (healthy/diseased or grade0..2) and sets the lesion load; everything
    else (anatomy, acquisition, the lesion look-alike confounders) comes from random streams that
    never see the label. With ``draw_lesions=False`` the same image is rendered without its lesions
    (every other random draw unchanged, the lesion masks still computed), which is how the tests
    check that the masks cover the pixels the lesions changed.
    """
    load = _lesion_load(label)
    rng_bg = _rng(seed, modality, index, _STREAM_BACKGROUND)
    rng_lesion = _rng(seed, modality, index, _STREAM_LESIONS)
    rng_noise = _rng(seed, modality, index, _STREAM_NOISE)
    renderer = {"fundus": _render_fundus, "oct": _render_oct, "cxr": _render_cxr}[modality]
    rendered, region, corners = renderer(size, load, rng_bg, rng_lesion, rng_noise, draw_lesions)
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

# lesion colours (RGB, before the per-image exposure and colour balance)
_EXUDATE_RGB = (252.0, 224.0, 60.0)  # waxy, saturated yellow, sharp-edged, in clusters
_HAEMORRHAGE_RGB = (105.0, 10.0, 6.0)
_MICROANEURYSM_RGB = (125.0, 12.0, 10.0)
# confounder colours: lesion-like in brightness, told apart only by hue, edge and context
_DRUSE_RGB = (236.0, 222.0, 185.0)  # as bright, but a pale whitish yellow, soft-edged, isolated
_GLINT_RGB = (252.0, 246.0, 238.0)  # specular reflex: white
_PIGMENT_RGB = (50.0, 40.0, 36.0)  # dark greyish brown
_NAEVUS_RGB = (96.0, 84.0, 74.0)  # slate grey
_KNOT_RGB = (108.0, 16.0, 12.0)  # dark red, on a vessel (crossing, kink, end-on segment)


def _render_fundus(size, load, rng_bg, rng_lesion, rng_noise, draw_lesions):
    height = width = size
    shape = (height, width)
    yy, xx = _grid(height, width)
    ref = size / 256.0  # confounder sizes are set at 256 px and scale with the image
    # acquisition, drawn first and never from the label: exposure, colour balance, gamma, sensor noise
    exposure = rng_bg.uniform(0.75, 1.2)
    balance = np.array([1.0, rng_bg.uniform(0.85, 1.15), rng_bg.uniform(0.8, 1.25)], dtype=np.float32)
    gamma = rng_bg.uniform(0.8, 1.25)
    noise_sigma = rng_bg.uniform(1.0, 3.0)

    cx = width / 2 + rng_bg.uniform(-0.01, 0.01) * size
    cy = height / 2 + rng_bg.uniform(-0.01, 0.01) * size
    radius = rng_bg.uniform(0.44, 0.47) * size
    r = np.hypot(xx - cx, yy - cy) / radius
    fov = np.clip((1.0 - r) * radius + 0.5, 0.0, 1.0)  # anti-aliased field-of-view stop

    eye = 1.0 if rng_bg.random() < 0.5 else -1.0  # +1: disc on the right (a right eye in this view)
    disc_x = cx + eye * rng_bg.uniform(0.40, 0.48) * radius
    disc_y = cy + rng_bg.uniform(-0.06, 0.04) * radius
    disc_r = rng_bg.uniform(0.09, 0.13) * radius
    fovea_x = disc_x - eye * rng_bg.uniform(0.66, 0.74) * radius
    fovea_y = disc_y + rng_bg.uniform(0.02, 0.08) * radius

    # retina: orange-red, pigmentation varies between people; illumination falls off to the rim
    red = rng_bg.uniform(180, 232)
    base = np.array([red, red * rng_bg.uniform(0.32, 0.5), red * rng_bg.uniform(0.1, 0.24)], dtype=np.float32)
    light_dx, light_dy = rng_bg.uniform(-0.2, 0.2, size=2)
    rl = np.hypot((xx - cx) / radius - light_dx, (yy - cy) / radius - light_dy)
    illumination = 1.02 - rng_bg.uniform(0.15, 0.4) * rl**2 - 0.25 * np.clip(r, 0, 1) ** 8
    coarse, fine = rng_bg.uniform(0.02, 0.08), rng_bg.uniform(0.01, 0.035)
    texture = 1.0 + coarse * _smooth_noise(rng_bg, shape, size / 40) + fine * _smooth_noise(rng_bg, shape, size / 120)
    shade = illumination * texture
    macula = np.exp(-((xx - fovea_x) ** 2 + (yy - fovea_y) ** 2) / (2 * (0.16 * radius) ** 2))
    fovea = np.exp(-((xx - fovea_x) ** 2 + (yy - fovea_y) ** 2) / (2 * (0.035 * radius) ** 2))
    pigment_depth = rng_bg.uniform(0.6, 1.3)
    # macular pigment absorbs blue and green more than red
    macula_gain = np.stack([1 - pigment_depth * (0.25 * macula + 0.15 * fovea), 1 - pigment_depth * (0.40 * macula + 0.25 * fovea),
                            1 - pigment_depth * (0.45 * macula + 0.3 * fovea)], axis=-1)
    img = base[None, None, :] * shade[..., None] * np.clip(macula_gain, 0.1, 1.0)

    # optic disc: bright yellowish rim around a paler cup
    disc_d = np.hypot(xx - disc_x, yy - disc_y)
    disc_alpha = 1.0 - _smoothstep(disc_r * 0.85, disc_r * 1.08, disc_d)
    cup_x = disc_x + eye * 0.12 * disc_r
    cup_ratio = rng_bg.uniform(0.2, 0.5)
    cup_alpha = 1.0 - _smoothstep(disc_r * cup_ratio, disc_r * (cup_ratio + 0.3), np.hypot(xx - cup_x, yy - disc_y))
    disc_colour = np.array([250, 185, 105], dtype=np.float32) * rng_bg.uniform(0.85, 1.02)
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
    calibre = rng_bg.uniform(0.85, 1.2)
    for draw, vessel_width in ((ImageDraw.Draw(canvas_arteries), 0.016 * calibre), (ImageDraw.Draw(canvas_veins), 0.022 * calibre)):
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

    confounders = _fundus_confounders(img, rng_bg, ref, (cx, cy, radius), (fovea_x, fovea_y), veins + arteries)

    # lesions: anywhere in the field, clear of the optic disc and of each other
    lesions: list[Lesion] = []
    taken: list[tuple[float, float, float, float]] = []
    for kind, extent in _fundus_plan(load, rng_lesion, size):
        reach = _fundus_reach(extent)
        for _ in range(80):
            angle, spread = rng_lesion.uniform(0, 2 * math.pi), math.sqrt(rng_lesion.random())
            px = cx + spread * (0.92 * radius - reach) * math.cos(angle)
            py = cy + spread * (0.92 * radius - reach) * math.sin(angle)
            if math.hypot(px - disc_x, py - disc_y) < disc_r * 1.3 + reach:
                continue
            box = (px - reach, py - reach, px + reach, py + reach)
            if any(_boxes_overlap(box, other, margin=2.0) for other in taken):
                continue
            break
        else:
            continue  # crowded field: skip this lesion rather than overlap another
        window, patch, mask = _fundus_lesion(img, kind, px, py, extent, rng_lesion)
        if _big_enough(mask):  # always, given MIN_LESION_RADIUS_PX; a lesion too small is not drawn
            taken.append(box)
            lesions.append(Lesion(kind, mask))
            if draw_lesions:
                img[window] = patch

    # acquisition: exposure and colour balance, gamma, sensor noise, then the field stop
    img = 255.0 * (np.clip(img * (exposure * balance), 0.0, 255.0) / 255.0) ** gamma
    img += noise_sigma * rng_noise.standard_normal(img.shape, dtype=np.float32)
    img = img * fov[..., None]
    pixels = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    # the tag goes in a corner of the square circumscribing the retina (what the fundus crop keeps),
    # outside the circle
    region = (cx - radius, cy - radius, cx + radius, cy + radius)
    return Rendered(pixels, lesions, confounders=confounders), region, ["top-left", "top-right", "bottom-left", "bottom-right"]


def _fundus_confounders(img, rng, ref, circle, fovea, vessels) -> dict[str, int]:
    """Draw the class-independent lesion look-alikes into ``img`` (H, W, 3 float, in place) from the
    background stream ``rng``; returns their counts. ``ref`` = image side / 256; ``circle`` = (cx, cy,
    radius) of the field; ``vessels`` (H, W) in [0, 1] the vessel coverage."""
    shape = img.shape[:2]
    cx, cy, radius = circle
    on_vessel = np.flatnonzero(vessels.ravel() > 0.6)

    def anywhere(limit=0.93):
        angle, spread = rng.uniform(0, 2 * math.pi), math.sqrt(rng.random()) * limit * radius
        return cx + spread * math.cos(angle), cy + spread * math.sin(angle)

    def near_macula():
        for _ in range(20):
            x, y = fovea[0] + rng.normal(0, 0.3) * radius, fovea[1] + rng.normal(0, 0.3) * radius
            if math.hypot(x - cx, y - cy) < 0.93 * radius:
                return x, y
        return anywhere()

    def vessel_point():
        if on_vessel.size == 0:
            return anywhere()
        y, x = divmod(int(on_vessel[rng.integers(on_vessel.size)]), shape[1])
        return x + rng.uniform(0, 1), y + rng.uniform(0, 1)

    counts = {}
    # drusen (soft, pale yellow-white dots, mostly around the macula)
    counts["druse"] = _wide_count(rng, 0, 40)
    for _ in range(counts["druse"]):
        x, y = near_macula() if rng.random() < 0.6 else anywhere()
        window, profile = _soft_spot(shape, x, y, _log_uniform(rng, 0.8, 3.6) * ref, aspect=rng.uniform(0.7, 1.0),
                                     angle=rng.uniform(0, math.pi))
        colour = np.asarray(_DRUSE_RGB, np.float32) * rng.uniform(0.94, 1.02)
        _composite(img, window, rng.uniform(0.45, 0.9) * profile, colour)
    # specular glints: tiny sharp white dots along the vessels and the macular ring
    counts["glint"] = _wide_count(rng, 0, 30)
    for _ in range(counts["glint"]):
        x, y = vessel_point() if rng.random() < 0.5 else near_macula()
        window, coverage, _ = _blob(shape, x, y, _log_uniform(rng, 1.1, 2.8) * ref, rng, aspect=rng.uniform(0.5, 1.0), wobble=0.1)
        _composite(img, window, rng.uniform(0.5, 0.85) * coverage, _GLINT_RGB)
    # broad reflex sheen (young retinas): elongated, soft, faint
    counts["reflex"] = _wide_count(rng, 0, 6)
    for _ in range(counts["reflex"]):
        x, y = vessel_point() if rng.random() < 0.5 else anywhere(0.8)
        window, profile = _soft_spot(shape, x, y, _log_uniform(rng, 3.0, 12.0) * ref, aspect=rng.uniform(0.25, 0.5),
                                     angle=rng.uniform(0, math.pi))
        _composite(img, window, rng.uniform(0.15, 0.4) * profile, _GLINT_RGB)
    # pigment spots: sharp, dark brown
    counts["pigment"] = _wide_count(rng, 0, 25)
    for _ in range(counts["pigment"]):
        x, y = anywhere()
        window, coverage, _ = _blob(shape, x, y, _log_uniform(rng, 1.1, 5.0) * ref, rng, aspect=rng.uniform(0.5, 1.0), wobble=0.2)
        colour = np.asarray(_PIGMENT_RGB, np.float32) * rng.uniform(0.8, 1.2)
        _composite(img, window, rng.uniform(0.55, 0.9) * coverage, colour)
    # choroidal naevus: one large, flat, slate-grey patch in some eyes
    counts["naevus"] = int(rng.random() < 0.3)
    for _ in range(counts["naevus"]):
        x, y = anywhere(0.8)
        window, coverage, depth = _blob(shape, x, y, rng.uniform(0.04, 0.1) * radius, rng, aspect=rng.uniform(0.6, 1.0), wobble=0.15)
        _composite(img, window, rng.uniform(0.35, 0.6) * coverage * np.clip(2 * depth, 0, 1), _NAEVUS_RGB)
    # dark red knots on the vessels (crossings, kinks, vessels seen end-on): microaneurysm-like
    counts["vessel_knot"] = _wide_count(rng, 0, 15)
    for _ in range(counts["vessel_knot"]):
        x, y = vessel_point()
        window, coverage, _ = _blob(shape, x, y, _log_uniform(rng, 1.1, 2.4) * ref, rng, aspect=1.0, wobble=0.05)
        _composite(img, window, 0.85 * coverage, _KNOT_RGB)
    return counts


def _fundus_plan(load: str, rng: np.random.Generator, size: int) -> list[tuple[str, float]]:
    """Lesions to draw: (kind, extent in pixels: cluster or blob semi-axis). A per-image mix of the
    three kinds; sizes log-uniform from MIN_LESION_RADIUS_PX (a 2-3 px dot) to 7 % (exudate cluster)
    or 4.5 % (haemorrhage) of the side; microaneurysms are true to size (2-4 px)."""
    count = _lesion_count(load, rng)
    mix = rng.dirichlet((1.0, 1.0, 1.0))
    ref = size / 256.0
    plan = []
    for _ in range(count):
        kind = LESION_KINDS["fundus"][int(rng.choice(3, p=mix))]
        if kind == "hard_exudate":
            extent = _sized(rng, load, max(MIN_LESION_RADIUS_PX, 1.3 * ref), 0.07 * size)
        elif kind == "haemorrhage":
            extent = _sized(rng, load, max(MIN_LESION_RADIUS_PX, 1.3 * ref), 0.045 * size)
        else:
            extent = max(MIN_LESION_RADIUS_PX, rng.uniform(1.1, 1.9) * ref)
        plan.append((kind, extent))
    return plan


def _fundus_lesion(img, kind, px, py, extent, rng):
    """One lesion of semi-axis ``extent`` px at (px, py) composited onto a copy of ``img`` (H, W, 3
    float): returns ``(window, patch, mask)``: the window (row, col slices), the window's pixels with
    the lesion, and the bool (H, W) mask of the pixels it changes (by > MASK_THRESHOLD)."""
    shape = img.shape[:2]
    window = _window(px, py, _fundus_reach(extent), *shape)
    before = img[window].copy()
    patch = before.copy()
    origin = (window[0].start, window[1].start)
    if kind == "hard_exudate":
        # a cluster of waxy yellow deposits (a single dot when small); the cluster is one lesion object
        colour = np.asarray(_EXUDATE_RGB, np.float32) * rng.uniform(0.95, 1.02)
        n_dots = 1 if extent < 3.0 else int(np.clip(round(extent / 2.2 * rng.uniform(0.6, 1.2)), 2, 14))
        for _ in range(n_dots):
            if n_dots == 1:
                dx = dy = 0.0
                dot_r = extent
            else:
                dx, dy = np.clip(rng.normal(0, extent / 2.2, size=2), -0.9 * extent, 0.9 * extent)
                dot_r = max(MIN_LESION_RADIUS_PX, rng.uniform(0.18, 0.38) * extent)
            w, coverage, _ = _blob(shape, px + dx, py + dy, dot_r, rng, aspect=rng.uniform(0.6, 1.0), wobble=0.2)
            _composite_at(patch, origin, w, 0.92 * coverage, colour)
    elif kind == "haemorrhage":
        # blot haemorrhage: dark red, darker core
        w, coverage, depth = _blob(shape, px, py, extent, rng, aspect=rng.uniform(0.55, 1.0), wobble=0.15)
        _composite_at(patch, origin, w, coverage * (0.72 + 0.2 * depth), _HAEMORRHAGE_RGB)
    else:  # microaneurysm: a tiny round red dot
        w, coverage, _ = _blob(shape, px, py, extent, rng, aspect=1.0, wobble=0.03)
        _composite_at(patch, origin, w, 0.9 * coverage, _MICROANEURYSM_RGB)
    return window, patch, _lesion_mask(shape, window, patch - before)


def _fundus_reach(extent: float) -> float:
    """Half side in pixels of the square a fundus lesion of semi-axis ``extent`` stays inside."""
    return 1.5 * extent + 4.0


def _composite_at(patch: np.ndarray, origin: tuple[int, int], window, alpha: np.ndarray, colour) -> None:
    """Alpha-blend ``colour`` into ``patch`` (a crop of the image whose top-left pixel is ``origin``
    (row, col)) where ``alpha`` covers the image ``window``; the part outside the crop is dropped."""
    r0, r1 = max(window[0].start, origin[0]), min(window[0].stop, origin[0] + patch.shape[0])
    c0, c1 = max(window[1].start, origin[1]), min(window[1].stop, origin[1] + patch.shape[1])
    if r1 <= r0 or c1 <= c0:
        return
    a = alpha[r0 - window[0].start : r1 - window[0].start, c0 - window[1].start : c1 - window[1].start]
    _composite(patch, (slice(r0 - origin[0], r1 - origin[0]), slice(c0 - origin[1], c1 - origin[1])), a, colour)


# --------------------------------------------------------------------------------------------
# OCT B-scan
# --------------------------------------------------------------------------------------------


def _render_oct(size, load, rng_bg, rng_lesion, rng_noise, draw_lesions):
    height, width = image_shape("oct", size)
    shape = (height, width)
    yy, xx = _grid(height, width)
    x = xx[0]
    ref = size / 256.0
    h = height
    # acquisition, drawn first and never from the label: signal gain, display gamma, noise floor, speckle
    gain = rng_bg.uniform(0.75, 1.2)
    gamma = rng_bg.uniform(0.75, 1.2)
    noise_floor = rng_bg.uniform(0.015, 0.05)
    speckle_strength = rng_bg.uniform(0.28, 0.44)

    u = (x - width / 2) / width  # -0.5 .. 0.5
    fovea_x = width * rng_bg.uniform(0.42, 0.58)
    # RPE (top of the band) curves like the back of the eye, tilted by the scan angle
    rpe = h * (rng_bg.uniform(0.52, 0.6) - rng_bg.uniform(0.0, 0.35) * u**2 + rng_bg.uniform(-0.08, 0.08) * u)
    pit = np.exp(-0.5 * ((x - fovea_x) / (width * rng_bg.uniform(0.06, 0.08))) ** 2)
    nasal = 1.0 if rng_bg.random() < 0.5 else -1.0
    side = np.clip(nasal * (x - fovea_x) / width, -0.5, 0.5)  # > 0 towards the optic nerve
    inner_scale, outer_scale = rng_bg.uniform(0.85, 1.2), rng_bg.uniform(0.85, 1.2)
    rpe_thickness = rng_bg.uniform(0.018, 0.026) * h
    thickness = {  # pixels; the inner layers vanish in the foveal pit, the outer nuclear layer thickens
        "os": 0.022 * h * outer_scale,
        "ez": 0.011 * h * outer_scale,
        "myoid": 0.014 * h * outer_scale,
        "elm": 0.005 * h,
        "onl": (0.065 + 0.035 * pit) * h * outer_scale,
        "opl": 0.016 * h * (1 - 0.85 * pit) * inner_scale,
        "inl": 0.03 * h * (1 - 0.9 * pit) * inner_scale,
        "ipl": 0.03 * h * (1 - 0.9 * pit) * inner_scale,
        "gcl": 0.033 * h * (1 - 0.95 * pit) * inner_scale,
        "nfl": (0.022 + 0.05 * np.clip(side + 0.1, 0, None)) * h * (1 - 0.97 * pit) * inner_scale,
    }
    # layer reflectivities vary between eyes and devices
    jitter = {name: rng_bg.uniform(0.85, 1.15) for name in ("nfl", "gcl", "ipl", "inl", "opl", "onl", "elm", "myoid", "ez", "os", "rpe")}

    # confounder: RPE undulations, where the RPE and Bruch's membrane rise and fall together (no
    # deposit beneath): drusen-like humps of the same brightness; like drusen they lift the outer
    # retina and the outer nuclear layer takes up the displacement
    undulation = np.zeros(width, dtype=np.float32)
    n_undulations = _wide_count(rng_bg, 0, 8)
    for _ in range(n_undulations):
        centre = rng_bg.uniform(0.05, 0.95) * width
        sigma = _log_uniform(rng_bg, 0.012, 0.05) * width
        amplitude = min(_log_uniform(rng_bg, 1.0 * ref, 0.04 * h), 1.2 * sigma) * (1.0 if rng_bg.random() < 0.75 else -0.5)
        undulation += (amplitude * np.exp(-0.5 * ((x - centre) / sigma) ** 2)).astype(np.float32)
    waves = rng_bg.uniform(2, 6)
    undulation += (rng_bg.uniform(0, 0.008) * h * np.sin(2 * math.pi * (x / width * waves + rng_bg.uniform(0, 1)))).astype(np.float32)
    bm = rpe + rpe_thickness - undulation  # Bruch's membrane: follows the undulations, not the drusen

    # drusen: dome-shaped elevations of the RPE above Bruch's membrane, with deposit beneath
    elevation = np.zeros(width, dtype=np.float32)
    deposit = np.zeros(width, dtype=np.float32)  # reflectivity of the deposit under the lifted RPE
    drusen: list[tuple[float, float]] = []  # (centre, half width) px
    for half_width, peak, material in _oct_plan(load, rng_lesion, width, height):
        for _ in range(80):
            centre = rng_lesion.uniform(0.05 * width + half_width, 0.95 * width - half_width)
            span = (x > centre - half_width - 4) & (x < centre + half_width + 4)
            if not elevation[span].any():
                break
        else:
            continue
        t = np.clip((x - centre) / half_width, -1.0, 1.0)
        dome = (peak * (1 - t**2) ** 1.1).astype(np.float32)
        elevation += dome
        deposit = np.where(dome > 0, material, deposit).astype(np.float32)
        drusen.append((centre, half_width))

    below_bm = yy - bm[None, :]
    choroid_depth = h * rng_bg.uniform(0.13, 0.2)
    choroid_vessels = _smooth_noise(rng_bg, shape, (2.0 * ref, 4.0 * ref))
    choroid_brightness = rng_bg.uniform(0.5, 0.72)
    choroid = choroid_brightness * np.exp(-np.clip(below_bm, 0, None) / choroid_depth) * np.clip(0.75 + 0.3 * choroid_vessels, 0.2, 1.2) + 0.05

    def layered(lift: np.ndarray) -> tuple[np.ndarray, dict]:
        """Noise-free reflectivity (H, W) with the RPE lifted by ``lift`` (W,) px, and the boundaries."""
        rise = undulation + lift
        rpe_top = rpe - rise
        # the outer retina rides on the lifted RPE and the outer nuclear layer absorbs the
        # displacement, so the inner retina does not move (unless a druse is taller than the ONL)
        boundaries = {}
        level = rpe_top
        for name in ("os", "ez", "myoid", "elm"):
            level = level - thickness[name]
            boundaries[name] = level
        level = level - np.maximum(thickness["onl"] - rise, 0.1 * thickness["onl"])
        boundaries["onl"] = level
        for name in ("opl", "inl", "ipl", "gcl", "nfl"):
            level = level - thickness[name]
            boundaries[name] = level
        layers = [  # (top boundary of layer, reflectivity), from the vitreous down
            (boundaries["nfl"], 0.80 * jitter["nfl"]),
            (boundaries["gcl"], 0.40 * jitter["gcl"]),
            (boundaries["ipl"], 0.56 * jitter["ipl"]),
            (boundaries["inl"], 0.20 * jitter["inl"]),
            (boundaries["opl"], 0.52 * jitter["opl"]),
            (boundaries["onl"], 0.13 * jitter["onl"]),
            (boundaries["elm"], 0.40 * jitter["elm"]),
            (boundaries["myoid"], 0.20 * jitter["myoid"]),
            (boundaries["ez"], 0.85 * jitter["ez"]),
            (boundaries["os"], 0.36 * jitter["os"]),
            (rpe_top, 0.95 * jitter["rpe"]),
            (np.minimum(rpe_top + rpe_thickness, bm), deposit),  # druse material under the lifted RPE
            (bm, 0.0),  # choroid, added below
        ]
        img = np.full(shape, 0.03, dtype=np.float32)
        previous = 0.03
        for top, value in layers:
            img += (value - previous) * np.clip(yy - top[None, :] + 0.5, 0.0, 1.0)
            previous = value
        img += np.where(below_bm > 0, choroid, 0.0)
        return img, boundaries

    plain, boundaries = layered(np.zeros(width, dtype=np.float32))
    img = layered(elevation)[0] if drusen else plain.copy()
    # each druse's mask: the pixels it changes (its own columns only; drusen do not share columns)
    lesions = []
    change = np.abs(img - plain) * 255.0 * gain
    for centre, half_width in drusen:
        columns = (x > centre - half_width - 2) & (x < centre + half_width + 2)
        changed = (change > MASK_THRESHOLD) & columns[None, :]
        # per column, from the highest to the lowest changed pixel: the druse, the deposit and the
        # outer retina it displaced, without the unchanged gaps between displaced layer boundaries
        below_top = np.maximum.accumulate(changed, axis=0)
        above_bottom = np.maximum.accumulate(changed[::-1], axis=0)[::-1]
        mask = below_top & above_bottom
        if _big_enough(mask):
            lesions.append(Lesion("drusen", mask))
    if not draw_lesions:
        img = plain

    confounders = {"rpe_undulation": n_undulations}
    # confounder: hyper-reflective foci, bright dots in the retina as bright as the RPE
    confounders["reflective_focus"] = _wide_count(rng_bg, 0, 15)
    for _ in range(confounders["reflective_focus"]):
        column = int(rng_bg.integers(int(0.04 * width), int(0.96 * width)))
        top, bottom = boundaries["gcl"][column], boundaries["elm"][column]
        window, profile = _soft_spot(shape, column + 0.5, rng_bg.uniform(top, max(top + 1, bottom)),
                                     _log_uniform(rng_bg, 0.7, 1.8) * ref, aspect=rng_bg.uniform(0.6, 1.0))
        img[window] += rng_bg.uniform(0.35, 0.75) * profile
    # retinal vessels in the inner layers: a bright cross-section, and a shadow down through the
    # outer retina and the RPE
    confounders["vessel_shadow"] = int(rng_bg.integers(1, 7))
    for _ in range(confounders["vessel_shadow"]):
        vx = rng_bg.uniform(0.05, 0.95) * width
        vy_top = boundaries["gcl"][min(width - 1, int(vx))]
        vr = rng_bg.uniform(0.005, 0.012) * width
        column = np.exp(-0.5 * ((x - vx) / vr) ** 2)
        img *= 1.0 - rng_bg.uniform(0.3, 0.6) * column[None, :] * (yy > vy_top + vr)
        img += 0.25 * np.exp(-0.5 * (((xx - vx) / vr) ** 2 + ((yy - vy_top) / vr) ** 2))

    # speckle: multiplicative, slightly elongated along the A-scan lateral direction
    speckle = np.exp(speckle_strength * _smooth_noise(rng_noise, shape, (0.6 * ref, 1.1 * ref)) - speckle_strength**2 / 2)
    img = gain * img * speckle + noise_floor * np.abs(rng_noise.standard_normal(shape))
    pixels = np.clip(np.rint(255 * np.clip(img, 0, 1) ** (0.9 * gamma)), 0, 255).astype(np.uint8)
    return Rendered(pixels, lesions, confounders=confounders), (0, 0, width, height), ["top-left", "top-right"]


def _oct_plan(load: str, rng: np.random.Generator, width: int, height: int) -> list[tuple[float, float, float]]:
    """Drusen to draw: (half width px, peak height px, deposit reflectivity). Peak heights log-uniform
    from 2 px to 5 % of the scan height (about 100 um on a 2 mm scan); half widths 1.6-3.5 x the peak
    (at least 3 px); the deposit under the lifted RPE is medium-reflective (0.45-0.7)."""
    count = _lesion_count(load, rng)
    low = max(2.0, 2.0 * width / 256)
    plan = []
    for _ in range(count):
        peak = _sized(rng, load, low, 0.05 * height)
        plan.append([peak, rng.uniform(1.6, 3.5), rng.uniform(0.45, 0.7)])
    # many drusen are smaller drusen: shrink them until they fit side by side in 80 % of the scan
    for _ in range(20):
        spans = sum(2 * max(3.0, min(peak * ratio, 0.09 * width)) + 8 for peak, ratio, _ in plan)
        if spans <= 0.8 * width:
            break
        for entry in plan:
            entry[0] = max(low, entry[0] * 0.85)
    return [(float(np.clip(peak * ratio, 3.0, 0.09 * width)), peak, material) for peak, ratio, material in plan]


# --------------------------------------------------------------------------------------------
# chest X-ray
# --------------------------------------------------------------------------------------------

# 12-bit stored value = _CXR_OFFSET + _CXR_GAIN * attenuation (attenuation in 0..1)
_CXR_OFFSET, _CXR_GAIN = 160.0, 3700.0
CXR_RESCALE_SLOPE, CXR_RESCALE_INTERCEPT = 1.0, -1024.0


def _render_cxr(size, load, rng_bg, rng_lesion, rng_noise, draw_lesions):
    height = width = size
    shape = (height, width)
    yy, xx = _grid(height, width)
    ref = size / 256.0
    # acquisition, drawn first and never from the label: exposure, a detector offset, quantum noise
    exposure = rng_bg.uniform(0.88, 1.12)
    exposure_offset = rng_bg.uniform(-0.03, 0.03)
    noise_sigma = rng_bg.uniform(0.006, 0.016)

    u = xx / width
    v = yy / height
    shift_u, shift_v = rng_bg.uniform(-0.015, 0.015, size=2)
    u = u - shift_u
    v = v - shift_v
    lung_scale = rng_bg.uniform(0.93, 1.06)
    tissue = rng_bg.uniform(0.27, 0.34)  # habitus: how much soft tissue the beam crosses
    aeration = rng_bg.uniform(0.23, 0.31)  # inspiration: how dark the lungs are

    # body outline: neck widening into the shoulders
    half_width = 0.13 + 0.35 * _smoothstep(-0.02, 0.16, v)
    body = np.clip((half_width - np.abs(u - 0.5)) * width / 3.0, 0.0, 1.0)
    soft_tissue = body * (tissue + 0.16 * np.clip(1 - ((u - 0.5) / np.maximum(half_width, 1e-3)) ** 2, 0, 1))

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
    heart_a, heart_b, tilt = 0.175 * rng_bg.uniform(0.9, 1.12), 0.115, -0.5
    hu, hv = u - heart_u, v - heart_v
    heart = ((hu * math.cos(tilt) + hv * math.sin(tilt)) / heart_a) ** 2 + ((-hu * math.sin(tilt) + hv * math.cos(tilt)) / heart_b) ** 2 < 1
    mediastinum = (np.abs(u - 0.5) < 0.065 + 0.02 * _smoothstep(0.3, 0.5, v)) & (v > 0.05)
    knob = (u - 0.565) ** 2 + (v - 0.33) ** 2 < 0.035**2  # aortic knob
    lungs_hard = (right | left) & ~heart & ~mediastinum & ~knob
    lungs = ndimage.gaussian_filter(lungs_hard.astype(np.float32), 0.012 * size)

    atten = soft_tissue - aeration * lungs * body
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
    atten += rng_bg.uniform(0.11, 0.15) * bone * body

    tree = Image.new("L", (width * scale, height * scale), 0)
    tree_draw = ImageDraw.Draw(tree)
    for side in (-1.0, 1.0):
        hilum = ((0.5 + side * 0.1 + shift_u) * width, (0.44 + shift_v) * height)
        for base_angle in (-1.3, -0.8, -0.3, 0.2, 0.7, 1.2, 1.6):
            angle = math.atan2(math.sin(base_angle), side * math.cos(base_angle)) + rng_bg.normal(0, 0.12)
            _draw_tree(tree_draw, rng_bg, hilum, angle, angle, 0.008 * size, 0.32 * size, value=255,
                       inside=lambda px, py: 0 <= px < width and 0 <= py < height, scale=scale, step=0.015 * size,
                       steer=0.0, branch_prob=0.22, jitter=0.09, min_width=0.25)
    vessels = ndimage.gaussian_filter(np.asarray(tree.reduce(scale), dtype=np.float32) / 255.0, 0.4 * ref)
    # vessel markings fade towards the periphery, where the vessels are thin
    from_hilum = np.hypot(np.abs(u - 0.5) - 0.1, v - 0.44)
    hila = np.exp(-0.5 * (((np.abs(u - 0.5) - 0.1) / 0.04) ** 2 + ((v - 0.44) / 0.06) ** 2))
    atten += (rng_bg.uniform(0.05, 0.09) * vessels * np.exp(-from_hilum / 0.2) + 0.06 * hila) * lungs
    atten += 0.015 * _smooth_noise(rng_bg, shape, 0.02 * size) * body
    atten = ndimage.gaussian_filter(atten, 0.6 * ref)

    confounders = _cxr_confounders(atten, rng_bg, ref, size, lungs_hard, body, from_hilum, shift_u, shift_v)

    # opacities: consolidations and nodules confined to the lung fields, anywhere in them
    lesions = []
    inner = ndimage.distance_transform_edt(lungs_hard)
    for radius in _cxr_plan(load, rng_lesion, size):
        candidates = np.flatnonzero(inner.ravel() > 0.9 * radius + 1.0)
        if candidates.size == 0:
            continue
        for _ in range(80):
            pick = int(candidates[rng_lesion.integers(candidates.size)])
            py, px = divmod(pick, width)
            reach = 1.4 * radius + 3.0
            box = (px - reach, py - reach, px + reach, py + reach)
            if not any(_boxes_overlap(box, other, margin=2.0) for _, other in lesions):
                break
        else:
            continue
        window, coverage, depth = _blob(shape, px + 0.5, py + 0.5, radius, rng_lesion, aspect=rng_lesion.uniform(0.65, 1.0), wobble=0.2)
        in_lung = lungs_hard[window]
        mottle = np.clip(1.0 + 0.25 * _smooth_noise(rng_lesion, coverage.shape, 0.015 * size), 0.5, 1.5)
        # ill-defined margin: density rises over the outer part of the blob; small nodules are denser
        peak = rng_lesion.uniform(0.22, 0.34) if radius > 4 * ref else rng_lesion.uniform(0.28, 0.4)
        density = peak * coverage * (0.25 + 0.75 * _smoothstep(0.0, 0.6, depth)) * mottle * in_lung
        mask = _lesion_mask(shape, window, density * _CXR_GAIN * exposure)
        if not _big_enough(mask):
            continue
        if draw_lesions:
            atten[window] += density
        lesions.append((Lesion("opacity", mask), box))

    atten = exposure * atten + exposure_offset
    atten += noise_sigma * rng_noise.standard_normal(shape).astype(np.float32)  # quantum noise
    stored = np.clip(np.rint(_CXR_OFFSET + _CXR_GAIN * atten), 0, 4095).astype(np.uint16)
    return Rendered(stored, [lesion for lesion, _ in lesions], confounders=confounders), (0, 0, width, height), ["top-left", "top-right"]


def _cxr_confounders(atten, rng, ref, size, lungs_hard, body, from_hilum, shift_u, shift_v) -> dict[str, int]:
    """Draw the class-independent opacity look-alikes into ``atten`` (H, W attenuation, in place)
    from the background stream ``rng``; returns their counts."""
    shape = atten.shape
    height, width = shape
    lung_pixels = np.flatnonzero(lungs_hard.ravel())
    body_pixels = np.flatnonzero((body > 0.99).ravel())

    def in_lung(weight_hilum=False):
        for _ in range(30):
            y, x = divmod(int(lung_pixels[rng.integers(lung_pixels.size)]), width)
            if not weight_hilum or rng.random() < math.exp(-from_hilum[y, x] / 0.12):
                return x + rng.uniform(0, 1), y + rng.uniform(0, 1)
        return x + 0.5, y + 0.5

    counts = {}
    # calcified granulomas: small, sharp, dense dots
    counts["granuloma"] = _wide_count(rng, 0, 6)
    for _ in range(counts["granuloma"]):
        x, y = in_lung()
        window, coverage, _ = _blob(shape, x, y, _log_uniform(rng, 1.1, 3.5) * ref, rng, aspect=rng.uniform(0.7, 1.0), wobble=0.1)
        atten[window] += rng.uniform(0.15, 0.35) * coverage
    # vessels seen end-on: small round soft dots, mostly near the hila
    counts["vessel_end_on"] = _wide_count(rng, 0, 16)
    for _ in range(counts["vessel_end_on"]):
        x, y = in_lung(weight_hilum=True)
        window, profile = _soft_spot(shape, x, y, _log_uniform(rng, 0.8, 2.4) * ref)
        atten[window] += rng.uniform(0.06, 0.18) * profile
    # soft nodule-like shadows (overlapping vessels and soft tissue): smooth round humps in the lungs
    counts["soft_shadow"] = _wide_count(rng, 0, 6)
    for _ in range(counts["soft_shadow"]):
        x, y = in_lung()
        window, profile = _soft_spot(shape, x, y, _log_uniform(rng, 0.006, 0.04) * size, aspect=rng.uniform(0.6, 1.0),
                                     angle=rng.uniform(0, math.pi))
        atten[window] += rng.uniform(0.06, 0.2) * profile
    # nipple shadows: a symmetric pair of soft round shadows over the lower lungs in some films
    counts["nipple"] = 2 if rng.random() < 0.4 else 0
    if counts["nipple"]:
        v, spread, r = rng.uniform(0.6, 0.68), rng.uniform(0.17, 0.22), rng.uniform(0.012, 0.022) * size
        density = rng.uniform(0.05, 0.12)
        for side in (-1.0, 1.0):
            x = (0.5 + side * spread + shift_u) * width + rng.normal(0, 0.005 * width)
            y = (v + shift_v) * height + rng.normal(0, 0.005 * height)
            window, coverage, depth = _blob(shape, x, y, r, rng, aspect=rng.uniform(0.8, 1.0), wobble=0.05)
            atten[window] += density * coverage * np.clip(3 * depth, 0, 1)
    # ECG electrodes with their leads: bright round markers anywhere on the body
    counts["electrode"] = _wide_count(rng, 0, 4)
    if counts["electrode"]:
        scale = 2
        canvas = Image.new("L", (width * scale, height * scale), 0)
        draw = ImageDraw.Draw(canvas)
        for _ in range(counts["electrode"]):
            y, x = divmod(int(body_pixels[rng.integers(body_pixels.size)]), width)
            r = rng.uniform(0.012, 0.02) * size * scale
            cx, cy = (x + 0.5) * scale, (y + 0.5) * scale
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=200, width=max(1, int(round(0.25 * r))))
            draw.ellipse([cx - 0.35 * r, cy - 0.35 * r, cx + 0.35 * r, cy + 0.35 * r], fill=255)
            # the lead: a gentle curve to the nearer side of the film
            end_x = 0 if x < width / 2 else width * scale
            sag, drift = rng.uniform(-0.1, 0.1) * size * scale, rng.uniform(-0.2, 0.2) * size * scale
            points = [(cx + (end_x - cx) * t, cy + sag * math.sin(math.pi * t) + drift * t * t) for t in np.linspace(0, 1, 12)]
            draw.line(points, fill=140, width=max(1, int(round(0.004 * size * scale))), joint="curve")
        atten += rng.uniform(0.25, 0.4) * np.asarray(canvas.reduce(scale), dtype=np.float32) / 255.0
    return counts


def _cxr_plan(load: str, rng: np.random.Generator, size: int) -> list[float]:
    """Opacity radii in pixels, log-uniform from MIN_LESION_RADIUS_PX (a 2-3 px nodule) to 10 % of
    the side (a lobar consolidation)."""
    count = _lesion_count(load, rng)
    low = max(MIN_LESION_RADIUS_PX, 1.2 * size / 256)
    return [_sized(rng, load, low, 0.1 * size) for _ in range(count)]


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
    progress: bool = False,
) -> Path:
    """Write a deterministic synthetic cohort of ``n`` images to ``out`` and return its path.

    ``modality``: fundus | oct | cxr. ``size``: image side in pixels (OCT: width; height is
    round(0.97 size)). Classes: healthy / diseased, or with ``grades`` grade0 (no lesions),
    grade1 (few, small) and grade2 (many, large); counts balanced to within one image.
    ``artifact_rate``: fraction of the non-healthy images that get the burned-in shortcut tag (never
    a healthy one). ``split``: train/val/test fractions, stratified per class. An existing
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
            rendered = render_image(modality, size, seed, i, labels[i], artifact=i in with_artifact)
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
                "lesion_counts": counts, "lesions": lesion_records, "confounder_counts": dict(rendered.confounders),
                "artifact": None if rendered.artifact_box is None else {"text": ARTIFACT_TEXT[modality], "box": list(rendered.artifact_box)},
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
            "grades": bool(grades), "split_fractions": list(split), "classes": list(classes),
            "lesion_kinds": list(LESION_KINDS[modality]), "images": meta_images,
            "artifact_images": sorted(name for name, info in meta_images.items() if info["artifact"] is not None),
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
    parser.set_defaults(func=_cli_synth)


def _cli_synth(args) -> int:
    out = make_cohort(args.modality, args.n, args.seed, args.out, size=args.size, artifact_rate=args.artifact_rate,
                      grades=args.grades, progress=True)
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
