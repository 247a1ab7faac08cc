"""DICOM decoding as a radiology viewer does it.

Order of operations (DICOM PS3.3 C.11 / PS3.4 N.2 grayscale pipeline):
stored values -> modality LUT (Rescale Slope/Intercept or Modality LUT Sequence) -> VOI LUT
(VOI LUT Sequence, else Window Center/Width, else an automatic percentile window) -> presentation
(MONOCHROME1 inverted) -> uint8 display pixels. Colour data (RGB, YBR_* converted to RGB by pydicom,
PALETTE COLOR through its palette) is scaled to 8 bits.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np

from .errors import ImageLoadError, _one_line, is_decoder_failure
from .windowing import Window, percentile_window, window

# Well-known display windows for CT-like data whose modality LUT gives Hounsfield units.
HU_PRESETS: tuple[Window, ...] = (
    Window(-600.0, 1500.0, "lung"),
    Window(50.0, 350.0, "mediastinum"),
    Window(400.0, 1800.0, "bone"),
    Window(40.0, 80.0, "brain"),
)
# Percentile ranges (low, high, name) for projection radiographs and other non-HU data, where raw
# values depend on the detector and fixed HU windows mean nothing.
PERCENTILE_PRESETS: tuple[tuple[float, float, str], ...] = (
    (0.5, 99.5, "auto"),
    (0.0, 100.0, "full range"),
    (5.0, 95.0, "high contrast"),
)

# Chest-radiograph presets as percentile ranges of displayed BRIGHTNESS (raw values, negated for
# MONOCHROME1): lungs are the dark part of a CXR, mediastinum and bone the bright part. Heuristic
# stand-ins for the HU windows, which do not exist for projection radiographs.
CXR_PRESETS: tuple[tuple[float, float, str], ...] = (
    (1.0, 60.0, "lung"),
    (30.0, 99.5, "mediastinum"),
    (60.0, 99.9, "bone"),
)

_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _as_list(value) -> list:
    """A DICOM value as a list (multi-valued elements are sequences, single values are not)."""
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def windows_from_dataset(ds) -> list[Window]:
    """Every Window Center/Width pair the file lists, named from WindowCenterWidthExplanation."""
    centers, widths = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centers is None or widths is None or centers == "" or widths == "":
        return []
    centers, widths = _as_list(centers), _as_list(widths)
    names = _as_list(ds.get("WindowCenterWidthExplanation"))
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    out: list[Window] = []
    for i, (c, w) in enumerate(zip(centers, widths)):
        try:
            c, w = float(c), float(w)
        except (TypeError, ValueError):
            continue
        if not (math.isfinite(c) and math.isfinite(w)) or w <= 0 or (function == "LINEAR" and w < 1):
            continue  # an invalid window in the header is skipped, not fatal
        label = str(names[i]).strip() if i < len(names) and str(names[i]).strip() else f"file window {i + 1}"
        out.append(Window(c, w, label, function))
    return out


def is_hounsfield(ds) -> bool:
    """True when modality-LUT output is in Hounsfield units (CT, or RescaleType HU)."""
    return str(ds.get("RescaleType", "")).upper() == "HU" or str(ds.get("Modality", "")).upper() == "CT"


def infer_modality(ds) -> str:
    """Map DICOM Modality / BodyPartExamined to the app's modality.

    CR, DX -> cxr; SC/DX-like with BodyPartExamined CHEST -> cxr; OCT, OPT -> oct; OP, XC (ophthalmic
    and external-camera photography) -> fundus; anything else -> other.
    """
    modality = str(ds.get("Modality", "") or "").upper()
    body_part = str(ds.get("BodyPartExamined", "") or "").upper()
    if modality in ("CR", "DX"):
        return "cxr"
    if modality in ("OCT", "OPT"):
        return "oct"
    if modality in ("OP", "XC"):
        return "fundus"
    if body_part in ("CHEST", "THORAX", "LUNG"):
        return "cxr"
    return "other"


@dataclass
class DicomPixels:
    """What :func:`decode_dicom` returns; metadata is added by the loader (from :mod:`.deid`)."""

    dataset: object
    pixels: np.ndarray
    raw: np.ndarray | None
    windows: list[Window]
    flags: dict
    spacing: tuple[float, float] | None
    spacing_source: str | None


def read_dataset(data: bytes, name: str):
    """Parse DICOM bytes (with or without the 128-byte preamble) into a pydicom Dataset."""
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises many types on malformed headers
        raise ImageLoadError(name, f"not a readable DICOM file ({type(exc).__name__}: {_one_line(exc, 150)})") from None
    if len(ds) == 0:
        raise ImageLoadError(name, "not a readable DICOM file (no data elements)")
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:
        # No file meta (raw dataset): the syntax is the encoding pydicom found while reading.
        implicit, little = getattr(ds, "original_encoding", (True, True))
        if implicit:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    return ds


def transfer_syntax_label(ds) -> str:
    uid = ds.file_meta.get("TransferSyntaxUID", "")
    try:
        label = uid.name if uid.name != str(uid) else ""
    except Exception:
        label = ""
    return f"{label} ({uid})" if label else str(uid or "unknown")


def _int_attr(ds, keyword: str, name: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise ImageLoadError(name, f"DICOM attribute {keyword} is missing or invalid ({value!r})") from None
    return value


def functional_group_item(ds, frame: int, macro: str):
    """The first item of functional-group macro ``macro`` (e.g. "PixelMeasuresSequence") that applies
    to ``frame`` of an enhanced multi-frame object (per-frame group first, then shared), or None."""
    for groups_keyword, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_keyword)
        if not groups or index >= len(groups):
            continue
        sequence = groups[index].get(macro)
        if sequence:
            return sequence[0]
    return None


def _spacing(ds, frame: int = 0) -> tuple[tuple[float, float] | None, str | None]:
    """(row, col) mm per pixel and the attribute it came from (top level, then enhanced Pixel Measures)."""
    measures = functional_group_item(ds, frame, "PixelMeasuresSequence")
    candidates = [(ds, "PixelSpacing"), (ds, "ImagerPixelSpacing")]
    if measures is not None:
        candidates.append((measures, "PixelSpacing"))
    for source, keyword in candidates:
        value = source.get(keyword)
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0 and math.isfinite(row) and math.isfinite(col):
            return (row, col), keyword
    return None, None


def _modality_lut(arr: np.ndarray, ds, frame: int) -> np.ndarray:
    """Stored values -> modality-LUT values (float32), for classic and enhanced multi-frame objects."""
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    transform = functional_group_item(ds, frame, "PixelValueTransformationSequence")
    if transform is not None and ("RescaleSlope" in transform or "RescaleIntercept" in transform):
        slope = float(transform.get("RescaleSlope", 1) or 1)
        intercept = float(transform.get("RescaleIntercept", 0) or 0)
        return (arr.astype(np.float64) * slope + intercept).astype(np.float32)
    return arr.astype(np.float32)


def _to_uint8_colour(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float64)
    top = float(2 ** max(1, min(int(bits), 32)) - 1)
    return np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)


# Rows x Columns x NumberOfFrames x SamplesPerPixel a header may claim (checked before any decoding):
# a 2,000-frame 1024 x 1024 cine loop fits, a header that asks for terabytes does not
MAX_SAMPLES_ALL_FRAMES = 2 * 1024**3


def decode_dicom(data: bytes, name: str, frame: int, max_pixels: int) -> DicomPixels:
    """Decode one frame of a DICOM file to display pixels, raw values and windows.

    Raises :class:`ImageLoadError` for: no pixel data, bad geometry, too many pixels, frame out of
    range, no decoder for the transfer syntax, and corrupt pixel data (the message names the syntax).
    """
    from pydicom.pixels import apply_color_lut, apply_voi_lut, get_decoder

    ds = read_dataset(data, name)
    if not any(k in ds for k in _PIXEL_DATA_KEYWORDS):
        sop = str(ds.get("SOPClassUID", "")) or "unknown"
        try:
            sop = ds.SOPClassUID.name
        except Exception:
            pass
        raise ImageLoadError(name, f"DICOM file has no pixel data (SOP class {sop})")
    rows = _int_attr(ds, "Rows", name)
    cols = _int_attr(ds, "Columns", name)
    frames = _int_attr(ds, "NumberOfFrames", name, default=1) if ds.get("NumberOfFrames") not in (None, "") else 1
    samples = _int_attr(ds, "SamplesPerPixel", name, default=1)
    if rows <= 0 or cols <= 0 or frames <= 0 or samples not in (1, 3):
        raise ImageLoadError(name, f"invalid DICOM image geometry ({rows}x{cols}, {frames} frames, {samples} samples)")
    if rows * cols > max_pixels:
        raise ImageLoadError(name, f"image too large: {cols}x{rows} = {rows * cols / 1e6:.0f} MP exceeds the {max_pixels / 1e6:.0f} MP limit")
    if rows * cols * frames * samples > MAX_SAMPLES_ALL_FRAMES:
        raise ImageLoadError(name, f"image too large: {frames} frames of {cols}x{rows} x {samples} samples exceed the "
                                   f"{MAX_SAMPLES_ALL_FRAMES / 1e9:.1f} G sample limit (read from the header, before decoding)")
    if not 0 <= frame < frames:
        raise ImageLoadError(name, f"frame {frame} out of range (file has {frames} frame{'s' if frames != 1 else ''})")
    ts = ds.file_meta.TransferSyntaxUID
    ts_label = transfer_syntax_label(ds)
    if "PixelData" in ds:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            raise ImageLoadError(name, f"unsupported transfer syntax {ts_label}") from None
        except Exception as exc:
            raise ImageLoadError(name, f"invalid transfer syntax {ts_label}: {_one_line(exc, 120)}") from None
        if not decoder.is_available:
            raise ImageLoadError(name, f"no decoder installed for transfer syntax {ts_label}")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    flags: dict = {}
    try:
        arr = _decode_frame(ds, frame, frames)
    except MemoryError:
        raise ImageLoadError(name, f"not enough memory to decode the pixel data ({rows}x{cols})") from None
    except BaseException as exc:  # ValueError/RuntimeError/OSError/Rust panics... on corrupt streams
        if not is_decoder_failure(exc):
            raise
        arr = _decode_repaired_jpeg(ds, frame, frames)
        if arr is None:
            raise ImageLoadError(name, f"cannot decode pixel data (transfer syntax {ts_label}): {_one_line(exc, 150)}") from None
        flags["jpeg_scan_header_repaired"] = True
    arr = np.asarray(arr)
    if frames > 1 and arr.ndim >= 3 and arr.shape[0] == frames and (samples == 1 or arr.ndim == 4):
        arr = arr[frame]  # a decoder that returned every frame
    expected = (rows, cols) if samples == 1 else (rows, cols, 3)
    if arr.shape != expected:
        raise ImageLoadError(name, f"decoded pixel array has shape {arr.shape}, header says {expected}")

    if str(ds.get("BurnedInAnnotation", "") or "").upper() == "YES":
        flags["burned_in_annotation"] = True
    if str(ds.get("LossyImageCompression", "") or "") == "01":
        flags["lossy_compressed"] = True
    spacing, spacing_source = _spacing(ds, frame)
    bits_stored = int(ds.get("BitsStored", 8) or 8)

    if samples == 3 or photometric == "PALETTE COLOR":
        try:
            if photometric == "PALETTE COLOR":
                arr = apply_color_lut(arr, ds)
                bits_stored = int(ds.RedPaletteColorLookupTableDescriptor[2])
        except Exception as exc:
            raise ImageLoadError(name, f"invalid palette colour lookup table: {_one_line(exc, 120)}") from None
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ImageLoadError(name, f"colour pixel data has unexpected shape {arr.shape}")
        return DicomPixels(ds, _to_uint8_colour(arr, bits_stored), None, [], flags, spacing, spacing_source)

    if photometric not in ("MONOCHROME1", "MONOCHROME2", ""):
        flags["photometric"] = photometric
    invert = photometric == "MONOCHROME1"
    if invert:
        flags["monochrome1"] = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = _modality_lut(arr, ds, frame) if "PixelData" in ds else arr.astype(np.float32)
    except Exception as exc:
        raise ImageLoadError(name, f"invalid modality LUT / rescale: {_one_line(exc, 120)}") from None
    if not np.isfinite(raw).all():
        raw = np.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)

    padding = None
    if ds.get("PixelPaddingValue") is not None:
        try:
            padding = arr == int(ds.PixelPaddingValue)
        except (TypeError, ValueError):
            padding = None
    windows = windows_from_dataset(ds)
    if not windows:  # enhanced multi-frame: Frame VOI LUT macro
        voi_item = functional_group_item(ds, frame, "FrameVOILUTSequence")
        if voi_item is not None:
            windows = windows_from_dataset(voi_item)
            if windows and "VOILUTFunction" not in voi_item and ds.get("VOILUTFunction"):
                windows = [Window(w.center, w.width, w.name, str(ds.VOILUTFunction).upper()) for w in windows]
    if is_hounsfield(ds):
        presets = list(HU_PRESETS)
    else:
        presets = [percentile_window(raw, lo, hi, label, padding) for lo, hi, label in PERCENTILE_PRESETS]
        if infer_modality(ds) == "cxr":
            # brightness percentile p is raw percentile 100 - p when MONOCHROME1 inverts the display
            presets += [
                percentile_window(raw, 100.0 - hi, 100.0 - lo, label, padding) if invert
                else percentile_window(raw, lo, hi, label, padding)
                for lo, hi, label in CXR_PRESETS
            ]
    names = {w.name for w in windows}
    windows += [p for p in presets if p.name not in names]

    pixels = None
    if "VOILUTSequence" in ds:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                voi = np.asarray(apply_voi_lut(raw, ds, index=0, prefer_lut=True), dtype=np.float64)
            descriptor = ds.VOILUTSequence[0].LUTDescriptor
            # Many LUTs declare 16-bit entries but use 10-12 of them: scale by the bits the
            # entries actually reach (as DCMTK does), within the declared depth.
            used_bits = max(8, int(np.max(voi, initial=0)).bit_length())
            top = float(2 ** min(used_bits, int(descriptor[2])) - 1)
            y = np.clip(np.rint(voi * (255.0 / top)), 0, 255).astype(np.uint8)
            pixels = (255 - y) if invert else y
            flags["voi_lut"] = str(ds.VOILUTSequence[0].get("LUTExplanation", "") or "VOI LUT")
        except Exception:
            pixels = None  # a broken LUT falls back to the windows below
    if pixels is None:
        if not windows:
            windows = [percentile_window(raw, 0.5, 99.5, "auto", padding)]
        first = windows[0]
        pixels = window(raw, first.center, first.width, invert=invert, function=first.function)
    return DicomPixels(ds, pixels, raw, windows, flags, spacing, spacing_source)


def _decode_frame(ds, index: int, frames: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds.pixel_array if frames == 1 else pixel_array(ds, index=index)


def repair_sequential_jpeg(stream: bytes) -> bytes | None:
    """Reset a sequential-DCT JPEG's scan header to Ss=0, Se=63, Ah=Al=0; None if nothing to repair.

    Some encoders write other spectral-selection values in sequential (SOF0/SOF1) scans, where they
    have no meaning; IJG libjpeg (used by most DICOM viewers) only warns, libjpeg-turbo/pylibjpeg
    refuse. pydicom's ``JPEG-lossy.dcm`` is such a file.
    """
    from .jpeg import SOS, JpegStructureError, segments

    sequential = False
    try:
        for segment in segments(stream):
            if segment.marker in (0xC0, 0xC1):
                sequential = True
            elif segment.is_frame_header:
                return None  # progressive / lossless / arithmetic: the scan fields mean something there
            if segment.marker == SOS:
                pos = segment.start
                if not sequential or segment.end - pos < 8:
                    return None
                spectral = pos + 5 + 2 * stream[pos + 4]
                if spectral + 2 >= len(stream) or tuple(stream[spectral : spectral + 3]) == (0, 63, 0):
                    return None
                data = bytearray(stream)
                data[spectral : spectral + 3] = bytes((0, 63, 0))
                return bytes(data)
    except JpegStructureError:
        return None
    return None


def _decode_repaired_jpeg(ds, index: int, frames: int) -> np.ndarray | None:
    """Retry a failed JPEG baseline/extended decode with repaired scan headers; None if not applicable."""
    import copy

    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit

    if ds.file_meta.get("TransferSyntaxUID") not in (JPEGBaseline8Bit, JPEGExtended12Bit):
        return None
    try:
        streams = list(generate_frames(ds.PixelData, number_of_frames=frames))
        if index >= len(streams):
            return None
        repaired = repair_sequential_jpeg(streams[index])
        if repaired is None:
            return None
        single = copy.copy(ds)  # shallow: only PixelData / NumberOfFrames differ
        single.PixelData = encapsulate([repaired])
        single["PixelData"].VR = "OB"
        if "NumberOfFrames" in single:
            single.NumberOfFrames = 1
        return _decode_frame(single, 0, 1)
    except BaseException as exc:
        if not is_decoder_failure(exc):
            raise
        return None
