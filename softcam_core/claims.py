"""Verdicts on the SoftCAM paper's claims, computed from per-image tables (no hand-written text).

Each claim function takes the report's pooled per-image table and returns a :class:`Verdict`:
``holds``, ``fails`` or ``cannot tell``, with the evidence (means, bootstrap intervals, paired
Wilcoxon tests with Holm correction) that decided it. The rules are written so that every claim
*can* fail, and so that a benchmark that cannot separate the methods says so instead of
declaring a winner:

* **a ranking claim** ("sparse SoftCAM has the best top-k precision", "... the lowest AUDC")
  holds only when the claimed row has the best mean *and* is significantly better (Holm-corrected
  paired Wilcoxon, two-sided, alpha 0.05) than every other row; it fails when some other row is
  significantly better; otherwise the benchmark cannot tell. A model-free sanity map (rows named
  ``sanity:*``) that is not significantly worse than the best row makes a ranking uninformative,
  and the verdict says so.
* **accuracy parity** is a non-inferiority test: the paired difference in per-image correctness
  (SoftCAM variant − baseline) with a 95 % bootstrap interval; it holds when the interval's lower
  end is above ``-margin``, fails when its upper end is below ``-margin``, and cannot tell
  otherwise, or when the baseline's accuracy is saturated (>= ``saturation``) or near chance
  (< ``floor``), where parity is trivial.
* **activation consistency** (SoftCAM App. E.1, pixel proportions) holds when both class-wise
  figures of the claimed row have intervals above the chance level of a signed random map (0.5)
  and fails when either interval lies below it.
* **CasCAM on the shortcut cohort** holds when, on diseased test images that carry the shortcut
  artifact, CasCAM's lesion localisation is significantly better than its base method's; the
  benchmark cannot tell when the base method's localisation on artifact images is not worse than
  on clean ones (the model did not take the shortcut, so there is nothing behind it to uncover).

Rows of the per-image table are (unit, row label): ``unit`` pairs the same image under the same
training seed (``"<seed>/<image>"``), ``row`` is the report's row label (e.g. ``SoftCAM lasso``,
``gradcam · baseline``). Pairing is by unit, so each seed's models are compared on the same
images and seeds are pooled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from softcam_core.stats import bootstrap_ci, holm

HOLDS, FAILS, CANNOT_TELL = "holds", "fails", "cannot tell"
ALPHA = 0.05
CHANCE_CONSISTENCY = 0.5  # a signed map with random signs puts half its non-zero pixels on each side
SANITY_PREFIX = "sanity:"


@dataclass
class Verdict:
    """One claim's outcome: ``verdict`` in {holds, fails, cannot tell}; ``evidence`` one line of
    numbers; ``details`` extra rows (e.g. every pairwise test) for the tables."""

    claim: str
    verdict: str
    evidence: str
    details: pd.DataFrame = field(default_factory=pd.DataFrame)

    def row(self) -> dict[str, str]:
        return {"claim": self.claim, "verdict": self.verdict, "evidence": self.evidence}

    def table(self) -> pd.DataFrame:
        """One row: :meth:`row` followed by the first row of ``details`` (its numbers), for a CSV."""
        extra = self.details.iloc[0].to_dict() if not self.details.empty else {}
        return pd.DataFrame([{**self.row(), **extra}])


def fmt_number(value: Any, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals for tables; "–" for None / nan / inf; never "-0.000"."""
    if value is None or (isinstance(value, (float, np.floating)) and not np.isfinite(value)):
        return "–"
    text = f"{float(value):.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _mean_ci(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float, int]:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan, math.nan, 0
    low, high = bootstrap_ci(values, resamples, seed)
    return float(values.mean()), low, high, int(values.size)


def _pairs(per_image: pd.DataFrame, metric: str, rows: Sequence[str]) -> pd.DataFrame:
    """``unit`` x ``row`` table of ``metric`` (units where the value is defined, per row)."""
    table = per_image[per_image["row"].isin(rows)]
    return table.pivot_table(index="unit", columns="row", values=metric, aggfunc="first")


