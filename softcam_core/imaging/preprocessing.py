"""THE preprocessing path from a MedicalImage to a model input (training, CLI and app all use it).

Every modality maps an axis-aligned square of the original image (integer offset ``(x0, y0)``, side
``side``; parts outside the image are black padding) onto the ``size x size`` input:
  fundus: the square circumscribing the detected retina circle (crop; the circle may be clipped by
          the photo's top/bottom edge, which then becomes padding);
  oct, cxr, other: letterbox: the centred square of side ``max(H, W)`` (pad, keep aspect, never crop).
The square is resampled with Pillow's antialiased bilinear filter, per channel in float32. Masks use
the very same resampler (then ``>= 0.5``), boxes the same affine map, so annotations land on the
pixels the model sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import MedicalImage

# pixels at or below this fraction of the bright (99th-percentile) red level count as background
FUNDUS_BACKGROUND_FRACTION = 0.10
FUNDUS_MIN_THRESHOLD = 12.0  # uint8 levels: stays above JPEG ringing in the black surround
_DETECTION_SIDE = 512  # circle detection runs on a copy at most this large


@dataclass(frozen=True)
class Geometry:
    """Original image pixels <-> model input pixels.

    Coordinates are continuous pixel-edge coordinates (pixel ``i`` covers ``[i, i+1)``), boxes are
    ``(x0, y0, x1, y1)`` with exclusive ends. Input coordinate = ``(original - offset) * scale``.

    height, width: original image size (pixels). x0, y0: top-left of the mapped square in original
    pixels (negative when padding). side: the square's side (original pixels). size: model input side.
    method: ``"fundus_crop"`` or ``"letterbox"``. circle: ``(cx, cy, r)`` of the retina (original
    pixels) when found.
    """

    height: int
    width: int
    x0: int
    y0: int
    side: int
    size: int
    method: str
    circle: tuple[float, float, float] | None = None

    @property
    def scale(self) -> float:
        """Model input pixels per original pixel."""
        return self.size / self.side

    def boxes_to_input(self, boxes) -> np.ndarray:
        """(N, 4) xyxy boxes in original pixels -> (N, 4) float64 in input pixels, clipped to the input."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        out = (b - np.array([self.x0, self.y0, self.x0, self.y0], dtype=np.float64)) * self.scale
        return np.clip(out, 0.0, float(self.size))

    def boxes_to_image(self, boxes) -> np.ndarray:
        """(N, 4) xyxy boxes in input pixels -> (N, 4) float64 in original pixels (inverse of boxes_to_input)."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        return b / self.scale + np.array([self.x0, self.y0, self.x0, self.y0], dtype=np.float64)

    def points_to_input(self, points) -> np.ndarray:
        """(N, 2) xy points in original pixels -> (N, 2) float64 input pixels (not clipped)."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return (p - np.array([self.x0, self.y0], dtype=np.float64)) * self.scale

    def resample(self, channel: np.ndarray) -> np.ndarray:
        """One (H, W) channel of the original -> (size, size) float32 model-input pixels (same units)."""
        from PIL import Image

        channel = np.asarray(channel, dtype=np.float32)
        if channel.shape != (self.height, self.width):
            raise ValueError(f"expected an array of shape {(self.height, self.width)}, got {channel.shape}")
        square = np.zeros((self.side, self.side), dtype=np.float32)
        # overlap of the square [x0, x0+side) x [y0, y0+side) with the image [0, W) x [0, H)
        sx0, sy0 = max(0, self.x0), max(0, self.y0)
        sx1, sy1 = min(self.width, self.x0 + self.side), min(self.height, self.y0 + self.side)
        if sx1 > sx0 and sy1 > sy0:
            square[sy0 - self.y0 : sy1 - self.y0, sx0 - self.x0 : sx1 - self.x0] = channel[sy0:sy1, sx0:sx1]
        if self.side == self.size:
            return square
        resized = Image.fromarray(square, mode="F").resize((self.size, self.size), Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.float32)

    def mask_to_input(self, mask) -> np.ndarray:
        """(H, W) mask in original pixels -> (size, size) bool, resampled exactly like the image."""
        return self.resample(np.asarray(mask) > 0) >= 0.5

    def map_to_image(self, saliency) -> np.ndarray:
        """(size, size) map on the model input -> (H, W) float32 over the original image.

        Bilinear upsampling to the square, then the square placed at ``(x0, y0)``; original pixels
        outside the square (cropped away for fundus) get 0.
        """
        from PIL import Image

        m = np.asarray(saliency, dtype=np.float32)
        if m.shape != (self.size, self.size):
            raise ValueError(f"expected a map of shape {(self.size, self.size)}, got {m.shape}")
        if self.side == self.size:
            square = m
        else:
            square = np.asarray(Image.fromarray(np.ascontiguousarray(m), mode="F").resize((self.side, self.side), Image.Resampling.BILINEAR), dtype=np.float32)
        out = np.zeros((self.height, self.width), dtype=np.float32)
        sx0, sy0 = max(0, self.x0), max(0, self.y0)
        sx1, sy1 = min(self.width, self.x0 + self.side), min(self.height, self.y0 + self.side)
        if sx1 > sx0 and sy1 > sy0:
            out[sy0:sy1, sx0:sx1] = square[sy0 - self.y0 : sy1 - self.y0, sx0 - self.x0 : sx1 - self.x0]
        return out


