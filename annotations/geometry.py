"""Annotation geometry in image pixels: the ONE box type and its point / polygon / mask siblings.

Conventions (DESIGN.md): origin top-left, x to the right, y down, units are pixels of the original
image. A :class:`Box` is ``x0, y0, x1, y1`` floats with an *exclusive* end, so a box covering pixel
columns 3..7 inclusive is ``Box(3, ., 8, .)`` and its width is ``x1 - x0 = 5``.

Coordinates are snapped to a dyadic grid of ``1 / 2**24`` pixel (:func:`snap`). Values on that grid
are exact binary floats, so sums and differences of coordinates (COCO ``x + w``, VOC ``xmax``) are
exact, and any conversion that goes through a division (YOLO normalisation) lands back on the same
grid point. That is what makes import -> export -> re-import round trips bit-identical, at a cost of
at most 3e-8 pixel against the source file (none for integers or float32 values of magnitude >= 1,
which is what COCO exporters write).
"""

from __future__ import annotations

import base64
import math
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

GRID = 2.0**24  # grid steps per pixel; sums stay exact for coordinates below 2**28 px


def snap(value: float) -> float:
    """Round a coordinate (pixels) to the nearest multiple of 2**-24 pixel; raises on NaN/inf."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"coordinate {value!r} is not a finite number")
    return round(value * GRID) / GRID


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in image pixels: ``x0 <= x1``, ``y0 <= y1``, end exclusive."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        for name in ("x0", "y0", "x1", "y1"):
            object.__setattr__(self, name, snap(getattr(self, name)))
        if self.x1 < self.x0 or self.y1 < self.y0:
            raise ValueError(f"box has negative size: x0={self.x0}, y0={self.y0}, x1={self.x1}, y1={self.y1}")

    kind = "box"

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return self.width * self.height

    # --- conversions (the only place they live, with formats.py) --------------------------------
    @classmethod
    def from_xywh(cls, x: float, y: float, w: float, h: float) -> "Box":
        """From COCO/RSNA ``x, y, width, height`` (top-left corner + size, pixels)."""
        return cls(x, y, snap(x) + snap(w), snap(y) + snap(h))

    def to_xywh(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.width, self.height)

    @classmethod
    def from_inclusive(cls, x0: float, y0: float, x1: float, y1: float) -> "Box":
        """From integer pixel indices whose last row/column is *inside* the box (e.g. ``x1 = 7`` -> end 8)."""
        return cls(x0, y0, x1 + 1, y1 + 1)

    def to_inclusive(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1 - 1, self.y1 - 1)

    @classmethod
    def from_yolo(cls, cx: float, cy: float, w: float, h: float, image_width: int, image_height: int) -> "Box":
        """From YOLO centre/size normalised to [0, 1] by the image width and height."""
        return cls(
            (cx - w / 2) * image_width,
            (cy - h / 2) * image_height,
            (cx + w / 2) * image_width,
            (cy + h / 2) * image_height,
        )

    def to_yolo(self, image_width: int, image_height: int) -> tuple[float, float, float, float]:
        """YOLO ``cx, cy, w, h`` normalised by the image size (unitless, 0..1 inside the image)."""
        return (
            (self.x0 + self.x1) / 2 / image_width,
            (self.y0 + self.y1) / 2 / image_height,
            self.width / image_width,
            self.height / image_height,
        )

    def to_array(self) -> np.ndarray:
        """``(4,)`` float64 ``[x0, y0, x1, y1]`` (the layout imaging.Geometry.boxes_to_input takes)."""
        return np.array([self.x0, self.y0, self.x1, self.y1], dtype=np.float64)

    def clip(self, width: int, height: int) -> "Box":
        return Box(
            min(max(self.x0, 0), width), min(max(self.y0, 0), height),
            min(max(self.x1, 0), width), min(max(self.y1, 0), height),
        )

    def inside(self, width: int, height: int) -> bool:
        return self.x0 >= 0 and self.y0 >= 0 and self.x1 <= width and self.y1 <= height

    def to_mask(self, height: int, width: int) -> np.ndarray:
        """``(height, width)`` bool, True on pixels whose centre lies in the box."""
        mask = np.zeros((height, width), dtype=bool)
        c0, c1 = math.ceil(self.x0 - 0.5), math.ceil(self.x1 - 0.5)
        r0, r1 = math.ceil(self.y0 - 0.5), math.ceil(self.y1 - 0.5)
        mask[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)] = True
        return mask

    def to_json(self) -> dict[str, Any]:
        return {"x0": self.x0, "y0": self.y0, "x1": self.x1, "y1": self.y1}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Box":
        return cls(data["x0"], data["y0"], data["x1"], data["y1"])


@dataclass(frozen=True)
class Point:
    """A single clicked location in image pixels (e.g. a microaneurysm)."""

    x: float
    y: float

    kind = "point"

    def __post_init__(self) -> None:
        object.__setattr__(self, "x", snap(self.x))
        object.__setattr__(self, "y", snap(self.y))

    def bounds(self) -> Box:
        return Box(self.x, self.y, self.x, self.y)

    def to_json(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Point":
        return cls(data["x"], data["y"])


@dataclass(frozen=True)
class Polygon:
    """Closed polygon, vertices ``((x, y), ...)`` in image pixels (at least three)."""

    points: tuple[tuple[float, float], ...]

    kind = "polygon"

    def __post_init__(self) -> None:
        pts = tuple((snap(x), snap(y)) for x, y in self.points)
        if len(pts) < 3:
            raise ValueError(f"polygon needs at least 3 points, got {len(pts)}")
        object.__setattr__(self, "points", pts)

    @property
    def area(self) -> float:
        """Enclosed area in square pixels (shoelace formula; a self-crossing outline counts signed parts)."""
        pts = self.points
        return abs(sum(xa * yb - xb * ya for (xa, ya), (xb, yb) in zip(pts, pts[1:] + pts[:1]))) / 2

    def bounds(self) -> Box:
        xs = [p[0] for p in self.points]
        ys = [p[1] for p in self.points]
        return Box(min(xs), min(ys), max(xs), max(ys))

    def to_mask(self, height: int, width: int) -> np.ndarray:
        """``(height, width)`` bool, True on pixels whose centre is inside the polygon (even-odd rule)."""
        # crossing-number test on pixel centres (x + 0.5, y + 0.5); the same rule as Box.to_mask
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
        inside = np.zeros((height, width), dtype=bool)
        pts = self.points
        for (xa, ya), (xb, yb) in zip(pts, pts[1:] + pts[:1]):
            if ya == yb:
                continue
            crosses = (ya > ys) != (yb > ys)
            x_at = xa + (ys - ya) * (xb - xa) / (yb - ya)
            inside ^= crosses & (xs < x_at)
        return inside

    def to_json(self) -> dict[str, Any]:
        return {"points": [list(p) for p in self.points]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Polygon":
        return cls(tuple((float(x), float(y)) for x, y in data["points"]))


@dataclass(frozen=True, eq=False)
class Mask:
    """Binary mask over the whole image: ``array`` is ``(height, width)`` bool."""

    array: np.ndarray

    kind = "mask"

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim != 2:
            raise ValueError(f"mask must be 2-D (height, width), got shape {arr.shape}")
        object.__setattr__(self, "array", arr.astype(bool, copy=False))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mask) and self.array.shape == other.array.shape and bool(
            np.array_equal(self.array, other.array)
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def shape(self) -> tuple[int, int]:
        return self.array.shape  # type: ignore[return-value]

    def bounds(self) -> Box | None:
        return mask_bounds(self.array)

    def to_json(self) -> dict[str, Any]:
        """Run-length code in row-major order: ``counts`` alternate background/foreground run lengths."""
        return {"size": list(self.array.shape), "rle": encode_rle(self.array)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Mask":
        return cls(decode_rle(data["rle"], tuple(data["size"])))


Geometry = Box | Point | Polygon | Mask
KINDS = {"box": Box, "point": Point, "polygon": Polygon, "mask": Mask}


def geometry_from_json(kind: str, data: dict[str, Any]) -> Geometry:
    """Rebuild a geometry stored as ``(kind, to_json())``; unknown kind -> ValueError."""
    try:
        cls = KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown annotation kind {kind!r}; expected one of {sorted(KINDS)}") from None
    return cls.from_json(data)


# --- masks <-> boxes ---------------------------------------------------------------------------

def encode_rle(mask: np.ndarray) -> str:
    """Compact text code of a bool ``(H, W)`` mask: zlib-deflated uint32 run lengths, base64.

    Runs alternate starting with background (first run may be 0), row-major order.
    """
    flat = np.asarray(mask, dtype=bool).ravel()
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(edges)
    if flat.size and flat[0]:
        runs = np.concatenate([[0], runs])
    return base64.b64encode(zlib.compress(runs.astype("<u4").tobytes(), 9)).decode("ascii")


def decode_rle(code: str, size: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`encode_rle`; ``size`` is ``(H, W)``. Returns bool ``(H, W)``."""
    runs = np.frombuffer(zlib.decompress(base64.b64decode(code)), dtype="<u4").astype(np.int64)
    height, width = int(size[0]), int(size[1])
    if runs.sum() != height * width:
        raise ValueError(f"mask code covers {int(runs.sum())} pixels, expected {height}x{width}")
    values = np.zeros(runs.size, dtype=bool)
    values[1::2] = True
    return np.repeat(values, runs).reshape(height, width)