def ranking_claim(
    per_image: pd.DataFrame,
    metric: str,
    claimed: str,
    claim: str,
    higher_is_better: bool = True,
    resamples: int = 2000,
    seed: int = 0,
    alpha: float = ALPHA,
) -> Verdict:
    """Does ``claimed`` have the best ``metric`` of all rows, significantly?

    ``per_image`` needs columns ``unit``, ``row`` and ``metric``. Every other row is tested
    against ``claimed`` (paired Wilcoxon on the units both define, Holm over those tests).
    Returns a :class:`Verdict` whose ``details`` has one row per competitor: n, means, mean
    difference (claimed − other), Holm p, and whether the competitor is significantly better.
    """
    if metric not in per_image.columns or claimed not in set(per_image["row"]):
        return Verdict(claim, CANNOT_TELL, f"no {metric} values for {claimed}")
    rows = list(dict.fromkeys(per_image["row"]))
    means = {}
    for row in rows:
        values = per_image.loc[per_image["row"] == row, metric].to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            means[row] = float(values.mean())
    if claimed not in means or len(means) < 2:
        return Verdict(claim, CANNOT_TELL, f"{metric}: fewer than two rows with values")
    sign = 1.0 if higher_is_better else -1.0
    best = max(means, key=lambda r: sign * means[r])
    pivot = _pairs(per_image, metric, list(means))
    from scipy.stats import wilcoxon

    tests = []
    for other in means:
        if other == claimed:
            continue
        both = pivot[[claimed, other]].dropna()
        diff = both[claimed].to_numpy(float) - both[other].to_numpy(float)
        p = math.nan
        if diff.size and not np.all(diff == 0):
            p = float(wilcoxon(diff, zero_method="wilcox", alternative="two-sided").pvalue)
        elif diff.size:
            p = 1.0
        tests.append({"competitor": other, "n": int(diff.size), "mean_claimed": means[claimed],
                      "mean_competitor": means[other], "mean_diff": float(diff.mean()) if diff.size else math.nan,
                      "p_value": p})
    details = pd.DataFrame(tests)
    details["p_holm"] = holm(details["p_value"].to_numpy())
    significant = details["p_holm"] < alpha
    better_other = significant & (sign * details["mean_diff"] < 0)
    worse_other = significant & (sign * details["mean_diff"] > 0)
    details["competitor_significantly_better"] = better_other
    order = ", ".join(f"{r} {fmt_number(m)}" for r, m in sorted(means.items(), key=lambda kv: -sign * kv[1])[:4])
    direction = "higher" if higher_is_better else "lower"
    evidence = f"{metric} ({direction} is better), best first: {order}"
    if better_other.any():
        winners = details.loc[better_other, "competitor"].tolist()
        return Verdict(claim, FAILS, evidence + f"; significantly better than {claimed}: {', '.join(winners)} "
                       f"(Holm p < {alpha:g})", details)
    sanity_tied = [r for r in details.loc[~worse_other, "competitor"] if r.startswith(SANITY_PREFIX)]
    if best == claimed and worse_other.all():
        return Verdict(claim, HOLDS, evidence + f"; {claimed} significantly better than all {len(details)} others "
                       f"(largest Holm p {fmt_number(details['p_holm'].max(), 4)})", details)
    reason = (f"{claimed} is best but not significantly better than "
              f"{', '.join(details.loc[~worse_other, 'competitor'])}" if best == claimed
              else f"{best} has the best mean, no row is significantly better than {claimed}")
    if sanity_tied:
        reason += f"; the model-free {', '.join(sanity_tied)} is not significantly worse, so the benchmark cannot separate"
    return Verdict(claim, CANNOT_TELL, evidence + "; " + reason, details)


