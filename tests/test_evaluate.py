"""`evaluate_cohort` / `softcam evaluate` on a tiny synthetic cohort with a tiny checkpoint."""

from __future__ import annotations

import io
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
    assert {"topk_precision_k1", "topk_precision_k3", "audc", "audc_correct", "iou_top10", "energy_top15",
            "energy_count_top15", "average_precision_cascam", "activation_consistency_diseased",
            "activation_consistency_healthy"} <= set(per_image.columns)
    assert not {"audc_full", "audc_blur", "audc_logodds", "topk_precision_pos_k1"} & set(per_image.columns)  # opt-in
    assert set(per_image["method"]) == set(METHODS)
    assert (per_image["target"] == "diseased").all()  # binary model, default target policy
    # localization metrics are undefined exactly on images without lesions, and say why
    healthy = per_image["label"] == "healthy"
    assert per_image.loc[healthy, "activation_precision"].isna().all()
    assert per_image.loc[healthy, "notes"].str.contains("empty annotation mask").all()
    # activation consistency: signed SoftCAM maps get the pooled and their own class's figure;
    # Grad-CAM maps are non-negative by construction: not applicable, with the reason
    softcam, gradcam = per_image["method"] == "softcam", per_image["method"] == "gradcam"
    assert per_image.loc[softcam, "activation_consistency"].notna().all()
    assert per_image.loc[softcam & healthy, "activation_consistency_diseased"].isna().all()
    assert per_image.loc[softcam & ~healthy, "activation_consistency_healthy"].isna().all()
    np.testing.assert_allclose(per_image.loc[softcam & ~healthy, "activation_consistency_diseased"],
                               per_image.loc[softcam & ~healthy, "activation_consistency"])
    assert per_image.loc[gradcam, ["activation_consistency", "activation_consistency_diseased",
                                   "activation_consistency_healthy"]].isna().all().all()
    assert per_image.loc[gradcam, "notes"].str.contains(
        "not applicable: gradcam maps are non-negative by construction").all()
    # correct = the prediction is the true class; audc_correct = audc on those images only
    assert per_image["correct"].dtype == bool
    assert (per_image["correct"] == (per_image["pred"] == per_image["label"])).all()
    right = per_image["correct"]
    np.testing.assert_allclose(per_image.loc[right, "audc_correct"], per_image.loc[right, "audc"])
    assert per_image.loc[~right, "audc_correct"].isna().all()
    assert per_image.loc[~right, "notes"].str.contains("misclassified image").all()
    curves = pd.read_csv(out / "deletion_curves.csv")
    assert list(curves.columns) == ["image", "method", "s0", "s1", "s2", "s3", "s4"]
    assert np.allclose(curves["s0"], 1.0)
    cohort = pd.read_csv(out / "cohort.csv")
    assert list(cohort["method"]) == METHODS
    for col in ("activation_precision", "audc", "audc_correct", "seconds"):
        assert {f"{col}_mean", f"{col}_std", f"{col}_ci_low", f"{col}_ci_high", f"{col}_n"} <= set(cohort.columns)
    assert (cohort["audc_n"] == 4).all()
    assert (cohort["audc_correct_n"] == per_image.loc[softcam, "correct"].sum()).all()
    paired = pd.read_csv(out / "paired.csv")
    # consistency has no pair: it does not apply to the (non-negative) Grad-CAM maps
    consistency = {"activation_consistency", "activation_consistency_diseased", "activation_consistency_healthy"}
    assert set(paired["metric"]) == set(E.metric_columns(per_image)) - consistency
    assert (paired[["method_a", "method_b"]].values == ["softcam", "gradcam"]).all()
    assert pd.read_parquet(out / "per_image.parquet").shape == per_image.shape
    # progress: done counts up by one per image x method, from 0 to total; within a batch, calls
    # at the same count say what is being computed (each method's maps, then the deletion curves)
    counts = [c[0] for c in calls]
    assert calls[0][:2] == (0, 8) and calls[-1][:2] == (8, 8) and {c[1] for c in calls} == {8}
    assert counts == sorted(counts) and sorted(set(counts)) == list(range(9))
    assert len([c for c in calls if c[2].endswith("maps of 4 image(s)")]) == 2  # 2 methods x 1 batch of 4
    assert len([c for c in calls if c[2] == "deletion curves of 8 map(s)"]) == 1