def mask_bounds(mask: np.ndarray) -> Box | None:
    """Tight box around the True pixels of a ``(H, W)`` mask (exclusive end), or None if empty."""
    rows = np.flatnonzero(np.asarray(mask).any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(np.asarray(mask).any(axis=0))
    return Box(cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)


def mask_to_boxes(mask: np.ndarray, *, connectivity: int = 8, min_pixels: int = 1) -> list[Box]:
    """One box per connected component of a ``(H, W)`` binary mask, sorted by (y0, x0).

    ``connectivity`` 8 joins diagonal neighbours (what a drawn stroke or a layer-derived region
    expects), 4 only edge neighbours. Components smaller than ``min_pixels`` are dropped.
    """
    from scipy import ndimage

    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    structure = np.ones((3, 3), bool) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=structure)
    if count == 0:
        return []
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    boxes = []
    for index, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or sizes[index] < min_pixels:
            continue
        boxes.append(Box(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
    return sorted(boxes, key=lambda b: (b.y0, b.x0, b.y1, b.x1))


def boxes_to_mask(boxes: Iterable[Box], height: int, width: int) -> np.ndarray:
    """Union of boxes as a ``(height, width)`` bool mask (pixel centres inside a box)."""
    mask = np.zeros((height, width), dtype=bool)
    for box in boxes:
        mask |= box.to_mask(height, width)
    return mask


def box_iou(a, b) -> float:
    """Intersection over union of two boxes given as ``(x0, y0, x1, y1)`` sequences (image pixels); 0 when
    disjoint or empty. Pure: pinned by hand-computed cases in tests."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
