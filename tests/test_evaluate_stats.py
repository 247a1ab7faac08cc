"""Cohort statistics: bootstrap interval, Holm correction, paired Wilcoxon tests, summaries, figures."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from softcam_core import evaluate as E
from softcam_core import plots


def test_holm_hand_computed():
    # sorted p: 0.01, 0.02, 0.03, 0.04 (m = 4)
    # scaled: 4*0.01 = 0.04, 3*0.02 = 0.06, 2*0.03 = 0.06, 1*0.04 = 0.04
    # running max: 0.04, 0.06, 0.06, 0.06 -> back in input order
    adjusted = E.holm([0.03, 0.01, 0.04, 0.02])
    np.testing.assert_allclose(adjusted, [0.06, 0.04, 0.06, 0.06])
    # capped at 1; nan stays nan and does not count in m (m = 2 here): 2*0.6 -> 1, then max(1, 0.7) = 1
    adjusted = E.holm([0.7, np.nan, 0.6])
    assert adjusted[0] == 1.0 and math.isnan(adjusted[1]) and adjusted[2] == 1.0
    # m = 3, sorted 0.001, 0.2, 0.5: 3*0.001 = 0.003, 2*0.2 = 0.4, 1*0.5 = 0.5 -> already increasing
    np.testing.assert_allclose(E.holm([0.5, 0.001, 0.2]), [0.5, 0.003, 0.4])
    # step-down monotonicity: sorted 0.01, 0.011: 2*0.01 = 0.02, 1*0.011 = 0.011 -> max -> 0.02, 0.02
    np.testing.assert_allclose(E.holm([0.011, 0.01]), [0.02, 0.02])


def test_bootstrap_ci_contains_mean_and_is_seeded():
    values = np.random.default_rng(3).normal(0.4, 0.2, size=60)
    low, high = E.bootstrap_ci(values)
    assert low < values.mean() < high
    assert (low, high) == E.bootstrap_ci(values)  # same seed -> same interval
    assert (low, high) != E.bootstrap_ci(values, seed=1)
    # half-width close to the normal approximation 1.96 * sd / sqrt(n)
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert (high - low) / 2 == pytest.approx(half, rel=0.2)
    assert E.bootstrap_ci([0.3]) == (0.3, 0.3)
    assert all(math.isnan(v) for v in E.bootstrap_ci([np.nan]))


def _per_image():
    rng = np.random.default_rng(0)
    n = 25
    rows = []
    for i in range(n):
        good = 0.8 + 0.05 * rng.normal()
        rows.append({"image": f"im{i}", "method": "softcam", "seconds": 0.01, "activation_precision": good,
                     "audc": 0.2 + 0.02 * rng.normal()})
        rows.append({"image": f"im{i}", "method": "gradcam", "seconds": 0.02, "activation_precision": good - 0.3,
                     "audc": 0.5 + 0.02 * rng.normal()})
        rows.append({"image": f"im{i}", "method": "same", "seconds": 0.02, "activation_precision": good - 0.3,
                     "audc": np.nan if i < 5 else 0.5})
    return pd.DataFrame(rows)


def test_summarise_columns_and_values():
    per_image = _per_image()
    cohort = E.summarise(per_image)
    assert list(cohort["method"]) == ["softcam", "gradcam", "same"]
    row = cohort.set_index("method").loc["same"]
    assert row["audc_n"] == 20 and row["audc_mean"] == pytest.approx(0.5)
    assert row["activation_precision_n"] == 25
    for _, r in cohort.iterrows():
        assert r["activation_precision_ci_low"] <= r["activation_precision_mean"] <= r["activation_precision_ci_high"]
    assert {"seconds_mean", "activation_precision_std"} <= set(cohort.columns)


def test_paired_tests_match_scipy_and_holm():
    from scipy.stats import wilcoxon

    per_image = _per_image()
    paired = E.paired_tests(per_image)
    ap = paired[paired["metric"] == "activation_precision"].set_index(["method_a", "method_b"])
    # softcam vs gradcam: every difference is exactly +0.3 -> smallest two-sided p for n = 25
    expected = wilcoxon(per_image.query("method == 'softcam'")["activation_precision"],
                        per_image.query("method == 'gradcam'")["activation_precision"]).pvalue
    assert ap.loc[("softcam", "gradcam"), "p_value"] == pytest.approx(expected)
    assert ap.loc[("softcam", "gradcam"), "mean_diff"] == pytest.approx(0.3)
    # gradcam vs same: identical values -> no test, explained
    assert math.isnan(ap.loc[("gradcam", "same"), "p_value"]) and "zero" in ap.loc[("gradcam", "same"), "note"]
    # Holm within the metric family: the two finite p-values, m = 2
    finite = ap["p_value"].dropna()
    np.testing.assert_allclose(ap.loc[finite.index, "p_holm"], E.holm(finite.to_numpy()))
    audc = paired[paired["metric"] == "audc"].set_index(["method_a", "method_b"])
    assert audc.loc[("softcam", "same"), "n"] == 20  # images where both are defined
    assert bool(audc.loc[("softcam", "gradcam"), "significant"])


def test_figures_build(tmp_path):
    per_image = _per_image()
    per_image["topk_precision_k1"] = 1.0
    per_image["topk_precision_k5"] = 0.6
    curves = pd.DataFrame({"image": per_image["image"], "method": per_image["method"],
                           "s0": 1.0, "s1": 0.5, "s2": 0.1})
    figures = E.cohort_figures(per_image, curves)
    assert set(figures) == {"topk_precision", "deletion_curves", "metric_boxplots"}
    topk = figures["topk_precision"]
    assert [list(t.x) for t in topk.data][0] == [1, 5]
    assert list(topk.data[0].y) == pytest.approx([1.0, 0.6])
    heat = plots.paired_heatmap(E.paired_tests(per_image), "activation_precision")
    assert heat.data[0].z.shape == (3, 3)
    written = plots.save_figures(figures, tmp_path, png=False)
    assert all(p.exists() for paths in written.values() for p in paths)
    assert (tmp_path / "plotly.min.js").exists()


def test_png_export_never_fails(tmp_path):
    import plotly.graph_objects as go

    written = plots.save_figures({"tiny": go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))}, tmp_path, png=True)
    suffixes = [p.suffix for p in written["tiny"]]
    assert suffixes[0] == ".html"
    if ".png" in suffixes:  # a Chrome/Chromium was found: a real PNG
        assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_common_correct_images():
    # model A right on im0, im1, im2 (im3 wrong); model B right on im1, im2, im3, and im0 only for one
    # of its two methods (a row says wrong); model C has no im2 row and an unknown (empty) im1
    a = pd.DataFrame({"image": ["im0", "im1", "im2", "im3"], "method": "softcam", "correct": [True, True, True, False],
                      "audc": [0.1, 0.2, 0.3, 0.4]})
    b = pd.DataFrame({"image": ["im0", "im0", "im1", "im2", "im3"], "method": ["x", "y", "x", "x", "x"],
                      "correct": [True, False, True, True, True], "audc": 0.5})
    assert E.common_correct([a, b]) == {"im1", "im2"}
    # as read back from CSV: "True"/"False" strings and an empty cell (unknown = not correct)
    c = pd.DataFrame({"image": ["im0", "im1", "im3"], "correct": ["True", np.nan, "True"]})
    assert E.common_correct([a, c]) == {"im0"}
    assert E.common_correct([a, b, c]) == set()
    assert E.common_correct(a) == {"im0", "im1", "im2"}
    # one table of several models, told apart by its "model" column
    both = pd.concat([a.assign(model="A"), b.assign(model="B")], ignore_index=True)
    assert E.common_correct(both) == {"im1", "im2"}
    # by=None: one model; every row of an image must be right (im0, im3 have a wrong row)
    assert E.common_correct(both, by=None) == {"im1", "im2"}
    assert E.common_correct(a.assign(model="A"), by=None) == {"im0", "im1", "im2"}
    derived = E.with_common_correct(both)
    kept = derived["audc_common_correct"].notna()
    assert set(derived.loc[kept, "image"]) == {"im1", "im2"}
    np.testing.assert_allclose(derived.loc[kept, "audc_common_correct"], derived.loc[kept, "audc"])
    assert "audc_common_correct" in E.metric_columns(derived)
    with pytest.raises(ValueError, match="correct"):
        E.common_correct([a.drop(columns="correct")])
