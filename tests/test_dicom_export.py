"""Back to the hospital's viewer: annotations as a DICOM SR measurement report (TID 1500, SCOORD)
and explanation maps as DICOM Parametric Maps, read back with highdicom and pydicom.

Source images: real RSNA chest radiographs (``../shared/data/real/cxr_rsna_png``) wrapped as
Secondary Capture DICOM with patient identifiers in the header; boxes: their official RSNA boxes.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest

from annotations.geometry import Box, Point, Polygon
from softcam_core.cli import main
from tests.plugins.app import dicom_from_png

SECRET_NAME, SECRET_ID = "Doe^Jane", "PID-0042"
RSNA = "cxr_rsna_png"


def _rsna_boxes(real_data: Path, patient: str) -> list[Box]:
    with open(real_data / RSNA / "stage_2_train_labels.csv", newline="") as handle:
        return [Box(float(r["x"]), float(r["y"]), float(r["x"]) + float(r["width"]), float(r["y"]) + float(r["height"]))
                for r in csv.DictReader(handle) if r["patientId"] == patient and r["Target"] == "1"]


def test_annotations_export_as_sr_measurement_reports(real_data, db_env, session, tmp_path, capsys):
    from db import repository
    from softcam_core.dicom_export import read_measurement_report

    patient = "4b048bdc-0a0a-43ed-aa0d-5971e433874b"
    dicom = dicom_from_png(real_data / RSNA / "images" / f"{patient}.png", tmp_path / f"{SECRET_ID}.dcm",
                           patient_name=SECRET_NAME, patient_id=SECRET_ID)
    result = repository.import_images(session, [dicom], "cxr", modality="cxr")
    image = repository.get_image(session, result.accepted[0].image_id)
    repository.get_or_create_user(session, "ana", role="annotator")
    repository.get_or_create_user(session, "ben", role="annotator")
    boxes = _rsna_boxes(real_data, patient)
    assert len(boxes) == 2
    for box in boxes:
        repository.save_annotation(session, image, box, "opacity", user="ana")
    repository.save_annotation(session, image, Point(700.25, 400.5), "nodule", user="ben")
    repository.save_annotation(session, image, Polygon(((360, 150), (540, 160), (450, 500))), "opacity", user="ben")
    session.commit()

    out = tmp_path / "sr"
    assert main(["annotations", "export", "--format", "sr", "--cohort", "cxr", "--out", str(out)]) == 0
    assert "wrote 2 DICOM SR file(s)" in capsys.readouterr().out
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"{image.pseudonym}-ana-sr.dcm", f"{image.pseudonym}-ben-sr.dcm"]
    stored = pydicom.dcmread(repository.image_path(image))
    for path in files:
        blob = path.read_bytes()
        assert SECRET_ID.encode() not in blob and b"Doe" not in blob and patient.encode() not in blob
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID.name == "Comprehensive SR Storage"
        assert ds.PatientID == stored.PatientID and ds.StudyInstanceUID == stored.StudyInstanceUID
        assert ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
            .ReferencedSOPInstanceUID == stored.SOPInstanceUID

    ana = read_measurement_report(files[0])
    assert [s["observer"] for s in ana] == ["ana", "ana"] and [s["label"] for s in ana] == ["opacity", "opacity"]
    for shape, box in zip(ana, boxes):
        assert shape["graphic_type"] == "POLYLINE" and shape["referenced_sop_instance_uid"] == stored.SOPInstanceUID
        corners = [(box.x0, box.y0), (box.x1, box.y0), (box.x1, box.y1), (box.x0, box.y1), (box.x0, box.y0)]
        assert np.allclose(shape["coordinates"], corners)  # exact image-pixel coordinates, closed ring
    ben = read_measurement_report(files[1])
    assert [(s["graphic_type"], s["label"]) for s in ben] == [("POINT", "nodule"), ("POLYLINE", "opacity")]
    assert np.allclose(ben[0]["coordinates"], [(700.25, 400.5)])
    assert np.allclose(ben[1]["coordinates"], [(360, 150), (540, 160), (450, 500), (360, 150)])


def test_explain_writes_parametric_maps_that_keep_sign_and_reference_the_source(real_data, tiny_checkpoint, tmp_path):
    import highdicom as hd

    from softcam_core.imaging import load_image, preprocess
    from softcam_core.imaging.deid import deidentify
    from softcam_core.models import load_checkpoint

    patient = "719bb18b-a428-4fd8-9338-46f1187ffa5c"
    dicom = dicom_from_png(real_data / RSNA / "images" / f"{patient}.png", tmp_path / f"{SECRET_ID}.dcm",
                           patient_name=SECRET_NAME, patient_id=SECRET_ID)
    model = tiny_checkpoint("cxr")
    out = tmp_path / "maps"
    assert main(["explain", "--model", str(model), "--image", str(dicom), "--methods", "softcam,gradcam", "--dicom",
                 "--quiet", "--out", str(out)]) == 0
    source = deidentify(pydicom.dcmread(dicom))
    _, meta = load_checkpoint(model)
    _, geometry = preprocess(load_image(dicom), int(meta["img_size"]), meta["mean"], meta["std"])
    for method in ("softcam", "gradcam"):
        path = out / f"{method}-pm.dcm"
        blob = path.read_bytes()
        assert SECRET_ID.encode() not in blob and b"Doe" not in blob
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID.name == "Parametric Map Storage" and "FloatPixelData" in ds
        assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)
        referenced = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
        assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert ds.PatientID == source.PatientID != SECRET_ID
        expected = geometry.map_to_image(np.load(out / f"{method}.npy"))
        assert np.array_equal(ds.pixel_array, expected)  # float32 values, bit for bit
        mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert mapping.LUTLabel == method
        assert hd.pm.ParametricMap.from_dataset(ds).SOPInstanceUID == ds.SOPInstanceUID  # highdicom reads it
    evidence = pydicom.dcmread(out / "softcam-pm.dcm").pixel_array
    assert evidence.min() < 0 < evidence.max()  # SoftCAM evidence keeps its sign


def test_parametric_map_refuses_mismatched_maps(real_data, tmp_path):
    from softcam_core.dicom_export import measurement_report, parametric_map

    dicom = dicom_from_png(real_data / RSNA / "images" / "bc45556d-61f2-43c6-b886-21bdc59542e7.png", tmp_path / "x.dcm")
    source = pydicom.dcmread(dicom)
    with pytest.raises(ValueError, match=r"map \(10, 10\) does not match the image \(1024, 1024\)"):
        parametric_map(tmp_path / "pm.dcm", source, np.zeros((10, 10)), method="softcam", signed=True)
    bad = np.zeros((source.Rows, source.Columns), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        parametric_map(tmp_path / "pm.dcm", source, bad, method="softcam", signed=True)
    with pytest.raises(ValueError, match="no shapes"):
        measurement_report(tmp_path / "sr.dcm", source, [], observer="ana")
    assert not (tmp_path / "pm.dcm").exists() and not (tmp_path / "sr.dcm").exists()
