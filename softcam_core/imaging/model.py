"""Data types shared by the imaging submodules."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .windowing import Window
from .windowing import window as window_values

MODALITIES = ("fundus", "oct", "cxr", "other")


@dataclass
class MedicalImage:
    """A decoded image, ready to show and to feed to :func:`softcam_core.imaging.preprocess`.

    pixels: display array, uint8, (H, W) grey or (H, W, 3) RGB. For DICOM grey images this is the
        modality-LUT values through the default window (MONOCHROME1 already inverted).
    modality: ``"fundus" | "oct" | "cxr" | "other"``.
    name: the file name (never a patient identifier).
    spacing: (row, col) millimetres per pixel, or None when the file does not say.
    spacing_source: ``"PixelSpacing"`` | ``"ImagerPixelSpacing"`` | None.
    metadata: de-identified fields only (safe to show and export).
    raw: float32 (H, W) modality-LUT values (DICOM, 16-bit grey photos) for re-windowing, else None.
    windows: windows to offer in a viewer (the file's own first, then presets); ``windows[0]`` made
        ``pixels`` unless ``flags["voi_lut"]`` says a VOI LUT did. Empty for 8-bit/colour data.
    flags: e.g. ``burned_in_annotation``, ``monochrome1``, ``voi_lut`` (its explanation),
        ``lossy_compressed``, ``jpeg_scan_header_repaired``, ``grey_stored_as_rgb``,
        ``exif_orientation_applied``, ``high_bit_depth``, ``alpha_dropped``.
    """

    pixels: np.ndarray
    modality: str
    name: str
    spacing: tuple[float, float] | None = None
    spacing_source: str | None = None
    metadata: dict = field(default_factory=dict)
    raw: np.ndarray | None = None
    windows: list[Window] = field(default_factory=list)
    flags: dict = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def is_colour(self) -> bool:
        return self.pixels.ndim == 3

    def rewindow(self, window: "Window") -> np.ndarray:
        """Display pixels (H, W) uint8 for another window; needs ``raw`` (DICOM / 16-bit grey)."""
        if self.raw is None:
            raise ValueError(f"{self.name}: no raw values to re-window (8-bit or colour image)")
        return window_values(
            self.raw, window.center, window.width, invert=bool(self.flags.get("monochrome1")), function=window.function
        )
