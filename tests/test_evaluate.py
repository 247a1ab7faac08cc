"""`evaluate_cohort` / `softcam evaluate` on a tiny synthetic cohort with a tiny checkpoint."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from softcam_core import evaluate as E

METHODS = ["softcam", "gradcam"]
FAST = dict(split="all", limit=4, deletion_steps=4, topk=(1, 3), resamples=200, png=False)


@pytest.fixture(scope="module")
def cohort(synth_cohort):
    """The shared 24-image fundus cohort (tests/plugins/cohort.py)."""
    return synth_cohort("fundus")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    """The shared barely-trained 64 px ResNet-18 SoftCAM checkpoint (tests/plugins/models.py)."""
    return tiny_checkpoint("fundus")


def _run(checkpoint, cohort, out, **kw):
    from softcam_core.models import load_checkpoint

    model, meta = load_checkpoint(checkpoint)
    options = dict(FAST)
    options.update(kw.pop("settings", {}))
    return E.evaluate_cohort(model, meta, cohort, METHODS, None, out, settings=E.EvalSettings(**options), **kw)


@pytest.fixture(scope="module")
def one_run(checkpoint, cohort, tmp_path_factory):
    calls = []
    out = tmp_path_factory.mktemp("one_run")
    result = _run(checkpoint, cohort, out, progress=lambda done, total, msg: calls.append((done, total, msg)))
    return result, calls


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=["seconds"]).sort_values(["image", "method"]).reset_index(drop=True)


def test_outputs_and_columns(one_run):
    result, calls = one_run
    out = result.out_dir
    for name in ("per_image.csv", "cohort.csv", "paired.csv", "per_image.parquet", "cohort.parquet",
                 "paired.parquet", "deletion_curves.csv", "config.json"):
        assert (out / name).is_file(), name
    for name in ("topk_precision", "deletion_curves", "metric_boxplots"):
        assert (out / "figures" / f"{name}.html").is_file()
    per_image = pd.read_csv(out / "per_image.csv")
    assert len(per_image) == 4 * len(METHODS)
    expected = list(E.ID_COLUMNS) + E.EvalSettings(**FAST).columns() + ["notes"]
    assert list(per_image.columns) == expected
    assert {"topk_precision_k1", "topk_precision_k3", "audc", "iou_top15", "energy_top15"} <= set(per_image.columns)
    assert set(per_image["method"]) == set(METHODS)
    assert (per_image["target"] == "diseased").all()  # binary model, default target policy
    # localization metrics are undefined exactly on images without lesions, and say why
    healthy = per_image["label"] == "healthy"
    assert per_image.loc[healthy, "activation_precision"].isna().all()
    assert per_image.loc[healthy, "notes"].str.contains("empty annotation mask").all()
    assert per_image["activation_consistency"].notna().any()
    curves = pd.read_csv(out / "deletion_curves.csv")
    assert list(curves.columns) == ["image", "method", "s0", "s1", "s2", "s3", "s4"]
    assert np.allclose(curves["s0"], 1.0)
    cohort = pd.read_csv(out / "cohort.csv")
    assert list(cohort["method"]) == METHODS
    for col in ("activation_precision", "audc", "seconds"):
        assert {f"{col}_mean", f"{col}_std", f"{col}_ci_low", f"{col}_ci_high", f"{col}_n"} <= set(cohort.columns)
    assert (cohort["audc_n"] == 4).all()
    paired = pd.read_csv(out / "paired.csv")
    assert set(paired["metric"]) == set(E.metric_columns(per_image))
    assert (paired[["method_a", "method_b"]].values == ["softcam", "gradcam"]).all()
    assert pd.read_parquet(out / "per_image.parquet").shape == per_image.shape
    # progress: done counts up by one per image x method, from 0 to total; within a batch, calls
    # at the same count say what is being computed (each method's maps, then the deletion curves)
    counts = [c[0] for c in calls]
    assert calls[0][:2] == (0, 8) and calls[-1][:2] == (8, 8) and {c[1] for c in calls} == {8}
    assert counts == sorted(counts) and sorted(set(counts)) == list(range(9))
    assert len([c for c in calls if c[2].endswith("maps of 4 image(s)")]) == 2  # 2 methods x 1 batch of 4
    assert len([c for c in calls if c[2] == "deletion curves of 8 map(s)"]) == 1


def test_resume_after_a_stop_gives_the_same_rows(one_run, checkpoint, cohort, tmp_path):
    result, _ = one_run
    out = tmp_path / "resumed"
    _run(checkpoint, cohort, out, settings={"limit": 2, "figures": False})  # a run stopped after 2 images
    with (out / "per_image.csv").open("a") as handle:  # and killed in the middle of a line
        handle.write("fundus_9999,test,healthy,dia")
    calls = []
    resumed = _run(checkpoint, cohort, out, resume=True, progress=lambda d, t, m: calls.append((d, t)),
                   settings={"figures": False})
    assert calls[0] == (4, 8)  # 2 images x 2 methods were kept
    pd.testing.assert_frame_equal(_comparable(resumed.per_image), _comparable(result.per_image))
    again = pd.read_csv(out / "per_image.csv")
    assert len(again) == 8 and "fundus_9999" not in set(again["image"])
    # a resume with other settings is refused instead of mixing rows
    with pytest.raises(ValueError, match="other settings"):
        _run(checkpoint, cohort, out, resume=True, settings={"deletion_steps": 6})


def test_coco_annotations_replace_masks(checkpoint, cohort, tmp_path):
    result = _run(checkpoint, cohort, tmp_path / "coco", annotations=cohort / "annotations.json",
                  settings={"metrics": ("activation_precision", "pointing_game"), "figures": False})
    per_image = result.per_image
    diseased = per_image["label"] == "diseased"
    assert per_image.loc[diseased, "activation_precision"].notna().all()
    assert per_image.loc[~diseased, "activation_precision"].isna().all()
    assert list(per_image.columns[-3:]) == ["activation_precision", "pointing_game", "notes"]
    config = json.loads((tmp_path / "coco" / "config.json").read_text())
    assert config["fingerprint"]["annotations"].endswith("annotations.json")


def test_bad_settings_fail_clearly(checkpoint, cohort, tmp_path):
    with pytest.raises(ValueError, match="unknown metric"):
        _run(checkpoint, cohort, tmp_path / "x", settings={"metrics": ("nope",)})
    with pytest.raises(ValueError, match="no split named 'nosuch'"):
        _run(checkpoint, cohort, tmp_path / "y", settings={"split": "nosuch"})
    with pytest.raises(ValueError, match="unknown target policy"):
        _run(checkpoint, cohort, tmp_path / "z", settings={"target": "everything"})


def test_cli(checkpoint, cohort, tmp_path, capsys):
    from softcam_core.cli import main

    out = tmp_path / "cli"
    code = main(["evaluate", "--model", str(checkpoint), "--data", str(cohort), "--methods", "softcam",
                 "--out", str(out), "--split", "all", "--limit", "2", "--steps", "3", "--topk", "1,2",
                 "--bootstrap", "100", "--no-figures", "--metrics", "topk,activation_precision,deletion"])
    assert code == 0
    assert "per_image.csv" in capsys.readouterr().out
    per_image = pd.read_csv(out / "per_image.csv")
    assert len(per_image) == 2
    assert {"topk_precision_k1", "topk_precision_k2", "activation_precision", "audc"} <= set(per_image.columns)
    assert "pointing_game" not in per_image.columns
    assert not (out / "figures").exists()
    code = main(["evaluate", "--model", str(checkpoint), "--data", str(tmp_path / "absent"), "--methods", "softcam",
                 "--out", str(out)])
    assert code == 2
    assert "cohort folder not found" in capsys.readouterr().err


def test_ideal_map_scores_perfectly_through_the_geometry(cohort):
    """The mask mapped through Geometry lands where the image's lesions are: an explainer that
    returned exactly that mask would have activation precision 1 and pointing game 1."""
    from softcam_core.data import CohortFolder
    from softcam_core.imaging import load_image, preprocess

    folder = CohortFolder(cohort)
    record = next(r for r in folder.records if r.label == "diseased")
    image = load_image(record.path)
    _, geometry = preprocess(image, 64, (0.5,) * 3, (0.25,) * 3)
    mask = geometry.mask_to_input(folder.mask(record.stem))
    values, reasons = E.score_map(mask.astype(np.float32) + 0.01 * mask * np.arange(64)[None], mask, 1,
                                  E.EvalSettings(topk=(1,)), 4)
    assert not reasons
    assert values["activation_precision"] == 1.0 and values["pointing_game"] == 1.0
    assert values["topk_precision_k1"] == 1.0 and values["average_precision"] == 1.0
    assert math.isclose(values["activation_consistency"], 1.0)


def test_batched_run_equals_one_image_at_a_time(checkpoint, cohort, tmp_path):
    """Batches of 4 (one forward, one explain call per method, one deletion call) give the values of
    the one-image-at-a-time path; only the seconds column (a share of the batch time) differs."""
    settings = {"limit": 5, "figures": False}  # 5 images: a full batch of 4 and a partial one
    single = _run(checkpoint, cohort, tmp_path / "b1", settings={**settings, "batch_size": 1})
    batched = _run(checkpoint, cohort, tmp_path / "b4", settings={**settings, "batch_size": 4})
    a, b = _comparable(single.per_image), _comparable(batched.per_image)
    assert len(a) == 5 * len(METHODS)
    numeric = [c for c in a.columns if pd.api.types.is_numeric_dtype(a[c])]
    pd.testing.assert_frame_equal(a.drop(columns=numeric), b.drop(columns=numeric))
    np.testing.assert_allclose(b[numeric].to_numpy(float), a[numeric].to_numpy(float), rtol=1e-5, atol=1e-5)
    curves = [pd.read_csv(tmp_path / name / "deletion_curves.csv").sort_values(["image", "method"]) for name in ("b1", "b4")]
    np.testing.assert_allclose(curves[1].iloc[:, 2:].to_numpy(float), curves[0].iloc[:, 2:].to_numpy(float),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch-size"):
        _run(checkpoint, cohort, tmp_path / "b0", settings={**settings, "batch_size": 0})
    # maps explained in one call per batch: the same up to rounding, so every metric that does not
    # rank cells (a ranking can flip at near-tied cells) agrees to 1e-5
    together = _comparable(_run(checkpoint, cohort, tmp_path / "be",
                                settings={**settings, "batch_size": 4, "batch_explain": True}).per_image)
    smooth = ["p_target", "activation_precision", "activation_sensitivity", "activation_consistency", "energy_top15"]
    np.testing.assert_allclose(together[smooth].to_numpy(float), a[smooth].to_numpy(float), rtol=1e-5, atol=1e-5)
