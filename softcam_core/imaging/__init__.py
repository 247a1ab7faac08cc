"""Medical image input: every file the app, CLI and training read goes through here.

``load_image`` turns bytes into a :class:`MedicalImage` (display pixels, modality, spacing, safe
metadata, DICOM raw values and windows) or raises :class:`ImageLoadError`; ``preprocess`` is the one
path from a MedicalImage to a model input; ``deidentify`` / ``deidentified_bytes`` strip identifiers.
Rules: docs/imaging.md.
"""

from .deid import burned_in_text_risk, deid_key, deidentified_bytes, deidentify, pseudonym, remap_uid, safe_metadata
from .dicom import HU_PRESETS, infer_modality
from .errors import ImageLoadError
from .loader import infer_photo_modality, load_image
from .model import MODALITIES, MedicalImage
from .preprocessing import Geometry, denormalise, detect_fundus_circle, geometry_for, preprocess
from .raster import sniff
from .source import DEFAULT_MAX_PIXELS
from .windowing import Window, window

__all__ = [
    "DEFAULT_MAX_PIXELS", "Geometry", "HU_PRESETS", "ImageLoadError", "MODALITIES", "MedicalImage", "Window",
    "burned_in_text_risk", "denormalise", "deid_key", "deidentified_bytes", "deidentify", "detect_fundus_circle", "geometry_for", "infer_modality",
    "infer_photo_modality", "load_image", "preprocess", "pseudonym", "remap_uid", "safe_metadata", "sniff", "window",
]
