"""``softcam explain`` (contract) on a real tiny checkpoint and a synthetic image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from softcam_core.cli import main
from softcam_core.explain.cli import parse_methods, parse_target


def _first_image(cohort):
    return sorted((cohort / "images").iterdir())[0]


def test_explain_cli_writes_maps_overlays_and_summary(tiny_checkpoint, synth_cohort, tmp_path):
    checkpoint = tiny_checkpoint("fundus")
    image = _first_image(synth_cohort("fundus"))
    out = tmp_path / "maps"
    methods = "softcam,gradcam,guided_backprop,cascam:gradcam"
    code = main(["explain", "--model", str(checkpoint), "--image", str(image), "--methods", methods,
                 "--target", "1", "--out", str(out), "--quiet"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    classes = list(summary["probabilities"])
    assert summary["target"] == {"index": 1, "class": classes[1], "requested": True}
    assert sum(summary["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert summary["prediction"]["class"] == max(summary["probabilities"], key=summary["probabilities"].get)
    size = summary["input_size"]
    assert size == [64, 64]
    for method, stem in [("softcam", "softcam"), ("gradcam", "gradcam"),
                         ("guided_backprop", "guided_backprop"), ("cascam:gradcam", "cascam-gradcam")]:
        heat = np.load(out / f"{stem}.npy")
        assert heat.dtype == np.float32 and heat.shape == tuple(size)
        overlay = Image.open(out / f"{stem}.png")
        assert overlay.size == tuple(size) and overlay.mode == "RGB"
        record = summary["methods"][method]
        assert record["seconds"] > 0 and record["npy"] == f"{stem}.npy"
        assert record["min"] == pytest.approx(float(heat.min()))
    assert summary["methods"]["softcam"]["signed"] is True
    assert summary["methods"]["gradcam"]["signed"] is False

    # --target by class name gives the same map as by index
    out_named = tmp_path / "named"
    assert main(["explain", "--model", str(checkpoint), "--image", str(image), "--methods", "softcam",
                 "--target", classes[1], "--out", str(out_named), "--quiet"]) == 0
    np.testing.assert_array_equal(np.load(out_named / "softcam.npy"), np.load(out / "softcam.npy"))


def test_explain_cli_errors_are_one_line(tiny_checkpoint, synth_cohort, tmp_path, capsys):
    checkpoint = tiny_checkpoint("fundus")
    image = _first_image(synth_cohort("fundus"))
    cases = [
        (["--methods", "gradcam++"], "unknown method 'gradcam++'"),
        (["--methods", "softcam", "--target", "nosuchclass"], "--target 'nosuchclass'"),
        (["--methods", "softcam", "--target", "7"], "outside"),
        (["--methods", "cam"], "use 'softcam'"),
        (["--methods", "gradcam,cascam:sanity:edge"], "cannot be cascaded"),
    ]
    for extra, message in cases:
        code = main(["explain", "--model", str(checkpoint), "--image", str(image), "--out", str(tmp_path / "x"),
                     "--quiet", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
    bad_image = tmp_path / "broken.png"
    bad_image.write_bytes(b"not a png")
    code = main(["explain", "--model", str(checkpoint), "--image", str(bad_image), "--methods", "softcam",
                 "--out", str(tmp_path / "y"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "broken.png" in err and len(err.splitlines()) == 1


def test_parsers():
    assert parse_methods("softcam, gradcam,cascam:gradcam,gradcam") == ["softcam", "gradcam", "cascam:gradcam"]
    with pytest.raises(ValueError):
        parse_methods(" , ")
    assert parse_target(None, ["healthy", "diseased"]) is None
    assert parse_target("diseased", ["healthy", "diseased"]) == 1
    assert parse_target("0", ["healthy", "diseased"]) == 0


def test_explain_cli_sanity_and_contrast_maps(tiny_checkpoint, synth_cohort, tmp_path):
    """The model-free sanity maps and the contrast map go through the same command and files."""
    checkpoint = tiny_checkpoint("fundus")
    out = tmp_path / "sanity"
    code = main(["explain", "--model", str(checkpoint), "--image", str(_first_image(synth_cohort("fundus"))),
                 "--methods", "sanity:edge,sanity:random,sanity:centre,softcam_contrast", "--out", str(out), "--quiet"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    for stem in ("sanity-edge", "sanity-random", "sanity-centre", "softcam_contrast"):
        heat = np.load(out / f"{stem}.npy")
        assert heat.dtype == np.float32 and heat.shape == (64, 64) and np.isfinite(heat).all()
        assert (out / f"{stem}.png").is_file()
    assert summary["methods"]["sanity:random"]["signed"] is True
    assert summary["methods"]["softcam_contrast"]["signed"] is True
    assert summary["methods"]["sanity:edge"]["min"] >= 0 and summary["methods"]["sanity:centre"]["max"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow
def test_explain_cli_cascam_retrain(tiny_checkpoint, synth_cohort, tmp_path):
    checkpoint = tiny_checkpoint("fundus")
    cohort = synth_cohort("fundus")
    out = tmp_path / "retrain"
    code = main(["explain", "--model", str(checkpoint), "--image", str(_first_image(cohort)),
                 "--methods", "cascam:gradcam", "--cascam-stages", "2", "--cascam-retrain", "--data", str(cohort),
                 "--out", str(out), "--quiet"])
    assert code == 0
    assert (out / "cascam-retrain" / "cascam-gradcam-stage1.pt").is_file()
    assert (out / "cascam-retrain" / "cascam-gradcam-stage1" / "labels.csv").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cascam"]["retrain"] is True
    assert np.load(out / "cascam-gradcam.npy").shape == (64, 64)


def _tree(folder):
    """{relative path: bytes} of every file under ``folder`` (what a refused run must leave as it was)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_explain_cli_refused_run_writes_nothing(synth_cohort, tmp_path, capsys):
    """A method that cannot explain the model (or an unknown one) is refused before --out is made, even
    after methods that could run; an existing --out folder is left byte for byte as it was."""
    from tests.plugins.app import make_tiny_checkpoint

    softcam = make_tiny_checkpoint(tmp_path / "softcam.pt")
    baseline = make_tiny_checkpoint(tmp_path / "baseline.pt", head="baseline")
    image = _first_image(synth_cohort("fundus"))
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    (kept / "summary.json").write_text('{"earlier": true}')
    before = _tree(kept)
    cases = [
        (softcam, "sanity:edge,cam", "use 'softcam'"),  # the sanity map could run first; cam cannot
        (baseline, "gradcam,softcam", "needs a SoftCAM net"),
        (baseline, "sanity:centre,cascam:softcam_contrast", "cascam:softcam_contrast: 'softcam_contrast' needs"),
        (softcam, "softcam,nosuch", "unknown method 'nosuch'"),
    ]
    for model, methods, message in cases:
        for out in (tmp_path / "new" / "maps", kept):
            code = main(["explain", "--model", str(model), "--image", str(image), "--methods", methods,
                         "--out", str(out), "--quiet"])
            err = capsys.readouterr().err.strip()
            assert code == 2 and message in err and len(err.splitlines()) == 1, (methods, err)
        assert not (tmp_path / "new").exists(), methods
        assert _tree(kept) == before, methods
    # --cascam-retrain with a cohort folder that is not there: refused before anything is trained or written
    code = main(["explain", "--model", str(softcam), "--image", str(image), "--methods", "cascam:gradcam",
                 "--cascam-retrain", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "new"), "--quiet"])
    assert code == 2 and "cohort folder not found" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # the same folder takes a good run, next to what was there
    assert main(["explain", "--model", str(softcam), "--image", str(image), "--methods", "softcam",
                 "--out", str(kept), "--quiet"]) == 0
    assert (kept / "notes.txt").read_text() == "mine" and (kept / "softcam.npy").is_file()


