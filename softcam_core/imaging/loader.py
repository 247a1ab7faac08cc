"""``load_image``: bytes or a path -> MedicalImage, or one clear ImageLoadError."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .errors import ImageLoadError, _one_line, is_decoder_failure, quiet_logs
from .model import MODALITIES, MedicalImage
from .source import max_pixels_default, read_source


def infer_photo_modality(pixels: np.ndarray) -> str:
    """Guess the modality of a non-DICOM image from its pixels (pass ``modality=`` to override).

    colour + dark corners around a bright centre (the black surround of a fundus camera) -> fundus;
    other colour -> other; grey and wider than tall by >= 2 % (OCT B-scans are landscape) -> oct;
    other grey (square or portrait, like chest radiographs) -> cxr.
    """
    h, w = pixels.shape[:2]
    if pixels.ndim == 3:
        step = max(1, max(h, w) // 256)  # corners and centre are judged on a ~256-px subsample
        small = pixels[::step, ::step]
        h, w = small.shape[:2]
        luminance = small.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        ch, cw = max(1, h // 12), max(1, w // 12)
        corners = np.concatenate([luminance[:ch, :cw].ravel(), luminance[:ch, -cw:].ravel(),
                                  luminance[-ch:, :cw].ravel(), luminance[-ch:, -cw:].ravel()])
        centre = luminance[h // 3 : 2 * h // 3 + 1, w // 3 : 2 * w // 3 + 1]
        if float(np.median(corners)) < 20 and float(np.median(centre)) > 40:
            return "fundus"
        return "other"
    if w >= 1.02 * h:
        return "oct"
    return "cxr"


def load_image(source, *, name: str | None = None, modality: str | None = None, frame: int = 0,
               max_pixels: int | None = None) -> MedicalImage:
    """Decode PNG, JPEG, TIFF or DICOM (format sniffed from the content) into a MedicalImage.

    source: path, bytes or binary file object. name: file name used in messages and
    ``MedicalImage.name`` (default: the path's name, else ``"<upload>"``). modality: ``fundus | oct |
    cxr | other``; None infers it (DICOM header, else :func:`infer_photo_modality`). frame: page of a
    multi-page TIFF / frame of a multi-frame DICOM (0-based). max_pixels: cap per frame (default
    ``SOFTCAM_MAX_IMAGE_PIXELS`` or 200 MP). Any unreadable input raises :class:`ImageLoadError`.
    """
    from .deid import safe_metadata
    from .dicom import decode_dicom, infer_modality
    from .raster import decode_pillow, decode_tiff, describe_unknown, sniff

    data, label = read_source(source, name)
    label = Path(label).name or label
    if modality is not None and modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)):
        raise ImageLoadError(label, f"frame must be an integer, got {frame!r}")
    cap = int(max_pixels) if max_pixels is not None else max_pixels_default()
    kind = sniff(data)
    if kind is None:
        raise ImageLoadError(label, describe_unknown(data))
    try:
        if kind == "dicom":
            with quiet_logs("pydicom"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom warns per odd value; the file still loads
                decoded = decode_dicom(data, label, int(frame), cap)
                ds = decoded.dataset
                metadata = safe_metadata(ds)
                inferred = infer_modality(ds)
            return MedicalImage(
                pixels=decoded.pixels,
                modality=modality or inferred,
                name=label,
                spacing=decoded.spacing,
                spacing_source=decoded.spacing_source,
                metadata=metadata,
                raw=decoded.raw,
                windows=decoded.windows,
                flags=decoded.flags,
            )
        if kind == "tiff":
            pixels, raw, windows, flags, metadata = decode_tiff(data, label, int(frame), cap)
        else:
            pixels, raw, windows, flags, metadata = decode_pillow(data, label, kind, int(frame), cap)
    except ImageLoadError:
        raise
    except MemoryError:
        raise ImageLoadError(label, "not enough memory to decode the image") from None
    except RecursionError:
        raise ImageLoadError(label, "malformed file (nesting too deep)") from None
    except BaseException as exc:
        if not is_decoder_failure(exc):
            raise
        # Decoders parse untrusted bytes and raise every exception type (pydicom converts values
        # lazily, so even reading a header field can fail): all of it is "this file is unreadable".
        raise ImageLoadError(label, f"malformed {kind.upper()} data ({type(exc).__name__}: {_one_line(exc, 150)})") from None
    return MedicalImage(
        pixels=np.ascontiguousarray(pixels),
        modality=modality or infer_photo_modality(pixels),
        name=label,
        metadata=metadata,
        raw=raw,
        windows=windows,
        flags=flags,
    )