def accuracy_parity(
    correct: pd.DataFrame,
    baseline: str,
    variants: Sequence[str],
    margin: float = 0.05,
    saturation: float = 0.99,
    floor: float = 0.6,
    resamples: int = 2000,
    seed: int = 0,
) -> Verdict:
    """Non-inferiority of each SoftCAM variant's test accuracy to the black-box baseline's.

    ``correct``: columns ``unit``, ``model``, ``correct`` (bool, one row per test image, seed and
    model). The paired per-unit difference ``correct(variant) − correct(baseline)`` has a 95 %
    bootstrap interval; a variant is non-inferior when its lower end is > ``-margin`` and
    inferior when its upper end is < ``-margin``. The claim holds when every variant is
    non-inferior, fails when any is inferior, cannot tell otherwise — and cannot tell whenever the
    baseline's accuracy is >= ``saturation`` (a saturated benchmark makes parity trivial).
    """
    claim = f"SoftCAM keeps the black-box accuracy (non-inferiority margin {margin:g})"
    pivot = correct.pivot_table(index="unit", columns="model", values="correct", aggfunc="first").astype(float)
    if baseline not in pivot:
        return Verdict(claim, CANNOT_TELL, "no baseline predictions")
    base_acc = float(pivot[baseline].mean())
    rows, outcomes = [], []
    for variant in variants:
        if variant not in pivot:
            continue
        both = pivot[[variant, baseline]].dropna()
        diff = both[variant].to_numpy() - both[baseline].to_numpy()
        mean, low, high, n = _mean_ci(diff, resamples, seed)
        outcome = "non-inferior" if low > -margin else ("inferior" if high < -margin else "undecided")
        outcomes.append(outcome)
        rows.append({"model": variant, "n": n, "accuracy": float(both[variant].mean()), "baseline_accuracy": base_acc,
                     "diff": mean, "ci_low": low, "ci_high": high, "outcome": outcome})
    details = pd.DataFrame(rows)
    parts = [f"{r['model']} {fmt_number(r['accuracy'])} (diff {fmt_number(r['diff'])} [{fmt_number(r['ci_low'])}, {fmt_number(r['ci_high'])}])"
             for r in rows]
    evidence = f"baseline {fmt_number(base_acc)}; " + ", ".join(parts)
    if base_acc >= saturation:
        return Verdict(claim, CANNOT_TELL, evidence + f"; the baseline is saturated (>= {saturation:g}), so parity is trivial",
                       details)
    if base_acc < floor:
        return Verdict(claim, CANNOT_TELL, evidence + f"; the baseline is below {floor:g}, near chance: parity with "
                       "a classifier that does not work shows nothing", details)
    if not outcomes:
        return Verdict(claim, CANNOT_TELL, evidence, details)
    if "inferior" in outcomes:
        return Verdict(claim, FAILS, evidence, details)
    if all(o == "non-inferior" for o in outcomes):
        return Verdict(claim, HOLDS, evidence, details)
    return Verdict(claim, CANNOT_TELL, evidence + "; an interval crosses the margin", details)


def consistency_claim(
    per_image: pd.DataFrame, claimed: str, resamples: int = 2000, seed: int = 0, chance: float = CHANCE_CONSISTENCY
) -> Verdict:
    """Label-consistent evidence signs of ``claimed`` (SoftCAM App. E.1, class-wise).

    ``per_image`` needs ``row``, ``label_is_diseased`` (bool) and ``activation_consistency`` (the
    per-image pixel proportion: A > 0 on a diseased image, A < 0 on a healthy one). Holds when the
    intervals of both class means lie above ``chance``; fails when either lies below.
    """
    claim = f"{claimed} evidence is positive on diseased and negative on healthy images (activation consistency)"
    rows = per_image[per_image["row"] == claimed]
    if rows.empty or "activation_consistency" not in rows:
        return Verdict(claim, CANNOT_TELL, f"no consistency values for {claimed}")
    stats = {}
    for name, is_diseased in (("diseased", True), ("healthy", False)):
        values = rows.loc[rows["label_is_diseased"] == is_diseased, "activation_consistency"].to_numpy(float)
        stats[name] = _mean_ci(values, resamples, seed)
    evidence = "; ".join(f"{k} {fmt_number(m)} [{fmt_number(lo)}, {fmt_number(hi)}] (n {n})" for k, (m, lo, hi, n) in stats.items())
    evidence += f"; chance (random signs) {chance:g}"
    if any(n == 0 for _, _, _, n in stats.values()):
        return Verdict(claim, CANNOT_TELL, evidence)
    if any(hi < chance for _, _, hi, _ in stats.values()):
        return Verdict(claim, FAILS, evidence)
    if all(lo > chance for _, lo, _, _ in stats.values()):
        return Verdict(claim, HOLDS, evidence)
    return Verdict(claim, CANNOT_TELL, evidence + "; an interval contains chance")