def test_lesion_occlusion_is_one_value_per_image_summarised_once(one_run, checkpoint, cohort):
    from softcam_core import metrics as M
    from softcam_core.imaging import load_image, preprocess
    from softcam_core.models import load_checkpoint

    result, _ = one_run
    per_image = result.per_image
    assert (per_image.groupby("image")[["lesion_drop", "control_drop"]].nunique(dropna=False) <= 1).all().all()
    healthy = per_image["label"] == "healthy"
    assert per_image.loc[healthy, ["lesion_drop", "control_drop"]].isna().all().all()
    assert per_image.loc[healthy, "notes"].str.contains("no annotated region").all()
    assert per_image.loc[~healthy, ["lesion_drop", "control_drop"]].notna().all().all()
    # a property of the model on the image, not of a map: in no per-method summary or paired test
    assert not [c for c in result.cohort.columns if c.startswith(("lesion_drop", "control_drop"))]
    assert not {"lesion_drop", "control_drop"} & set(result.paired["metric"])
    summary = pd.read_csv(result.files["lesion_occlusion"])
    diseased = per_image.loc[~healthy, "image"].nunique()
    assert summary.loc[0, "n"] == diseased and summary.loc[0, "verdict"] == "cannot tell"  # 4 images < 6
    assert "fewer than 6" in summary.loc[0, "evidence"]
    # the column is the metric itself on the evaluation's own input and mask
    model, meta = load_checkpoint(checkpoint)
    folder = E._open_folder(cohort)
    stem = per_image.loc[~healthy, "image"].iloc[0]
    record = next(r for r in folder.records if r.stem == stem)
    x, geometry = preprocess(load_image(record.path), meta["img_size"], meta["mean"], meta["std"])
    mask = geometry.mask_to_input(np.asarray(folder.mask(stem)) > 0)
    lesion, control = M.lesion_occlusion(model, x[None], mask[None], [1], meta["img_size"] // 16)
    row = per_image[per_image["image"] == stem].iloc[0]
    assert row["lesion_drop"] == pytest.approx(lesion[0], abs=1e-5)
    assert row["control_drop"] == pytest.approx(control[0], abs=1e-5)


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
    with pytest.raises(ValueError, match="iou_fraction"):
        _run(checkpoint, cohort, out, resume=True, settings={"iou_fraction": 0.2})
    # a run of the earlier metric definitions (no "definitions" in its fingerprint) is not resumed
    config = json.loads((out / "config.json").read_text())
    del config["fingerprint"]["definitions"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="definitions"):
        _run(checkpoint, cohort, out, resume=True, settings={"figures": False})


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
    # 64 px input, patch 4: 16 x 16 = 256 cells; the paper protocol removes one cell per step
    with pytest.raises(ValueError, match="--steps 300 exceeds the 256 grid cells"):
        _run(checkpoint, cohort, tmp_path / "s", settings={"deletion_steps": 300})
    with pytest.raises(ValueError, match="--topk 300 exceeds the 256 grid cells"):
        _run(checkpoint, cohort, tmp_path / "k", settings={"topk": (1, 300)})
    with pytest.raises(ValueError, match="--iou-fraction"):
        _run(checkpoint, cohort, tmp_path / "f", settings={"iou_fraction": 0.0})
    with pytest.raises(ValueError, match="unknown occlusion baseline 'inpaint'; use zero, mean, blur or a number"):
        _run(checkpoint, cohort, tmp_path / "o", settings={"occlusion_baseline": "inpaint"})
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_cli(checkpoint, cohort, tmp_path, capsys):
    from softcam_core.cli import main

    out = tmp_path / "cli"
    code = main(["evaluate", "--model", str(checkpoint), "--data", str(cohort), "--methods", "softcam",
                 "--out", str(out), "--split", "all", "--limit", "2", "--steps", "3", "--topk", "1,2",
                 "--iou-fraction", "0.2", "--energy-fraction", "0.05", "--bootstrap", "100", "--no-figures",
                 "--metrics", "topk,activation_precision,iou_top,energy_top,deletion"])
    assert code == 0
    assert "per_image.csv" in capsys.readouterr().out
    per_image = pd.read_csv(out / "per_image.csv")
    assert len(per_image) == 2
    assert {"topk_precision_k1", "topk_precision_k2", "activation_precision", "audc", "iou_top20",
            "energy_top5", "energy_count_top5"} <= set(per_image.columns)
    assert json.loads((out / "config.json").read_text())["fingerprint"]["deletion_steps"] == 3
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
                                  E.EvalSettings(topk=(1,)), 4, "softcam")
    assert reasons == {"activation_consistency_healthy": "diseased image"}
    assert values["activation_precision"] == 1.0 and values["pointing_game"] == 1.0
    assert values["topk_precision_k1"] == 1.0 and values["average_precision"] == 1.0
    assert values["average_precision_cascam"] == 1.0
    # consistency counts pixels: the map is positive exactly on the lesion pixels
    assert math.isclose(values["activation_consistency"], mask.mean())
    assert math.isclose(values["activation_consistency_diseased"], mask.mean())


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
    # rank cells or pixels (a ranking can flip at near-tied values: top-k, deletion, the top-fraction
    # IoU / energy, whose region is the top pixels) agrees to 1e-5
    together = _comparable(_run(checkpoint, cohort, tmp_path / "be",
                                settings={**settings, "batch_size": 4, "batch_explain": True}).per_image)
    smooth = ["p_target", "activation_precision", "activation_sensitivity", "activation_consistency"]
    np.testing.assert_allclose(together[smooth].to_numpy(float), a[smooth].to_numpy(float), rtol=1e-5, atol=1e-5)


