"""VOI windowing: modality-LUT values -> uint8 display values (DICOM PS3.3 C.11.2). Pure functions.

Used by the DICOM decoder, the 16-bit grey raster decoder and :meth:`MedicalImage.rewindow`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    """A VOI window in modality-LUT units (DICOM PS3.3 C.11.2.1.2).

    ``function`` is the VOI LUT Function: ``LINEAR`` (default), ``LINEAR_EXACT`` or ``SIGMOID``.
    """

    center: float
    width: float
    name: str
    function: str = "LINEAR"



def window(raw: np.ndarray, center: float, width: float, invert: bool = False, function: str = "LINEAR") -> np.ndarray:
    """Apply a VOI window to modality-LUT values and return uint8 display values (same shape).

    ``function="LINEAR"`` is DICOM PS3.3 C.11.2.1.2.1 with y in [0, 255]:
    ``x <= c - 0.5 - (w-1)/2 -> 0``; ``x > c - 0.5 + (w-1)/2 -> 255``;
    else ``((x - (c - 0.5)) / (w - 1) + 0.5) * 255``; requires ``width >= 1``.
    ``LINEAR_EXACT`` (C.11.2.1.3.2): ``((x - c) / w + 0.5) * 255`` clipped; ``SIGMOID`` (C.11.2.1.3.1):
    ``255 / (1 + exp(-4 (x - c) / w))``; both require ``width > 0``. Results are rounded half to even;
    ``invert=True`` (MONOCHROME1) returns ``255 - y``.
    """
    x = np.asarray(raw, dtype=np.float64)
    c, w = float(center), float(width)
    kind = (function or "LINEAR").upper()
    if not (math.isfinite(c) and math.isfinite(w)):
        raise ValueError(f"window centre/width must be finite, got {center!r}/{width!r}")
    if kind == "LINEAR":
        if w < 1:
            raise ValueError(f"LINEAR window width must be >= 1, got {width!r}")
        low = c - 0.5 - (w - 1) / 2
        high = c - 0.5 + (w - 1) / 2
        span = max(w - 1, 1e-12)  # w == 1 makes the ramp empty: only the two branches apply
        y = ((x - (c - 0.5)) / span + 0.5) * 255.0
        y = np.where(x <= low, 0.0, np.where(x > high, 255.0, y))
    elif kind == "LINEAR_EXACT":
        if w <= 0:
            raise ValueError(f"LINEAR_EXACT window width must be > 0, got {width!r}")
        y = ((x - c) / w + 0.5) * 255.0
        y = np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 255.0, y))
    elif kind == "SIGMOID":
        if w <= 0:
            raise ValueError(f"SIGMOID window width must be > 0, got {width!r}")
        with np.errstate(over="ignore"):
            y = 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    else:
        raise ValueError(f"unknown VOI LUT function {function!r} (LINEAR, LINEAR_EXACT or SIGMOID)")
    out = np.clip(np.rint(y), 0, 255).astype(np.uint8)
    return (255 - out) if invert else out


def percentile_window(raw: np.ndarray, low: float, high: float, name: str, ignore: np.ndarray | None = None) -> Window:
    """A LINEAR window spanning the ``low``..``high`` percentiles of ``raw`` (``ignore``: bool mask to skip)."""
    values = raw[~ignore] if ignore is not None and ignore.any() and not ignore.all() else raw
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Window(0.0, 1.0, name)
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    # LINEAR maps [c - w/2, c + w/2 - 1] onto [0, 255]; so the range [lo, hi] needs w = hi - lo + 1
    width = max(hi - lo + 1.0, 1.0)
    return Window(lo + width / 2.0, width, name)