def test_explain_cli_output_carries_no_input_path_or_name(synth_cohort, tmp_path, capsys):
    """File names count as PHI: neither the DICOM input's path nor its name (nor its header's patient
    identifiers) reaches summary.json, the maps, the Parametric Maps, their file names or stdout; the
    summary names the image by the fingerprint of its decoded pixels, the app's image key."""
    from softcam_core.imaging import load_image
    from softcam_core.render import image_fingerprint
    from tests.plugins.app import dicom_from_png, make_tiny_checkpoint

    model = make_tiny_checkpoint(tmp_path / "m.pt", modality="cxr")
    folder = tmp_path / "Jane_Doe_1970-01-01"
    folder.mkdir()
    dicom = dicom_from_png(_first_image(synth_cohort("fundus")), folder / "Jane_Doe_PID-0042.dcm",
                           patient_name="Doe^Jane", patient_id="PID-0042")
    out = tmp_path / "maps"
    assert main(["explain", "--model", str(model), "--image", str(dicom), "--methods", "softcam,sanity:edge",
                 "--dicom", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["image_id"] == image_fingerprint(load_image(dicom).pixels)
    assert "image" not in summary
    secrets = ["Jane_Doe", "Doe^Jane", "PID-0042", "1970-01-01", dicom.name, dicom.stem, str(dicom)]
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert {p.name for p in files} == {"summary.json", "softcam.npy", "softcam.png", "softcam-pm.dcm",
                                       "sanity-edge.npy", "sanity-edge.png", "sanity-edge-pm.dcm"}
    for secret in secrets:
        assert secret not in printed.out, secret
        for path in files:
            assert secret not in str(path.relative_to(tmp_path / "maps")), (secret, path)
            assert secret.encode() not in path.read_bytes(), (secret, path.name)


def test_model_problem_agrees_with_explain():
    """The up-front check refuses exactly the methods explain() fails on, for a SoftCAM net, a GAP +
    Linear baseline and a plain nn.Sequential classifier (no automatic target layer, no CAM head)."""
    from torch import nn

    from softcam_core.explain import METHODS, explain
    from softcam_core.explain.cli import model_problem
    from tests.plugins.explain import hand_built_baseline, hand_built_softcam, square_image

    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    x = square_image([(8, 8, 8, 2.0)])[None]
    options = {"integrated_gradients": {"n_steps": 4}}
    for model in (hand_built_softcam(), hand_built_baseline(), plain):
        for method in [*METHODS, "cascam:cam", "cascam:softcam"]:
            problem = model_problem(model, method)
            try:
                extra = {"stages": 2} if method.startswith("cascam:") else options.get(method, {})
                explain(model, x, method, target=0, **extra)
            except ValueError as exc:
                assert problem is not None, (type(model).__name__, method, str(exc))
            else:
                assert problem is None, (type(model).__name__, method, problem)
    assert model_problem(plain, "gradcam").startswith("no automatic target layer")
    assert "unknown method" in model_problem(plain, "gradcam++")