def test_deletion_tracks_the_predicted_class_with_its_map(checkpoint, cohort, tmp_path):
    """The deletion curve of every row is the paper's: the predicted class's probability while the
    top cells of *that class's* map are removed (explained again where the target differs), and
    the named variants are the same curve under other options."""
    from softcam_core import metrics as M
    from softcam_core.data import CohortFolder
    from softcam_core.explain import explain
    from softcam_core.imaging import load_image, preprocess
    from softcam_core.models import load_checkpoint

    variants = ("deletion", "deletion_full", "deletion_blur", "deletion_logodds")
    result = _run(checkpoint, cohort, tmp_path / "del", settings={"metrics": variants, "limit": 6, "figures": False})
    per_image = result.per_image
    assert list(per_image.columns[-6:]) == ["audc", "audc_correct", "audc_full", "audc_blur", "audc_logodds", "notes"]
    model, meta = load_checkpoint(checkpoint)
    model.eval()
    folder = CohortFolder(cohort)
    records = {r.stem: r for r in folder.records}
    curves = result.curves.set_index(["image", "method"])
    other = per_image[per_image["pred"] != per_image["target"]]
    assert len(other), "the check needs an image predicted healthy"
    for _, row in pd.concat([other.head(2), per_image[per_image["pred"] == per_image["target"]].head(1)]).iterrows():
        x, _ = preprocess(load_image(records[row["image"]].path), int(meta["img_size"]), meta["mean"], meta["std"])
        pred = list(meta["classes"]).index(row["pred"])
        sal = explain(model, x[None], row["method"], target=[pred])[0].detach().numpy()
        for column, options in (("audc", {}), ("audc_full", {"protocol": "full"}), ("audc_blur", {"baseline": "blur"}),
                                ("audc_logodds", {"scale": "logodds"})):
            curve = M.deletion_curve(model, x, sal, pred, 4, 4, **options)
            assert M.audc(curve) == pytest.approx(row[column], abs=1e-5), column
            if column == "audc":
                np.testing.assert_allclose(curves.loc[(row["image"], row["method"])].to_numpy(float), curve, atol=1e-5)
        # the disease-class map would give another curve on an image predicted healthy
        if row["pred"] != row["target"]:
            target_map = explain(model, x[None], row["method"], target=[1])[0].detach().numpy()
            assert M.audc(M.deletion_curve(model, x, target_map, 1, 4, 4)) != pytest.approx(row["audc"], abs=1e-4)
    assert per_image["audc_logodds"].notna().all()


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_refused_run_writes_nothing_and_resume_still_works(cohort, tmp_path, capsys):
    """Methods are checked against the model before the output folder is touched: an unknown name or
    a method the model cannot run leaves no folder behind, and an earlier run's folder exactly as it
    was (no config.json rewritten, no rows cleared); a --resume into it then resumes as before."""
    from softcam_core.cli import main
    from tests.plugins.app import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path / "softcam.pt")  # untrained: quick, and enough here
    baseline = make_tiny_checkpoint(tmp_path / "baseline.pt", head="baseline")
    common = ["--data", str(cohort), "--split", "all", "--limit", "2", "--steps", "3", "--topk", "1,2",
              "--bootstrap", "50", "--no-figures", "--metrics", "topk,deletion"]
    earlier = tmp_path / "earlier"
    assert main(["evaluate", "--model", str(checkpoint), "--methods", "softcam", "--out", str(earlier), *common,
                 "--limit", "1"]) == 0  # a run of one image (the later --limit wins): a second one to resume to
    capsys.readouterr()
    before = _tree(earlier)
    cases = [
        (checkpoint, "softcam,nosuch", "unknown method 'nosuch'"),
        (checkpoint, "softcam,cam", "use 'softcam'"),  # a SoftCAM net has no GAP + Linear head
        (baseline, "gradcam,softcam", "needs a SoftCAM net"),
    ]
    for model, methods, message in cases:
        for out, resume in ((tmp_path / "new" / "results", []), (earlier, []), (earlier, ["--resume"])):
            code = main(["evaluate", "--model", str(model), "--methods", methods, "--out", str(out), *common, *resume])
            err = capsys.readouterr().err.strip()
            assert code == 2 and message in err and len(err.splitlines()) == 1, (methods, err)
        assert not (tmp_path / "new").exists(), methods
        assert _tree(earlier) == before, methods
    # the library call refuses the same way (the app's and the worker's path)
    from softcam_core.models import load_checkpoint

    model, meta = load_checkpoint(baseline)
    with pytest.raises(ValueError, match="needs a SoftCAM net"):
        E.evaluate_cohort(model, meta, cohort, ["softcam"], None, tmp_path / "lib", settings=E.EvalSettings(**FAST))
    assert not (tmp_path / "lib").exists()
    # resume is unchanged: the one image already scored is kept, the second one computed
    assert main(["evaluate", "--model", str(checkpoint), "--methods", "softcam", "--out", str(earlier), "--resume",
                 *common]) == 0
    per_image = pd.read_csv(earlier / "per_image.csv", dtype={"image": str})
    assert len(per_image) == 2
    first = pd.read_csv(io.BytesIO(before["per_image.csv"]), dtype={"image": str})
    assert per_image.iloc[0]["image"] == first.iloc[0]["image"]
    assert per_image.iloc[0]["seconds"] == first.iloc[0]["seconds"]  # kept, not recomputed
