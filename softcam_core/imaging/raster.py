"""PNG / JPEG / TIFF decoding (Pillow and tifffile) to display pixels."""

from __future__ import annotations

import io
import warnings

import numpy as np

from .errors import ImageLoadError, _one_line, quiet_logs
from .windowing import Window, percentile_window, window

# Formats told apart by their first bytes, never by the file extension.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),
    (b"MM\x00+", "tiff"),
)
# Recognisable non-image content, named in the error message.
_OTHER_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"GIF8", "a GIF image (not supported)"),
    (b"BM", "a BMP image (not supported)"),
    (b"RIFF", "a RIFF (WebP/AVI/WAV) file (not supported)"),
    (b"\x00\x00\x00\x0cjP  ", "a bare JPEG 2000 file (not supported; wrap it in DICOM)"),
)


def sniff(data: bytes) -> str | None:
    """``"png" | "jpeg" | "tiff" | "dicom"`` from the content, or None."""
    # DICM first: a DICOM preamble may itself hold a TIFF header (dual-personality files)
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    for signature, kind in _SIGNATURES:
        if data.startswith(signature):
            return kind
    # DICOM without the preamble: a little-endian group 0002 or 0008 tag followed by a plausible VR/length
    if len(data) >= 8 and data[0:2] in (b"\x02\x00", b"\x08\x00") and (data[4:6].isalpha() or data[6:8] == b"\x00\x00"):
        return "dicom"
    if len(data) >= 8 and data[0:2] in (b"\x00\x02", b"\x00\x08") and data[4:6].isalpha():
        return "dicom"  # explicit VR big endian without preamble
    return None


def describe_unknown(data: bytes) -> str:
    """Problem text for content that is not a supported image."""
    if not data:
        return "empty file (0 bytes)"
    for signature, what in _OTHER_SIGNATURES:
        if data.startswith(signature):
            return f"not a supported image: looks like {what}"
    head = data[:512]
    try:
        head.decode("utf-8")
        return "not a supported image: looks like a text file (expected PNG, JPEG, TIFF or DICOM)"
    except UnicodeDecodeError:
        return "not a supported image: unrecognised content (expected PNG, JPEG, TIFF or DICOM)"