def cascam_shortcut_claim(
    per_image: pd.DataFrame, metric: str, cascam_row: str, base_row: str, resamples: int = 2000, seed: int = 0,
    alpha: float = ALPHA,
) -> Verdict:
    """CasCAM uncovers the lesion behind a dominant shortcut cue (CasCAM paper, Sec. 4).

    ``per_image`` (the shortcut cohort's diseased test images): ``unit``, ``row``, ``artifact``
    (bool: the image carries the shortcut artifact) and ``metric`` (lesion localisation, higher
    is better). First: does the base method localise the lesion worse on artifact images than on
    clean ones (Mann-Whitney, one-sided)? If not, the model did not take the shortcut and the
    benchmark cannot tell. Then CasCAM vs base on artifact images: paired Wilcoxon.
    """
    from scipy.stats import mannwhitneyu, wilcoxon

    claim = f"{cascam_row} finds the lesion behind the shortcut artifact better than {base_row}"
    base = per_image[per_image["row"] == base_row]
    on_artifact = base.loc[base["artifact"].astype(bool), metric].dropna().to_numpy(float)
    clean = base.loc[~base["artifact"].astype(bool), metric].dropna().to_numpy(float)
    if on_artifact.size == 0 or clean.size == 0:
        return Verdict(claim, CANNOT_TELL, f"{metric}: need diseased test images with and without the artifact "
                       f"({on_artifact.size} with, {clean.size} without)")
    shortcut_p = float(mannwhitneyu(on_artifact, clean, alternative="less").pvalue)
    subset = per_image[per_image["artifact"].astype(bool)]
    pivot = _pairs(subset, metric, [cascam_row, base_row]).dropna()
    if cascam_row not in pivot or pivot.empty:
        return Verdict(claim, CANNOT_TELL, f"no {cascam_row} values on artifact images")
    diff = pivot[cascam_row].to_numpy(float) - pivot[base_row].to_numpy(float)
    p = float(wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
    evidence = (f"{metric} on artifact images: {cascam_row} {fmt_number(pivot[cascam_row].mean())}, {base_row} "
                f"{fmt_number(pivot[base_row].mean())} (n {diff.size}, Wilcoxon p {fmt_number(p, 4)}); {base_row} on artifact vs clean "
                f"images {fmt_number(on_artifact.mean())} vs {fmt_number(clean.mean())} (one-sided Mann-Whitney p {fmt_number(shortcut_p, 4)})")
    if shortcut_p >= alpha:
        return Verdict(claim, CANNOT_TELL, evidence + "; the base map is not pulled away from the lesion by the artifact, "
                       "so there is no hidden cue to uncover")
    if p < alpha:
        return Verdict(claim, HOLDS if diff.mean() > 0 else FAILS, evidence)
    return Verdict(claim, CANNOT_TELL, evidence + "; the difference is not significant")


# Wilcoxon's two-sided exact p cannot go below 0.0625 with 5 pairs: 6 is the fewest that can say anything
MIN_LESION_IMAGES = 6
LESION_CLAIM = "the model's prediction depends on the annotated lesions"


def lesion_reliance_claim(per_image: pd.DataFrame, resamples: int = 2000, seed: int = 0,
                          alpha: float = ALPHA, unit: str = "image", claim: str = LESION_CLAIM) -> Verdict:
    """Does the model use the annotated lesions? Not a claim of the paper but a check of the
    benchmark every localisation number rests on (:func:`softcam_core.metrics.lesion_occlusion`).

    ``per_image``: an evaluation's table with ``unit`` (default ``image``; the report's
    ``seed/image``), ``lesion_drop`` and ``control_drop`` (the same on every method's row of one
    model; one per unit is used). ``claim``: the verdict's wording. Paired over the images where both are
    defined: two-sided Wilcoxon on ``lesion_drop - control_drop`` and 95 % bootstrap intervals.
    ``holds`` when occluding the lesions lowers the explained class's probability significantly
    more than occluding as many other cells; ``fails`` when significantly less (the model decides
    from elsewhere); ``cannot tell`` otherwise, or with fewer than :data:`MIN_LESION_IMAGES` images:
    then a map that avoids the lesions may still be faithful, and localisation metrics cannot tell
    a good map from a bad one on this cohort. ``details``: n and the three means with intervals.
    """
    needed = {unit, "lesion_drop", "control_drop"}
    if not needed <= set(per_image.columns):
        return Verdict(claim, CANNOT_TELL, "no lesion occlusion columns (metric lesion_occlusion not run)")
    images = per_image.drop_duplicates(unit)[["lesion_drop", "control_drop"]].astype(float).dropna()
    lesion, control = images["lesion_drop"].to_numpy(), images["control_drop"].to_numpy()
    diff = lesion - control
    lesion_mean, lesion_low, lesion_high, n = _mean_ci(lesion, resamples, seed)
    control_mean, control_low, control_high, _ = _mean_ci(control, resamples, seed)
    diff_mean, diff_low, diff_high, _ = _mean_ci(diff, resamples, seed)
    p = math.nan
    if n and np.all(diff == 0):
        p = 1.0
    elif n:
        from scipy.stats import wilcoxon

        p = float(wilcoxon(diff, zero_method="wilcox", alternative="two-sided").pvalue)
    details = pd.DataFrame([{"n": n, "lesion_drop_mean": lesion_mean, "lesion_drop_ci_low": lesion_low,
                             "lesion_drop_ci_high": lesion_high, "control_drop_mean": control_mean,
                             "control_drop_ci_low": control_low, "control_drop_ci_high": control_high,
                             "diff_mean": diff_mean, "diff_ci_low": diff_low, "diff_ci_high": diff_high,
                             "p_value": p}])
    evidence = (f"target probability drop when the annotated cells are occluded {fmt_number(lesion_mean)} "
                f"[{fmt_number(lesion_low)}, {fmt_number(lesion_high)}] vs as many other cells "
                f"{fmt_number(control_mean)} [{fmt_number(control_low)}, {fmt_number(control_high)}], "
                f"difference {fmt_number(diff_mean)} [{fmt_number(diff_low)}, {fmt_number(diff_high)}], "
                f"Wilcoxon p {fmt_number(p, 4)}, {n} images")
    if n < MIN_LESION_IMAGES:
        return Verdict(claim, CANNOT_TELL, evidence + f"; fewer than {MIN_LESION_IMAGES} annotated images "
                       "with both drops", details)
    if p < alpha and diff_mean > 0:
        return Verdict(claim, HOLDS, evidence, details)
    if p < alpha and diff_mean < 0:
        return Verdict(claim, FAILS, evidence + "; the model decides from other regions, so maps are scored "
                       "against lesions its prediction does not need", details)
    return Verdict(claim, CANNOT_TELL, evidence + "; occluding the lesions changes the prediction no more than "
                   "occluding other cells: the localisation metrics cannot tell whether a faithful map should point "
                   "at them", details)
