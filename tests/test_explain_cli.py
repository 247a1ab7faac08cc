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
