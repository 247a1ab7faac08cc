"""Reading an image source (path, bytes, open binary file) into bytes, with the size caps every decoder uses."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ImageLoadError, _one_line

DEFAULT_MAX_PIXELS = 200_000_000  # decompression-bomb cap per decoded frame (pixels)
MAX_FILE_BYTES = 2 * 1024**3


def max_pixels_default() -> int:
    """Pixel cap per frame: ``SOFTCAM_MAX_IMAGE_PIXELS`` or 200 MP."""
    try:
        return int(os.environ.get("SOFTCAM_MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS))
    except ValueError:
        return DEFAULT_MAX_PIXELS


def read_source(source, name: str | None) -> tuple[bytes, str]:
    """``(bytes, label)`` of a path, bytes or binary file object; ``label`` names it in errors (a file name)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), name or "<upload>"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or path.name or str(path)
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise ImageLoadError(label, f"file too large ({size / 1e9:.1f} GB)")
            return path.read_bytes(), label
        except ImageLoadError:
            raise
        except FileNotFoundError:
            raise ImageLoadError(label, "file not found") from None
        except IsADirectoryError:
            raise ImageLoadError(label, "is a directory, not an image file") from None
        except OSError as exc:
            raise ImageLoadError(label, f"cannot read file ({exc.strerror or _one_line(exc, 100)})") from None
    if hasattr(source, "read"):  # an open binary file, e.g. a Streamlit UploadedFile
        label = name or Path(str(getattr(source, "name", "") or "<upload>")).name
        data = source.read()
        if not isinstance(data, (bytes, bytearray)):
            raise ImageLoadError(label, "file object did not return bytes")
        return bytes(data), label
    raise TypeError(f"load_image expects a path, bytes or a binary file, got {type(source).__name__}")