def _fit_circle(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float, float] | None:
    """Least-squares (Kasa) circle through points: x^2 + y^2 + D x + E y + F = 0."""
    if xs.size < 8:
        return None
    a = np.column_stack([xs, ys, np.ones_like(xs)])
    b = -(xs**2 + ys**2)
    (d, e, f), *_ = np.linalg.lstsq(a, b, rcond=None)
    cx, cy = -d / 2.0, -e / 2.0
    r2 = cx * cx + cy * cy - f
    if not np.isfinite(r2) or r2 <= 0:
        return None
    return float(cx), float(cy), float(np.sqrt(r2))


def detect_fundus_circle(pixels: np.ndarray) -> tuple[float, float, float] | None:
    """Find the retina disc of a fundus photograph: ``(cx, cy, r)`` in original pixels, or None.

    Thresholds the red channel (grey: the luminance) at ``max(12, 0.10 * p99)``, keeps the largest
    connected bright region with holes filled, and fits a circle (least squares, twice re-fitted
    without outliers) to its border points that are neither on the photo's edge nor on long straight
    chords: a disc clipped by the frame or by a camera mask is still fitted from its curved sides.
    """
    from PIL import Image
    from scipy import ndimage

    channel = pixels[..., 0] if pixels.ndim == 3 else pixels
    h, w = channel.shape
    factor = min(1.0, _DETECTION_SIDE / max(h, w))
    small_w, small_h = max(1, round(w * factor)), max(1, round(h * factor))
    small = np.asarray(Image.fromarray(np.ascontiguousarray(channel)).resize((small_w, small_h), Image.Resampling.BOX), dtype=np.float32)
    threshold = max(FUNDUS_MIN_THRESHOLD, FUNDUS_BACKGROUND_FRACTION * float(np.percentile(small, 99)))
    mask = ndimage.binary_opening(small > threshold, iterations=2)
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    disc = ndimage.binary_fill_holes(labels == (int(np.argmax(sizes)) + 1))
    if disc.sum() < 0.05 * small.size:
        return None
    border = disc & ~ndimage.binary_erosion(disc)
    # Straight chords (a camera mask flattening the disc top/bottom, as in many EyePACS photos) are
    # not on the circle: drop rows/columns where the border runs straight for a long stretch.
    long_run = max(6, int(0.08 * max(small_h, small_w)))
    border[border.sum(axis=1) > long_run, :] = False
    border[:, border.sum(axis=0) > long_run] = False
    ys, xs = np.nonzero(border)
    keep = (xs > 1) & (xs < small_w - 2) & (ys > 1) & (ys < small_h - 2)
    xs, ys = xs[keep].astype(np.float64) + 0.5, ys[keep].astype(np.float64) + 0.5
    circle = _fit_circle(xs, ys)
    if circle is None:
        return None
    for _ in range(2):  # drop border points off the circle (eyelash shadows, notches), refit
        cx, cy, r = circle
        residual = np.abs(np.hypot(xs - cx, ys - cy) - r)
        inliers = residual <= max(2.0, 0.02 * r)
        if inliers.sum() < 0.5 * xs.size:
            return None
        refit = _fit_circle(xs[inliers], ys[inliers])
        if refit is None:
            return None
        circle = refit
    cx, cy, r = (v / factor for v in circle)
    if not (0 <= cx <= w and 0 <= cy <= h and 0.2 * min(h, w) <= r <= 0.75 * max(h, w)):
        return None
    return cx, cy, r


