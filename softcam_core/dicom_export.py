"""DICOM objects a PACS or OHIF shows beside the original study (highdicom builds them):

* :func:`measurement_report`: annotations (boxes, points, polygons) of one annotator on one image as
  a Comprehensive SR measurement report (TID 1500): one planar ROI group (TID 1410) per shape,
  its region a 2D SCOORD (``POINT``; a box or polygon as a closed ``POLYLINE``, first point repeated)
  on the source image,
  its finding type the shape's label (coding scheme ``99SOFTCAM``), the annotator as the observer.
* :func:`parametric_map`: an explanation map over the source image's pixels as a Parametric Map
  (32-bit float pixel data: signed values stay signed), its real-world value mapping naming the
  method, referencing the source image.

Coordinates: DICOM SCOORD puts (0, 0) at the top-left corner of the top-left pixel and (1, 1) at
its bottom-right corner, the same continuous image-pixel coordinates as :mod:`annotations.geometry`,
so shapes are written and read back unchanged. Both objects copy the patient and study modules of
``source``, which must already be the de-identified file (the database's stored copy).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

LABEL_SCHEME = "99SOFTCAM"  # private coding scheme of our label names (PS3.16 8.2: 99 prefix)
MANUFACTURER = "SoftCAM Review"
IMAGING_PROCEDURE = ("363679005", "SCT", "Imaging procedure")


def _complete(source):
    """A copy of ``source`` with the type-2 patient / study attributes highdicom copies present
    (empty is valid; de-identification may have dropped them)."""
    source = copy.deepcopy(source)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if keyword not in source:
            setattr(source, keyword, "")
    return source


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("softcam-review")
    except PackageNotFoundError:
        return "dev"


def _graphic(shape) -> tuple[str, np.ndarray]:
    kind = getattr(shape, "kind", None)
    if kind == "point":
        return "POINT", np.array([[shape.x, shape.y]], dtype=np.float32)
    if kind == "box":
        corners = [(shape.x0, shape.y0), (shape.x1, shape.y0), (shape.x1, shape.y1), (shape.x0, shape.y1)]
    elif kind == "polygon":
        corners = [tuple(p) for p in shape.points]
    else:
        raise ValueError(f"a {kind or type(shape).__name__} cannot be written as an SR region (boxes, points, polygons)")
    return "POLYLINE", np.array(corners + [corners[0]], dtype=np.float32)  # closed: the first point repeated


def measurement_report(out: str | Path, source, shapes: Iterable[tuple[object, str | None]], *,
                       observer: str, series_number: int = 901) -> Path:
    """Write the shapes of one annotator on ``source`` (a pydicom Dataset of the de-identified
    single-frame image) as a TID 1500 measurement report to ``out``.

    ``shapes``: ``(geometry, label)`` with geometry an :mod:`annotations.geometry` Box, Point or
    Polygon in image pixels. ``observer``: the annotator's user name (a member of staff, not the
    patient). Raises ValueError for a multi-frame source or no shapes.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    shapes = list(shapes)
    if not shapes:
        raise ValueError(f"{Path(out).name}: no shapes to write")
    if int(getattr(source, "NumberOfFrames", 1) or 1) != 1:
        raise ValueError(f"{Path(out).name}: SR export supports single-frame images only")
    source = _complete(source)
    region_source = hd.sr.SourceImageForRegion(referenced_sop_class_uid=source.SOPClassUID,
                                               referenced_sop_instance_uid=source.SOPInstanceUID)
    groups = []
    for number, (shape, label) in enumerate(shapes, start=1):
        graphic_type, data = _graphic(shape)
        name = (label or "lesion")[:64]
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{name} {number}"),
            referenced_region=hd.sr.ImageRegion(graphic_type=graphic_type, graphic_data=data, source_image=region_source),
            finding_type=hd.sr.CodedConcept(value=name[:16], scheme_designator=LABEL_SCHEME, meaning=name),
            finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        ))
    procedure = hd.sr.CodedConcept(*IMAGING_PROCEDURE)
    context = hd.sr.ObservationContext(observer_person_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
                # a user name is one component: the trailing caret says so (PS3.5 6.2.1.2)
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name=observer[:63].replace("^", " ") + "^")))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=procedure,
                                     imaging_measurements=groups, title=codes.DCM.ImagingMeasurementReport)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        sr = hd.sr.ComprehensiveSR(evidence=[source], content=report, series_instance_uid=hd.UID(),
                                   series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
                                   manufacturer=MANUFACTURER, is_complete=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(out)
    return out


def read_measurement_report(path: str | Path) -> list[dict]:
    """The shapes of a report written by :func:`measurement_report`, read back with highdicom:
    ``{"graphic_type", "coordinates" (N, 2) float, "label", "referenced_sop_instance_uid", "observer"}``."""
    import highdicom as hd

    sr = hd.sr.srread(path)
    observer = ""
    for item in sr.ContentSequence:
        if getattr(item, "ConceptNameCodeSequence", None) and item.ConceptNameCodeSequence[0].CodeMeaning == "Person Observer Name":
            observer = str(item.PersonName).rstrip("^")
    out = []
    for group in sr.content.get_planar_roi_measurement_groups():
        roi = group.roi
        out.append({"graphic_type": roi.graphic_type.value, "coordinates": np.asarray(roi.value, dtype=np.float64),
                    "label": group.finding_type.meaning if group.finding_type is not None else None,
                    "referenced_sop_instance_uid": roi.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                    if hasattr(roi, "ReferencedSOPSequence") else
                    roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
                    "observer": observer})
    return out


def _parametric_map_class():
    """highdicom's ParametricMap, with one fix: for a source without a frame of reference (a
    secondary capture, most projection radiographs) highdicom 0.28 indexes the frames by
    FrameLabel but never writes that label, so building the object fails ("Unexpected mismatch
    between dimension index values"). The label and index are filled in before it checks them."""
    import highdicom as hd

    class ParametricMap(hd.pm.ParametricMap):
        def _build_luts(self) -> None:
            pointers = [item.DimensionIndexPointer for item in self.get("DimensionIndexSequence", [])]
            if pointers == [0x0020_9453]:  # FrameLabel only
                for number, item in enumerate(self.PerFrameFunctionalGroupsSequence, start=1):
                    content = item.FrameContentSequence[0]
                    if "FrameLabel" not in content:
                        content.FrameLabel = f"frame {number}"
                    content.DimensionIndexValues = [number]
            super()._build_luts()

    return ParametricMap


def parametric_map(out: str | Path, source, values: np.ndarray, *, method: str, signed: bool,
                   series_number: int = 902) -> Path:
    """Write an explanation map as a Parametric Map referencing ``source`` (the de-identified
    single-frame image). ``values``: float (Rows, Columns) over the image's pixels (e.g.
    ``Geometry.map_to_image`` of a model-input map); stored as 32-bit floats, so a signed map
    (SoftCAM evidence) keeps its sign. ``method``: the method name, the value mapping's label."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    values = np.asarray(values, dtype=np.float32)
    rows, cols = int(source.Rows), int(source.Columns)
    if values.shape != (rows, cols):
        raise ValueError(f"{Path(out).name}: map {values.shape} does not match the image ({rows}, {cols})")
    if not np.isfinite(values).all():
        raise ValueError(f"{Path(out).name}: the map has non-finite values")
    if int(getattr(source, "NumberOfFrames", 1) or 1) != 1:
        raise ValueError(f"{Path(out).name}: Parametric Map export supports single-frame images only")
    source = _complete(source)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1e-6
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=method[:16], lut_explanation=f"{method} {'signed evidence' if signed else 'saliency'}"[:64],
        unit=codes.UCUM.NoUnits, value_range=(low, high), intercept=0.0, slope=1.0)
    limit = max(abs(low), abs(high))
    centre, width = (0.0, 2 * limit) if signed else ((low + high) / 2, high - low)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        pm = _parametric_map_class()(
            source_images=[source], pixel_array=values[None], series_instance_uid=hd.UID(), series_number=series_number,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
            manufacturer_model_name="SoftCAM Review", software_versions=_version(), device_serial_number="none",
            contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=centre, window_width=max(width, 1e-6))],
            content_label=method.upper().replace(":", "_")[:16],
            content_description=f"explanation map: {method}"[:64])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pm.save_as(out)
    return out


def shapes_for_report(annotations: Sequence) -> list[tuple[object, str | None]]:
    """``(geometry, label)`` of the annotations an SR can carry (boxes, points, polygons)."""
    from annotations.geometry import geometry_from_json

    return [(geometry_from_json(a.kind, a.geometry), a.label) for a in annotations if a.kind in ("box", "point", "polygon")]
