"""`softcam report`: tables and rendering on hand-made results; the full pipeline behind `slow`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from softcam_core import evaluate as E
from softcam_core import report as R


def _per_image():
    rng = np.random.default_rng(1)
    rows = []
    for i in range(12):
        for model, method, ap in (("baseline", "gradcam", 0.3), ("dense", "softcam", 0.6), ("lasso", "softcam", 0.7)):
            rows.append({"model": model, "model_method": R._label(model, method), "image": f"im{i}",
                         "label": "healthy" if i % 4 == 0 else "diseased",
                         "method": method, "seconds": 0.1, "activation_precision": ap + 0.05 * rng.normal(),
                         "audc": 0.5 - ap / 2 + 0.02 * rng.normal(), "topk_precision_k5": ap})
    return pd.DataFrame(rows)


def test_labels():
    assert R._label("lasso", "softcam") == "SoftCAM lasso"
    assert R._label("baseline", "cascam:gradcam") == "cascam:gradcam"


def test_headline_and_paired_tables():
    per_image = _per_image()
    cohort = E.summarise(per_image, group="model_method", resamples=200)
    table = R.headline_table(cohort).set_index("method")
    assert list(table.index) == ["gradcam", "SoftCAM dense", "SoftCAM lasso"]
    cell = table.loc["SoftCAM lasso", "topk_precision_k5"]
    assert cell == "0.700 [0.700, 0.700] (12)"  # constant column: zero-width interval
    paired = E.paired_tests(per_image, group="model_method")
    versus = R.softcam_vs_posthoc(paired)
    # only SoftCAM-vs-post-hoc pairs, SoftCAM always first, difference signed accordingly
    assert set(versus["post-hoc"]) == {"gradcam"}
    assert set(versus["SoftCAM"]) == {"SoftCAM dense", "SoftCAM lasso"}
    row = versus[(versus["metric"] == "topk_precision_k5") & (versus["SoftCAM"] == "SoftCAM dense")].iloc[0]
    assert row["mean diff (SoftCAM − post-hoc)"] == "0.300"


def test_render_writes_markdown_and_html(tmp_path):
    per_image = _per_image()
    result = R.ModalityResult(
        "oct", per_image, pd.DataFrame(), E.summarise(per_image, group="model_method", resamples=100),
        E.paired_tests(per_image, group="model_method"),
        pd.DataFrame([{"model": "dense", "test_accuracy": 0.9}]), {"synth": 1.0},
    )
    config = R.ReportConfig(n=10, epochs=1, modalities=("oct",))
    command = R.canonical_command(tmp_path, config)
    assert "--n 10 --epochs 1 --seed 0" in command and "--modalities oct" in command
    md, page = R.render([result], config, tmp_path, command, 12.0, {})
    text = md.read_text()
    assert command in text and "## OCT" in text and "SoftCAM lasso" in text
    assert "0.700 [0.700, 0.700] (12)" in text
    html = page.read_text()
    assert html.startswith("<!doctype html>") and "<table" in html and "SoftCAM dense" in html


def test_accuracy_column_names_the_explained_model():
    per_image = _per_image()
    classification = pd.DataFrame([{"model": "baseline", "test_accuracy": 0.95},
                                   {"model": "dense", "test_accuracy": 0.5}, {"model": "lasso", "test_accuracy": 0.9}])
    accuracy = R.accuracy_by_label(per_image, classification)
    # post-hoc rows carry the baseline's accuracy, SoftCAM rows their own net's
    assert accuracy == {"gradcam": 0.95, "SoftCAM dense": 0.5, "SoftCAM lasso": 0.9}
    table = R.headline_table(E.summarise(per_image, group="model_method", resamples=50), accuracy=accuracy)
    assert list(table.columns[:2]) == ["method", "model test acc"]
    assert table.set_index("method").loc["SoftCAM dense", "model test acc"] == "0.500"
    assert R.accuracy_by_label(per_image, pd.DataFrame()) == {}


def test_findings_rank_rows_and_compare_lasso_with_dense():
    per_image = _per_image()
    result = R.ModalityResult(
        "oct", per_image, pd.DataFrame(), E.summarise(per_image, group="model_method", resamples=50),
        E.paired_tests(per_image, group="model_method"),
        pd.DataFrame([{"model": "baseline", "test_accuracy": 0.95, "test_n": 12},
                      {"model": "dense", "test_accuracy": 0.6, "test_n": 12}]), {},
    )
    lines = R.findings(result)
    assert lines[0].startswith("Test accuracy (12 images): baseline 0.950, dense 0.600.")
    assert "Below 0.9: dense" in lines[0]
    ranking = next(line for line in lines if line.startswith("Top-5 localization precision"))
    # topk is 0.3 / 0.6 / 0.7 per row by construction: lasso first, gradcam last
    assert ranking == ("Top-5 localization precision, best first (n = 12): SoftCAM lasso 0.700, "
                       "SoftCAM dense 0.600, gradcam 0.300.")
    assert not any(line.startswith("AUDC") for line in lines)  # no audc_diseased column yet
    derived = R.with_diseased_audc(result, R.ReportConfig(resamples=50))
    column = derived.per_image["audc_diseased"]
    # healthy images (every 4th) are left out of the diseased-only AUDC, the others copied
    assert column.isna().sum() == 9 and (column.dropna() == derived.per_image.loc[column.notna(), "audc"]).all()
    assert int(derived.cohort.set_index("model_method").loc["gradcam", "audc_diseased_n"]) == 9
    audc = next(line for line in R.findings(derived) if line.startswith("AUDC on diseased"))
    assert audc.index("SoftCAM lasso") < audc.index("gradcam")  # lower AUDC ranks first
    curves = pd.DataFrame({"image": ["im0", "im1", "im2"], "method": "gradcam", "s0": 1.0, "s1": [9.0, 0.2, 0.4]})
    ended = R.ModalityResult("oct", per_image, curves, derived.cohort, derived.paired, derived.classification, {})
    assert R.deletion_endpoint(ended) == pytest.approx(0.3)  # im0 is healthy: not counted
    assert any(line.startswith("Deletion: with every cell occluded") and "0.300" in line for line in R.findings(ended))
    versus = next(line for line in lines if line.startswith("Sparse vs dense SoftCAM on top-5"))
    assert "lasso − dense = 0.100 over 12 paired images: lasso better" in versus


def test_default_recipe_is_the_demo_recipe_with_4x4_maps():
    from softcam_core.demo import DEMO_SETTINGS
    from softcam_core.models import build_model

    config = R.ReportConfig()
    for key in ("n", "epochs", "synth_size", "split", "arch", "batch_size", "lr", "min_lr", "l1", "seed"):
        assert getattr(config, key) == getattr(DEMO_SETTINGS, key), key
    assert config.eval_limit is None  # the whole test split
    model = build_model(config.arch, 2, "softcam")
    assert R.feature_map_size(model, config.img_size) == "4x4"
    assert R.feature_map_size(model, 64) == "2x2"  # why the old 64 px default scored CAMs at 0


def test_cli_options_quick_preset_and_overrides():
    import argparse

    parser = argparse.ArgumentParser()
    R.register_cli(parser.add_subparsers())
    default = R.config_from_args(parser.parse_args(["report", "--out", "x"]))
    assert default == R.ReportConfig()
    quick = R.config_from_args(parser.parse_args(["report", "--out", "x", "--quick", "--epochs", "2"]))
    assert (quick.n, quick.epochs, quick.img_size, quick.eval_limit) == (R.QUICK["n"], 2, R.QUICK["img_size"],
                                                                          R.QUICK["eval_limit"])
    assert R.config_from_args(parser.parse_args(["report", "--out", "x", "--limit", "0"])).eval_limit is None
    # the canonical command reproduces the configuration it was made from
    command = R.canonical_command("x", quick).split()[1:]
    assert R.config_from_args(parser.parse_args(command)) == quick


def test_cli_rejects_unknown_modality(capsys, tmp_path):
    from softcam_core.cli import main

    assert main(["report", "--out", str(tmp_path), "--modalities", "mri"]) == 2
    assert "unknown modality mri" in capsys.readouterr().err


@pytest.mark.slow
def test_full_report_one_modality(tmp_path):
    config = R.ReportConfig(n=24, epochs=1, img_size=64, modalities=("oct",), methods=("gradcam", "cascam:gradcam"),
                            eval_limit=3, deletion_steps=4, resamples=100, png=False)
    md = R.run_report(tmp_path, config, command=R.canonical_command(tmp_path, config))
    text = md.read_text()
    for label in ("gradcam", "cascam:gradcam", "SoftCAM dense", "SoftCAM lasso", "SoftCAM ridge"):
        assert label in text
    per_image = pd.read_csv(tmp_path / "tables" / "oct_per_image.csv")
    assert set(per_image["model"]) == {"baseline", "dense", "lasso", "ridge"}
    assert (tmp_path / "figures" / "oct_topk_precision.html").is_file()


def test_modality_tables_are_reused_only_for_identical_settings(tmp_path):
    config = R.ReportConfig(n=10, epochs=1, modalities=("oct",))
    (tmp_path / "tables").mkdir()
    per_image = _per_image()
    per_image.to_csv(tmp_path / "tables" / "oct_per_image.csv", index=False)
    (tmp_path / "tables" / "oct_run.json").write_text(
        __import__("json").dumps({"settings": R._fingerprint(config), "seconds": {"synth": 2.0}}))
    loaded = R._load_modality(tmp_path, "oct", config)
    assert loaded is not None and loaded.seconds == {"synth": 2.0} and len(loaded.per_image) == len(per_image)
    # another modality list or PNG choice does not matter; any setting that changes numbers does
    assert R._load_modality(tmp_path, "oct", R.ReportConfig(n=10, epochs=1, modalities=("oct", "cxr"), png=False))
    assert R._load_modality(tmp_path, "oct", R.ReportConfig(n=10, epochs=2, modalities=("oct",))) is None
    assert R._load_modality(tmp_path, "cxr", config) is None