def geometry_for(image: MedicalImage, size: int) -> Geometry:
    """The square of ``image`` that :func:`preprocess` maps onto the ``size x size`` input."""
    if int(size) <= 0:
        raise ValueError(f"input size must be positive, got {size}")
    h, w = image.pixels.shape[:2]
    if image.modality == "fundus":
        circle = detect_fundus_circle(image.pixels)
        if circle is not None:
            cx, cy, r = circle
            side = max(1, int(round(2 * r)))
            return Geometry(h, w, int(round(cx - r)), int(round(cy - r)), side, int(size), "fundus_crop", circle)
    side = max(h, w)
    return Geometry(h, w, (w - side) // 2, (h - side) // 2, side, int(size), "letterbox")


def _per_channel(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, 3)
    if arr.size != 3:
        raise ValueError(f"{name} must have 1 or 3 values, got {arr.size}")
    return arr


def preprocess(image: MedicalImage, size: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """MedicalImage -> (float32 tensor (3, size, size), Geometry).

    Modality-aware square (see module doc), antialiased bilinear resize, grey replicated to three
    channels, values scaled to [0, 1] then ``(x - mean) / std`` per channel.
    """
    import torch

    geometry = geometry_for(image, size)
    mean_arr, std_arr = _per_channel(mean, "mean"), _per_channel(std, "std")
    if np.any(std_arr <= 0):
        raise ValueError(f"std must be positive, got {std_arr.tolist()}")
    pixels = image.pixels
    if pixels.ndim == 2:
        grey = geometry.resample(pixels) / 255.0
        channels = np.stack([grey, grey, grey])
    else:
        channels = np.stack([geometry.resample(pixels[..., c]) / 255.0 for c in range(3)])
    channels = (channels - mean_arr[:, None, None]) / std_arr[:, None, None]
    return torch.from_numpy(np.ascontiguousarray(channels, dtype=np.float32)), geometry


def denormalise(x, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> np.ndarray:
    """The inverse of :func:`preprocess`'s normalisation: a model input as the model sees it.

    ``x``: float tensor or array (3, S, S), normalised. Returns uint8 RGB (S, S, 3): ``x * std + mean``
    per channel, clipped to [0, 1], times 255, rounded. Used for CasCAM's masked stage inputs and
    ``softcam explain``'s ``input.png``.
    """
    values = x.detach().cpu().float().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)
    if values.ndim != 3 or values.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) model input, got shape {tuple(values.shape)}")
    mean_arr, std_arr = _per_channel(mean, "mean"), _per_channel(std, "std")
    rgb = np.clip(values * std_arr[:, None, None] + mean_arr[:, None, None], 0.0, 1.0)
    return (rgb.transpose(1, 2, 0) * 255).round().astype(np.uint8)