def _check_size(name: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageLoadError(name, f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageLoadError(
            name, f"image too large: {width}x{height} = {width * height / 1e6:.0f} MP exceeds the {max_pixels / 1e6:.0f} MP limit"
        )


def _is_grey_rgb(rgb: np.ndarray) -> bool:
    """True when an RGB image carries grey content (channels equal up to JPEG-level noise)."""
    step = max(1, int(max(rgb.shape[:2]) // 1024))
    sample = rgb[::step, ::step].astype(np.int16)
    diff = np.maximum(np.abs(sample[..., 0] - sample[..., 1]), np.abs(sample[..., 1] - sample[..., 2]))
    # JPEG noise leaves small channel differences; a coloured marker or overlay (large ones) keeps RGB
    return float(np.percentile(diff, 99)) <= 3.0 and int(diff.max(initial=0)) <= 24


def _grey_from_array(arr: np.ndarray, flags: dict) -> tuple[np.ndarray, np.ndarray | None, list[Window]]:
    """uint8 display pixels, raw values and windows for a single-channel array of any depth."""
    if arr.dtype == np.bool_:
        return (arr.astype(np.uint8) * 255), None, []
    if arr.dtype == np.uint8:
        return arr, None, []
    raw = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    # >8-bit grey (16-bit CXR exports, float TIFF): keep raw values and show an automatic window
    windows = [percentile_window(raw, 0.5, 99.5, "auto"), percentile_window(raw, 0.0, 100.0, "full range")]
    flags["high_bit_depth"] = True
    return window(raw, windows[0].center, windows[0].width), raw, windows


def _colour_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale an RGB array of any integer/float depth to uint8 using its bit depth (not its contrast)."""
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.nan_to_num(arr.astype(np.float64))
        top = 1.0 if arr.max(initial=0.0) <= 1.0 else float(arr.max())
    else:
        peak = int(arr.max(initial=0))
        bits = min(max(8, int(peak).bit_length()), 32)  # e.g. 12-bit data stored in 16-bit words
        top = float(2**bits - 1)
    return np.clip(np.rint(arr.astype(np.float64) * (255.0 / max(top, 1e-12))), 0, 255).astype(np.uint8)


def _finish(arr: np.ndarray, flags: dict):
    """Shape-normalise a decoded array: (H, W) grey or (H, W, 3) RGB; alpha dropped."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):
        flags["alpha_dropped"] = True
        arr = arr[..., 0] if arr.shape[-1] == 2 else arr[..., :3]
    if arr.ndim == 2:
        return _grey_from_array(arr, flags)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"unsupported pixel layout {arr.shape}")
    rgb = _colour_to_uint8(arr)
    if _is_grey_rgb(rgb):
        flags["grey_stored_as_rgb"] = True
        grey = np.rint(rgb.astype(np.float32).mean(axis=2)).astype(np.uint8)
        return grey, None, []
    return rgb, None, []


def peek_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or JPEG SOFn header without decoding, or None if not found."""
    if kind == "png" and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if kind == "jpeg":
        from .jpeg import JpegStructureError, segments

        try:
            for segment in segments(data):
                if segment.is_frame_header and segment.end - segment.start >= 9:
                    p = segment.start
                    return int.from_bytes(data[p + 7 : p + 9], "big"), int.from_bytes(data[p + 5 : p + 7], "big")
        except JpegStructureError:
            return None
    return None


def decode_pillow(data: bytes, name: str, kind: str, frame: int, max_pixels: int):
    """PNG/JPEG (and TIFF fallback) via Pillow. Returns (pixels, raw, windows, flags, metadata)."""
    from PIL import Image, ImageOps

    flags: dict = {}
    header_size = peek_size(data, kind)
    if header_size is not None:
        _check_size(name, *header_size, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            _check_size(name, width, height, max_pixels)
            frames = int(getattr(image, "n_frames", 1) or 1)
            if not 0 <= frame < frames:
                raise ImageLoadError(name, f"frame {frame} out of range (file has {frames} frame{'s' if frames != 1 else ''})")
            if frame:
                image.seek(frame)
            image.load()
            orientation = image.getexif().get(0x0112, 1) if kind == "jpeg" else 1
            if orientation in (2, 3, 4, 5, 6, 7, 8):
                # show the photo upright, as every viewer does; annotations are drawn on these pixels
                image = ImageOps.exif_transpose(image)
                flags["exif_orientation_applied"] = int(orientation)
            mode = image.mode
            if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
                image = image.convert("RGBA" if "transparency" in image.info or mode in ("PA", "RGBa", "La") else "RGB")
            elif mode == "1":
                image = image.convert("L")
            arr = np.asarray(image)
            if mode.startswith("I;16"):
                arr = arr.astype(np.uint16)
            pixels, raw, windows = _finish(arr, flags)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError:
        size = f"{header_size[0]}x{header_size[1]} " if header_size else ""
        raise ImageLoadError(name, f"image too large: {size}exceeds Pillow's decompression-bomb limit") from None
    except MemoryError:
        raise ImageLoadError(name, "not enough memory to decode the image") from None
    except Exception as exc:  # Pillow raises OSError/SyntaxError/ValueError/struct.error... on corrupt data
        raise ImageLoadError(name, f"corrupt or truncated {kind.upper()} data ({_one_line(exc, 150)})") from None
    metadata = {"format": kind.upper(), "source_mode": mode, "frames": frames, "rows": int(pixels.shape[0]), "columns": int(pixels.shape[1])}
    return pixels, raw, windows, flags, metadata


def decode_tiff(data: bytes, name: str, frame: int, max_pixels: int):
    """TIFF via tifffile (8/16/32-bit, float, grey/RGB/palette, multi-page), Pillow as fallback."""
    import tifffile

    flags: dict = {}
    try:
        with warnings.catch_warnings(), quiet_logs("tifffile"):
            warnings.simplefilter("ignore")
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                pages = tif.pages
                frames = len(pages)
                if frames == 0:
                    raise ImageLoadError(name, "TIFF file has no pages")
                if not 0 <= frame < frames:
                    raise ImageLoadError(name, f"frame {frame} out of range (file has {frames} page{'s' if frames != 1 else ''})")
                page = pages[frame]
                _check_size(name, int(page.imagewidth), int(page.imagelength), max_pixels)
                if int(page.samplesperpixel or 1) > 4:
                    raise ImageLoadError(name, f"unsupported TIFF layout ({page.samplesperpixel} samples per pixel)")
                if int(page.imagedepth or 1) > 1:
                    raise ImageLoadError(name, "volumetric TIFF pages are not supported")
                arr = page.asarray()
                photometric = int(page.photometric)
                if photometric == 3 and page.colormap is not None:  # PALETTE
                    cmap = np.asarray(page.colormap)  # (3, 2**bits) uint16
                    arr = cmap[:, np.clip(arr, 0, cmap.shape[1] - 1)].transpose(1, 2, 0)
                if page.planarconfig == 2 and arr.ndim == 3 and arr.shape[0] in (3, 4):
                    arr = np.moveaxis(arr, 0, -1)
                if photometric == 0 and arr.ndim == 2:  # MINISWHITE: 0 is white
                    arr = (np.iinfo(arr.dtype).max - arr) if np.issubdtype(arr.dtype, np.integer) else arr.max() - arr
                pixels, raw, windows = _finish(np.asarray(arr), flags)
                source = f"{page.dtype}, photometric {page.photometric.name if hasattr(page.photometric, 'name') else photometric}"
    except ImageLoadError:
        raise
    except MemoryError:
        raise ImageLoadError(name, "not enough memory to decode the image") from None
    except Exception as first:  # e.g. a compression tifffile lacks a codec for: let Pillow try
        try:
            return decode_pillow(data, name, "tiff", frame, max_pixels)
        except ImageLoadError as second:
            if "too large" in second.problem or "out of range" in second.problem:
                raise
            raise ImageLoadError(name, f"corrupt or unsupported TIFF data ({_one_line(first, 120)})") from None
    metadata = {"format": "TIFF", "source_mode": source, "frames": frames, "rows": int(pixels.shape[0]), "columns": int(pixels.shape[1])}
    return pixels, raw, windows, flags, metadata
