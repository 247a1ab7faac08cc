"""softcam_core.claims: every verdict (holds, fails, cannot tell) reached on hand-made tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from softcam_core import claims as C


def _table(values: dict[str, list[float]], metric: str = "m") -> pd.DataFrame:
    rows = []
    for row, vals in values.items():
        for i, v in enumerate(vals):
            rows.append({"unit": f"0/im{i}", "row": row, metric: v})
    return pd.DataFrame(rows)


def test_ranking_holds_only_when_best_and_significantly_better_than_all():
    n = 30
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.01, n)
    table = _table({"SoftCAM lasso": list(0.8 + noise), "gradcam · baseline": list(0.5 + noise[::-1]),
                    "sanity:edge · baseline": list(0.3 + noise)})
    verdict = C.ranking_claim(table, "m", "SoftCAM lasso", "lasso best", resamples=100)
    assert verdict.verdict == C.HOLDS
    assert set(verdict.details["competitor"]) == {"gradcam · baseline", "sanity:edge · baseline"}
    assert (verdict.details["p_holm"] < 0.05).all()
    # lower is better: the same table says the claim fails (both others significantly lower)
    verdict = C.ranking_claim(table, "m", "SoftCAM lasso", "lasso lowest", higher_is_better=False, resamples=100)
    assert verdict.verdict == C.FAILS and "significantly better than SoftCAM lasso" in verdict.evidence


def test_ranking_cannot_tell_when_a_sanity_map_ties():
    n = 12
    rng = np.random.default_rng(1)
    table = _table({"SoftCAM lasso": list(0.6 + rng.normal(0, 0.2, n)),
                    "sanity:edge · baseline": list(0.6 + rng.normal(0, 0.2, n))})
    verdict = C.ranking_claim(table, "m", "SoftCAM lasso", "lasso best", resamples=100)
    assert verdict.verdict == C.CANNOT_TELL
    assert "model-free sanity:edge · baseline" in verdict.evidence


def test_accuracy_parity_non_inferiority_and_saturation():
    n = 100
    rows = []
    for i in range(n):
        rows.append({"unit": f"0/{i}", "model": "baseline", "correct": i % 10 != 0})  # 0.90
        rows.append({"unit": f"0/{i}", "model": "lasso", "correct": i % 10 != 0})  # identical: diff 0
        rows.append({"unit": f"0/{i}", "model": "dense", "correct": i % 2 == 0})  # 0.50: far worse
    correct = pd.DataFrame(rows)
    assert C.accuracy_parity(correct, "baseline", ["lasso"], resamples=200).verdict == C.HOLDS
    assert C.accuracy_parity(correct, "baseline", ["lasso", "dense"], resamples=200).verdict == C.FAILS
    saturated = correct.assign(correct=True)
    verdict = C.accuracy_parity(saturated, "baseline", ["lasso"], resamples=200)
    assert verdict.verdict == C.CANNOT_TELL and "saturated" in verdict.evidence
    chance = correct.assign(correct=[i % 2 == 0 for i in range(len(correct))])
    verdict = C.accuracy_parity(chance[chance["model"] != "dense"], "baseline", ["lasso"], resamples=200)
    assert verdict.verdict == C.CANNOT_TELL and "near chance" in verdict.evidence


def test_consistency_against_chance():
    rows = [{"row": "SoftCAM lasso", "label_is_diseased": i % 2 == 0, "activation_consistency": v}
            for i, v in enumerate([0.9, 0.8] * 10)]
    assert C.consistency_claim(pd.DataFrame(rows), "SoftCAM lasso", resamples=200).verdict == C.HOLDS
    # a sparse map: most pixels zero, so few are positive on diseased images -> below chance -> fails
    rows = [{"row": "SoftCAM lasso", "label_is_diseased": i % 2 == 0, "activation_consistency": v}
            for i, v in enumerate([0.05, 0.9] * 10)]
    assert C.consistency_claim(pd.DataFrame(rows), "SoftCAM lasso", resamples=200).verdict == C.FAILS


def test_cascam_claim_needs_a_shortcut_to_uncover():
    rows = []
    for i in range(20):
        artifact = i < 10
        base = 0.1 if artifact else 0.7  # the base map is pulled to the artifact
        rows.append({"unit": f"0/{i}", "row": "gradcam · baseline", "artifact": artifact, "m": base + 0.01 * i})
        rows.append({"unit": f"0/{i}", "row": "cascam:gradcam · baseline", "artifact": artifact,
                     "m": (0.6 if artifact else 0.7) + 0.01 * i})
    table = pd.DataFrame(rows)
    verdict = C.cascam_shortcut_claim(table, "m", "cascam:gradcam · baseline", "gradcam · baseline")
    assert verdict.verdict == C.HOLDS
    # no shortcut taken (base equally good with and without the artifact): nothing behind it to find
    flat = table.copy()
    flat.loc[flat["row"] == "gradcam · baseline", "m"] = 0.5 + 0.01 * (np.arange(20) % 10)
    verdict = C.cascam_shortcut_claim(flat, "m", "cascam:gradcam · baseline", "gradcam · baseline")
    assert verdict.verdict == C.CANNOT_TELL and "no hidden cue" in verdict.evidence


def _lesion_rows(lesion, control, methods=("softcam", "gradcam")):
    """An evaluation's per-image table: the same two drops on every method's row of an image."""
    return pd.DataFrame([{"image": f"i{k}", "method": m, "lesion_drop": a, "control_drop": b}
                         for k, (a, b) in enumerate(zip(lesion, control)) for m in methods])


def test_lesion_reliance_holds_fails_or_cannot_tell():
    from softcam_core.claims import lesion_reliance_claim

    uses = lesion_reliance_claim(_lesion_rows([0.5, 0.6, 0.4, 0.7, 0.55, 0.45, 0.65, 0.5], [0.1] * 8))
    assert uses.verdict == "holds" and uses.details.loc[0, "n"] == 8  # images, not image x method rows
    assert uses.details.loc[0, "diff_mean"] == pytest.approx(4.35 / 8 - 0.1)
    assert uses.details.loc[0, "p_value"] == pytest.approx(2 / 2 ** 8)  # exact: all 8 differences positive
    elsewhere = lesion_reliance_claim(_lesion_rows([0.0] * 8, [0.3, 0.2, 0.4, 0.3, 0.25, 0.35, 0.3, 0.2]))
    assert elsewhere.verdict == "fails" and "other regions" in elsewhere.evidence
    same = lesion_reliance_claim(_lesion_rows([0.3, 0.1, 0.3, 0.1, 0.3, 0.1, 0.2, 0.2], [0.1, 0.3, 0.1, 0.3, 0.1, 0.3, 0.2, 0.2]))
    assert same.verdict == "cannot tell" and "cannot tell whether a faithful map should point" in same.evidence
    few = lesion_reliance_claim(_lesion_rows([0.9] * 5, [0.0] * 5))
    assert few.verdict == "cannot tell" and "fewer than 6" in few.evidence  # 5 pairs: Wilcoxon p >= 0.0625
    missing = lesion_reliance_claim(_lesion_rows([0.9, math.nan] * 4, [0.0] * 8))
    assert missing.details.loc[0, "n"] == 4
    assert lesion_reliance_claim(pd.DataFrame({"image": ["a"], "method": ["softcam"]})).verdict == "cannot tell"
