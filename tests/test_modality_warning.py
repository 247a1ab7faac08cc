"""A model of one modality run on images of another: `softcam explain`, `evaluate` and `predict` warn on
stderr (and go on), and explain / evaluate record the warning in summary.json / config.json. No
warning when both match or either is unknown (``other``, no modality recorded)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from softcam_core.cli import main
from tests.plugins.app import dicom_from_png, make_tiny_checkpoint

FAST_EVALUATE = ["--split", "all", "--limit", "2", "--steps", "3", "--topk", "1,2", "--bootstrap", "50",
                 "--no-figures", "--metrics", "topk,pointing_game"]


@pytest.fixture(scope="module")
def cohort(synth_cohort):
    return synth_cohort("fundus")  # the shared 24-image fundus cohort; synth_meta.json says fundus


@pytest.fixture(scope="module")
def fundus_png(cohort):
    return min((cohort / "images").iterdir())


@pytest.fixture(scope="module")
def chest_dicom(fundus_png, tmp_path_factory):
    """A DICOM whose header says chest (BodyPartExamined CHEST): a cxr image to the loader."""
    return dicom_from_png(fundus_png, tmp_path_factory.mktemp("dicom") / "scan.dcm")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {m: make_tiny_checkpoint(folder / f"{m}.pt", modality=m) for m in ("fundus", "cxr", "other")}


def test_the_rule():
    from softcam_core.inference import modality_warning

    assert "trained on fundus images but this image is cxr" in modality_warning("fundus", "cxr", "this image")
    for model, data in [("fundus", "fundus"), ("fundus", "other"), ("other", "cxr"), (None, "cxr"), ("oct", None),
                        ("oct", "")]:
        assert modality_warning(model, data) is None, (model, data)


def test_explain_warns_and_records_it(models, fundus_png, chest_dicom, tmp_path, capsys):
    out = tmp_path / "mismatch"
    assert main(["explain", "--model", str(models["fundus"]), "--image", str(chest_dicom), "--methods", "softcam",
                 "--out", str(out), "--quiet"]) == 0  # warned, not refused
    err = capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["modality"] == {"model": "fundus", "image": "cxr"}
    assert len(summary["warnings"]) == 1 and "trained on fundus images but this image is cxr" in summary["warnings"][0]
    assert f"softcam explain: warning: {summary['warnings'][0]}" in err
    for model, image in [("fundus", fundus_png), ("other", chest_dicom)]:  # matching; model modality unknown
        out = tmp_path / f"quiet-{model}"
        assert main(["explain", "--model", str(models[model]), "--image", str(image), "--methods", "softcam",
                     "--out", str(out), "--quiet"]) == 0
        assert "warning" not in capsys.readouterr().err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["warnings"] == [], model
    assert summary["modality"] == {"model": "other", "image": "cxr"}


def test_evaluate_warns_and_records_it(models, cohort, tmp_path, capsys):
    out = tmp_path / "mismatch"
    assert main(["evaluate", "--model", str(models["cxr"]), "--data", str(cohort), "--methods", "softcam",
                 "--out", str(out), *FAST_EVALUATE]) == 0
    err = capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["modality"] == {"model": "cxr", "cohort": "fundus"}
    assert len(config["warnings"]) == 1 and "trained on cxr images but the cohort folder" in config["warnings"][0]
    assert config["warnings"][0].endswith("is fundus; its predictions and maps may not be meaningful there")
    assert f"softcam evaluate: warning: {config['warnings'][0]}" in err
    from softcam_core.evaluate import read_result

    assert read_result(out).warnings == config["warnings"]  # what a report reads
    # the warning is no setting: a --resume with the matching model's settings is not refused for it
    assert "warnings" not in config["fingerprint"]
    # matching, and a cohort without a recorded modality: no warning
    unknown = tmp_path / "cohort-without-modality"
    shutil.copytree(cohort, unknown)
    (unknown / "synth_meta.json").unlink()
    for model, data in [("fundus", cohort), ("cxr", unknown)]:
        out = tmp_path / f"quiet-{model}"
        assert main(["evaluate", "--model", str(models[model]), "--data", str(data), "--methods", "softcam",
                     "--out", str(out), *FAST_EVALUATE]) == 0
        assert "warning" not in capsys.readouterr().err
        assert json.loads((out / "config.json").read_text())["warnings"] == [], model


def test_predict_warns(models, fundus_png, chest_dicom, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(models["fundus"]), "--images", str(fundus_png), str(chest_dicom),
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "softcam predict: warning: modality mismatch: the model was trained on fundus images but 1 image(s) " \
           f"({chest_dicom}) are cxr" in err
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == [str(fundus_png), str(chest_dicom)]  # the CSV is as before
    assert list(rows[0]) == ["image", "pred", "prob_healthy", "prob_disease"]
    for model in ("cxr", "other"):  # matching; model modality unknown
        assert main(["predict", "--model", str(models[model]), "--images", str(chest_dicom), "--out", str(out)]) == 0
        assert "warning" not in capsys.readouterr().err, model


def test_every_command_prepares_a_mismatched_image_as_its_model_was_trained(models, fundus_png, chest_dicom, tmp_path,
                                                                              capsys):
    """One preparation for predict, explain and the Review page: the checkpoint's modality decides the
    crop (fundus: the disc; else a letterbox), not the image's own, or the commands would show three
    different predictions for one file."""
    import numpy as np

    from softcam_core.imaging import load_image, preprocess
    from softcam_core.inference import load_model, model_input
    from service.image_session import ImageSession

    own = load_image(chest_dicom)
    assert own.modality == "cxr"
    model, meta = load_model(models["fundus"])
    x, _, prepared = model_input(chest_dicom, meta)
    assert prepared.modality == "fundus"
    as_own, _ = preprocess(own, int(meta["img_size"]), meta["mean"], meta["std"])
    assert not np.allclose(x.numpy(), as_own.numpy())  # the two crops differ: the test can tell them apart
    out = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(models["fundus"]), "--images", str(chest_dicom), "--out", str(out)]) == 0
    with open(out, newline="") as handle:
        [row] = list(csv.DictReader(handle))
    predicted = [float(row["prob_healthy"]), float(row["prob_disease"])]
    assert main(["explain", "--model", str(models["fundus"]), "--image", str(chest_dicom), "--methods", "softcam",
                 "--out", str(tmp_path / "maps"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "maps" / "summary.json").read_text())
    explained = [summary["probabilities"][c] for c in ("healthy", "disease")]
    session = ImageSession(model, meta, own, model_id="fundus")
    reviewed = [float(p) for p in session.predict().probabilities]
    np.testing.assert_allclose(explained, predicted, atol=1e-5)
    np.testing.assert_allclose(reviewed, predicted, atol=1e-5)
