"""Cohort evaluation: any model x explanation methods x metrics, streamed, resumable.

``evaluate_cohort`` walks a synth-style cohort folder in batches of images: preprocess (on CUDA
the next batch decoded in a worker thread), classify (one forward), explain with every method
(one call per method per batch on CUDA, per image on CPU), score every metric against the
annotation mask mapped to the model input,
deletion curves of every (image, method) pair of the batch in one call, and append the batch's
rows to ``per_image.csv`` at once (memory is bounded by the batch, not the cohort; a killed run
resumes where it stopped). At the end it writes the cohort summary (mean, std, 95%
bootstrap interval, n per metric), paired Wilcoxon signed-rank tests between methods with Holm
correction, Parquet copies of each table and plotly figures. ``softcam evaluate`` is its CLI.

Output files in ``out_dir``:
    per_image.csv / .parquet   one row per image x method (``correct``: the model's prediction is right)
    deletion_curves.csv        one row per image x method: s0..sN (relative probability of the
                               predicted class, paper protocol)
    cohort.csv / .parquet      one row per method: <metric>_mean/_std/_ci_low/_ci_high/_n
    paired.csv / .parquet      one row per metric x method pair
    lesion_occlusion.csv       does the model use the annotated lesions? (one row: the verdict of
                               softcam_core.claims.lesion_reliance_claim with its evidence)
    config.json                the settings (checked on --resume) and ``warnings`` (e.g. a modality mismatch)
    figures/*.html (+ .png)    top-k precision vs k, deletion curves, per-method box plots
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from annotations.cells import neutralise, neutralise_frame, restore, restore_frame
from softcam_core import metrics as M
from softcam_core.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, bootstrap_ci, holm  # noqa: F401  (re-exported)

METRIC_CHOICES = (
    "topk",
    "topk_positive",
    "activation_precision",
    "activation_sensitivity",
    "activation_consistency",
    "pointing_game",
    "iou_top",
    "energy_top",
    "average_precision",
    "lesion_occlusion",
    "deletion",
    "deletion_full",
    "deletion_blur",
    "deletion_logodds",
)
# named variants that depart from the papers: opt-in (the deletion ones cost forward passes)
VARIANT_METRICS = ("topk_positive", "deletion_full", "deletion_blur", "deletion_logodds")
DEFAULT_METRICS = tuple(m for m in METRIC_CHOICES if m not in VARIANT_METRICS)
# deletion metric choice -> (AUDC column, options of softcam_core.metrics.deletion_curves);
# baseline None = EvalSettings.deletion_baseline
DELETION_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "deletion": ("audc", {"protocol": "top", "scale": "ratio", "baseline": None}),
    "deletion_full": ("audc_full", {"protocol": "full", "scale": "ratio", "baseline": None}),
    "deletion_blur": ("audc_blur", {"protocol": "top", "scale": "ratio", "baseline": "blur"}),
    "deletion_logodds": ("audc_logodds", {"protocol": "top", "scale": "logodds", "baseline": None}),
}
TARGET_POLICIES = ("disease", "label", "pred")
DEFAULT_TOPK = (1, 3, 5, 10, 15, 20)
DEFAULT_DELETION_STEPS = M.DEFAULT_DELETION_STEPS  # the paper's top-30 patches (SoftCAM App. I)
ID_COLUMNS = ("image", "split", "label", "pred", "correct", "target", "p_target", "method", "seconds")
# per-image columns of the model, not of a map (the same on every method's row): left out of the
# per-method summaries and paired tests; summarised once in lesion_occlusion.csv
LESION_COLUMNS = ("lesion_drop", "control_drop")
# bumped whenever a metric's definition changes, so --resume never mixes rows of two definitions
METRIC_DEFINITIONS = 2
NOT_SIGNED = ("not applicable: {method} maps are non-negative by construction, so no pixel can carry evidence "
              "against the class")

Progress = Callable[[int, int, str], None]

# images per batch (EvalSettings.batch_size = None). CUDA: one forward / explain / deletion call
# for 32 images keeps the GPU busy (docs/performance.md, finding 5). CPU: at 224 px the forwards
# are compute-bound and the batch changes little (softcam + gradcam, 8 images, 2 shared cores:
# 0.60-0.63 images per CPU second at batch 1, 0.65-0.66 at 4, 0.60-0.61 at 8, 0.67-0.69 at 8 with
# batch_explain); at 64 px batch 8 is 1.08x (softcam) / 1.31x (gradcam) one image at a time
# (bench --quick). 8 keeps a batch's inputs and maps small.
EVAL_BATCH_CUDA = 32
EVAL_BATCH_CPU = 8


# ----------------------------------------------------------------------------------------------
# tables


def metric_columns(per_image: pd.DataFrame) -> list[str]:
    """The metric columns of a per-image table (everything numeric that is not an id column)."""
    skip = set(ID_COLUMNS) | set(LESION_COLUMNS) | {"notes", "model", "model_method", "modality", "label_index"}
    return [c for c in per_image.columns if c not in skip and pd.api.types.is_numeric_dtype(per_image[c])]


def summarise(
    per_image: pd.DataFrame,
    group: str = "method",
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> pd.DataFrame:
    """One row per ``group`` value: for every metric (and ``seconds``) mean, std (ddof=1), 95% CI, n.

    n counts the images where the metric is defined; undefined (nan) values are left out.
    """
    columns = metric_columns(per_image) + (["seconds"] if "seconds" in per_image.columns else [])
    rows = []
    for name, rows_of in per_image.groupby(group, sort=False):
        row: dict[str, Any] = {group: name, "images": int(rows_of["image"].nunique())}
        for col in columns:
            values = rows_of[col].to_numpy(dtype=np.float64)
            values = values[np.isfinite(values)]
            low, high = bootstrap_ci(values, resamples, seed)
            row[f"{col}_mean"] = float(values.mean()) if values.size else math.nan
            row[f"{col}_std"] = float(values.std(ddof=1)) if values.size > 1 else math.nan
            row[f"{col}_ci_low"] = low
            row[f"{col}_ci_high"] = high
            row[f"{col}_n"] = int(values.size)
        rows.append(row)
    return pd.DataFrame(rows)


def paired_tests(per_image: pd.DataFrame, group: str = "method", alpha: float = 0.05) -> pd.DataFrame:
    """Wilcoxon signed-rank test for every pair of ``group`` values, per metric, Holm-corrected.

    Pairs are matched by image; only images where both values are defined count (n). The test is
    two-sided with scipy's default zero handling (``zero_method="wilcox"``: zero differences are
    dropped). The Holm family is all pairs of one metric. ``mean_diff`` is a minus b.
    """
    from scipy.stats import wilcoxon

    methods = list(dict.fromkeys(per_image[group]))
    rows = []
    for metric in metric_columns(per_image):
        table = per_image.pivot_table(index="image", columns=group, values=metric, aggfunc="first")
        family = []
        for a, b in itertools.combinations(methods, 2):
            if a not in table or b not in table:
                continue
            both = table[[a, b]].dropna()
            x, y = both[a].to_numpy(float), both[b].to_numpy(float)
            diff = x - y
            stat = p = math.nan
            note = ""
            if both.shape[0] == 0:
                note = "no image where both are defined"
            elif np.all(diff == 0):
                note = "all differences are zero"
            else:
                try:
                    result = wilcoxon(x, y, zero_method="wilcox", alternative="two-sided")
                    stat, p = float(result.statistic), float(result.pvalue)
                except ValueError as exc:
                    note = str(exc).splitlines()[0]
            family.append(
                {
                    "metric": metric, "method_a": a, "method_b": b, "n": int(both.shape[0]),
                    "mean_a": float(x.mean()) if x.size else math.nan,
                    "mean_b": float(y.mean()) if y.size else math.nan,
                    "mean_diff": float(diff.mean()) if diff.size else math.nan,
                    "median_diff": float(np.median(diff)) if diff.size else math.nan,
                    "statistic": stat, "p_value": p, "note": note,
                }
            )
        adjusted = holm([r["p_value"] for r in family])
        for r, adj in zip(family, adjusted):
            r["p_holm"] = float(adj)
            r["significant"] = bool(np.isfinite(adj) and adj < alpha)
        rows.extend(family)
    columns = ["metric", "method_a", "method_b", "n", "mean_a", "mean_b", "mean_diff", "median_diff",
               "statistic", "p_value", "p_holm", "significant", "note"]
    out = pd.DataFrame(rows, columns=columns)
    if group != "method":
        out = out.rename(columns={"method_a": f"{group}_a", "method_b": f"{group}_b"})
    return out


def _correct_flags(values: pd.Series) -> pd.Series:
    """``correct`` as read back from a CSV (bool, "True"/"False", 1/0, empty) -> bool, unknown = False."""
    if values.dtype == bool:
        return values
    return values.map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))


def common_correct(tables: pd.DataFrame | Sequence[pd.DataFrame], by: str | None = "model") -> set[str]:
    """Images that every compared model classifies correctly (the cohort of the paper's AUDC).

    ``tables``: one per-image table per model (``per_image.csv`` of each evaluation), or one
    table holding several models, told apart by its ``by`` column (e.g. the report's ``model``;
    with ``by=None`` or without that column it is one model). An image counts when it appears for
    every model and each of its rows there has ``correct`` True (a missing or unknown ``correct``
    counts as not correct). Returns the image ids (``image`` column, as str).
    """
    if isinstance(tables, pd.DataFrame):
        if by is not None and by in tables.columns:
            tables = [group for _, group in tables.groupby(by, sort=False)]
        else:
            tables = [tables]
    common: set[str] | None = None
    for table in tables:
        if "correct" not in table.columns or "image" not in table.columns:
            raise ValueError("a per-image table needs the columns 'image' and 'correct' (softcam evaluate writes both)")
        flags = _correct_flags(table["correct"])
        right = flags.groupby(table["image"].astype(str)).all()
        images = set(right.index[right.to_numpy(bool)])
        common = images if common is None else common & images
    return common or set()


def with_common_correct(
    per_image: pd.DataFrame, columns: Sequence[str] = ("audc",), by: str | None = "model", suffix: str = "_common_correct"
) -> pd.DataFrame:
    """Copy of ``per_image`` with ``<column><suffix>``: the column's value on the images of
    :func:`common_correct` (every compared model right), nan elsewhere, so :func:`summarise` and
    :func:`paired_tests` give the paper's cohort AUDC (faithfulness on correctly classified images,
    the same images for every model)."""
    keep = per_image["image"].astype(str).isin(common_correct(per_image, by))
    out = per_image.copy()
    for column in columns:
        out[f"{column}{suffix}"] = out[column].where(keep)
    return out


# ----------------------------------------------------------------------------------------------
# settings and per-image scoring


def _pct(fraction: float) -> str:
    """Column suffix of a top fraction: 0.10 -> "10"."""
    return f"{round(fraction * 100):g}"


@dataclass
class EvalSettings:
    """What to compute. Defaults follow the papers (docs/metrics.md).

    metrics: subset of :data:`METRIC_CHOICES`; default :data:`DEFAULT_METRICS` (every paper metric;
    the named variants of :data:`VARIANT_METRICS` are opt-in).
    patch: grid-cell side in model-input pixels (None: ``img_size // 16``).
    topk: the k values of ``topk_precision_k<k>`` (each <= the number of cells).
    iou_fraction: top fraction of ``iou_top<pct>`` (CasCAM: 0.10). energy_fraction: top fraction of
    ``energy_top<pct>`` / ``energy_count_top<pct>`` (CasCAM's Top-15 % Energy: 0.15).
    deletion_steps: cells removed one per step (paper protocol; SoftCAM App. I: the top 30), at
    most the number of cells (else ValueError); the full-image variant spreads the whole image over
    as many steps. deletion_baseline: the fill, see :func:`softcam_core.metrics.deletion_curves`.
    occlusion_baseline: the fill of ``lesion_occlusion`` (default ``"blur"``: the lesion's detail goes,
    the image stays in distribution; a zero fill made random cells *raise* a trained fundus model's
    disease probability by ~40 %, docs/metrics.md).
    Deletion always tracks the model's *predicted* class, with that class's map.
    target: the class the maps explain and the map metrics score: ``"disease"`` (class 1 of a
    binary model; for more classes the true class if diseased, else the most probable disease
    class), ``"label"`` or ``"pred"``.
    pointing_tolerance: pixels. split: cohort split (``"all"`` for every image). limit: first N images.
    images: only these image stems of the split (after ``limit``), in the split's order: one
    worker's chunk of a job (:mod:`service.worker`); None: all of them.
    point_radius: tolerance radius (model-input pixels) of point annotations: a point stands for the
    pixels within it (:func:`softcam_core.metrics.point_region`); None: half a grid cell (``patch / 2``).
    batch_size: images per batch (one forward, one ``explain`` call per method, one deletion call);
    None: :data:`EVAL_BATCH_CUDA` on CUDA, :data:`EVAL_BATCH_CPU` on CPU. It changes no value
    (beyond float rounding of batched kernels, ~1e-6), so it is not part of the resume check.
    batch_explain: one ``explain`` call per method for the whole batch (True) or one per image
    (False); None: True on CUDA, False on CPU. Batched kernels round differently (maps ~1e-6
    apart), and the cell rankings of top-k precision and deletion flip at cells whose means are
    that close (seen with a barely trained 64 px model: AUDC 2.6e-3 apart), so on CPU, where a
    batched map costs about what B single maps cost at >= 128 px, the default keeps the maps of
    the one-image-at-a-time run; on CUDA the batched call is the throughput (finding 5 of
    docs/performance.md) and its rounding differs from any other batch size anyway.
    """

    metrics: tuple[str, ...] = DEFAULT_METRICS
    patch: int | None = None
    topk: tuple[int, ...] = DEFAULT_TOPK
    iou_fraction: float = 0.10
    energy_fraction: float = 0.15
    deletion_steps: int = DEFAULT_DELETION_STEPS
    deletion_baseline: str | float = "zero"
    occlusion_baseline: str | float = "blur"
    target: str = "disease"
    pointing_tolerance: float = 0.0
    point_radius: float | None = None
    split: str = "test"
    limit: int | None = None
    resamples: int = BOOTSTRAP_RESAMPLES
    seed: int = BOOTSTRAP_SEED
    figures: bool = True
    png: bool = True
    batch_size: int | None = None
    batch_explain: bool | None = None
    images: tuple[str, ...] | None = None

    def validate(self, n_cells: int | None = None) -> None:
        """Raise ValueError for a bad setting; with ``n_cells`` (grid cells of the model input) also
        for top-k values or deletion steps beyond the cells."""
        for name, fill in (("deletion", self.deletion_baseline), ("occlusion", self.occlusion_baseline)):
            if isinstance(fill, str) and fill not in M.BASELINE_NAMES:
                raise ValueError(f"unknown {name} baseline {fill!r}; use {', '.join(M.BASELINE_NAMES)} or a number")
        unknown = [m for m in self.metrics if m not in METRIC_CHOICES]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRIC_CHOICES)}")
        if self.target not in TARGET_POLICIES:
            raise ValueError(f"unknown target policy {self.target!r}; choose from {', '.join(TARGET_POLICIES)}")
        if any(int(k) != k or k < 1 for k in self.topk):
            raise ValueError(f"top-k values must be positive integers, got {self.topk}")
        for name, fraction in (("--iou-fraction", self.iou_fraction), ("--energy-fraction", self.energy_fraction)):
            if not 0 < fraction <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {fraction}")
        if int(self.deletion_steps) != self.deletion_steps or self.deletion_steps < 1:
            raise ValueError(f"--steps must be a positive integer, got {self.deletion_steps}")
        if self.point_radius is not None and not (self.point_radius >= 0 and math.isfinite(self.point_radius)):
            raise ValueError(f"--point-radius must be >= 0, got {self.point_radius}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.batch_size is not None and (int(self.batch_size) != self.batch_size or self.batch_size < 1):
            raise ValueError(f"--batch-size must be a positive integer, got {self.batch_size}")
        if n_cells is None:
            return
        if "topk" in self.metrics and max(self.topk) > n_cells:
            raise ValueError(f"--topk {max(self.topk)} exceeds the {n_cells} grid cells of the model input "
                             "(top-k precision divides by k); use smaller k or a smaller --patch")
        top_protocol = [m for m in self.metrics if m in DELETION_VARIANTS and DELETION_VARIANTS[m][1]["protocol"] == "top"]
        if top_protocol and self.deletion_steps > n_cells:
            raise ValueError(f"--steps {self.deletion_steps} exceeds the {n_cells} grid cells of the model input "
                             "(deletion removes one cell per step); use --steps <= that or a smaller --patch")

    def columns(self) -> list[str]:
        """Metric columns of per_image.csv, in order."""
        iou, energy = _pct(self.iou_fraction), _pct(self.energy_fraction)
        ks = sorted(set(self.topk))
        names = {
            "topk": [f"topk_precision_k{k}" for k in ks],
            "topk_positive": [f"topk_precision_pos_k{k}" for k in ks],
            "activation_precision": ["activation_precision"],
            "activation_sensitivity": ["activation_sensitivity", "activation_sensitivity_count"],
            "activation_consistency": ["activation_consistency_diseased", "activation_consistency_healthy",
                                       "activation_consistency"],
            "pointing_game": ["pointing_game"],
            "iou_top": [f"iou_top{iou}"],
            "energy_top": [f"energy_top{energy}", f"energy_count_top{energy}"],
            "average_precision": ["average_precision", "average_precision_cascam"],
            "lesion_occlusion": list(LESION_COLUMNS),
            "deletion": ["audc", "audc_correct"],
            **{m: [column] for m, (column, _) in DELETION_VARIANTS.items() if m != "deletion"},
        }
        return [c for m in METRIC_CHOICES if m in self.metrics for c in names[m]]


POINTS_ONLY = "point annotations only (a point has no area)"
# metrics of how much of an annotated *area* a map covers: undefined when only points mark the lesions
AREA_METRICS = (M.activation_precision, M.activation_sensitivity, M.iou_top_fraction, M.energy_top_fraction,
                M.average_precision, M.average_precision_cascam)


def score_map(
    sal: np.ndarray, mask: np.ndarray, label_index: int, settings: EvalSettings, patch: int, method: str | None = None,
    points: np.ndarray | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """All map-only metrics of one map: ``({column: value}, {column: reason undefined})``.

    ``sal`` (H, W) explains the settings' target class; ``mask`` (H, W) bool; ``label_index`` the
    true class (0 = healthy). ``method``: the map's method; activation consistency is "not
    applicable" (nan with that reason) for a method whose spec is not signed
    (:func:`softcam_core.explain.method_spec`): its maps are non-negative by construction.
    ``points``: (H, W) bool region of the image's point annotations (:func:`M.point_region`), or None.
    Top-k precision and the pointing game score against ``mask | points``; the area metrics
    (activation precision / sensitivity, IoU, energy, AP) against ``mask`` alone, and are undefined
    with :data:`POINTS_ONLY` when only points mark the lesions.
    """
    where = mask if points is None else (np.asarray(mask, dtype=bool) | points)
    points_only = points is not None and points.any() and not np.asarray(mask).any()
    iou, energy = _pct(settings.iou_fraction), _pct(settings.energy_fraction)
    calls: list[tuple[str, Callable[..., float], tuple]] = []
    values: dict[str, float] = {}
    reasons: dict[str, str] = {}
    chosen = settings.metrics
    if "topk" in chosen:
        for k in sorted(set(settings.topk)):
            calls.append((f"topk_precision_k{k}", M.topk_localization_precision, (sal, where, k, patch)))
    if "topk_positive" in chosen:
        for k in sorted(set(settings.topk)):
            calls.append((f"topk_precision_pos_k{k}", M.topk_localization_precision, (sal, where, k, patch, "positive")))
    if "activation_precision" in chosen:
        calls.append(("activation_precision", M.activation_precision, (sal, mask)))
    if "activation_sensitivity" in chosen:
        calls.append(("activation_sensitivity", M.activation_sensitivity, (sal, mask)))
        calls.append(("activation_sensitivity_count", M.activation_sensitivity, (sal, mask, "count")))
    if "activation_consistency" in chosen:
        from softcam_core.explain.specs import is_method, method_spec

        columns = ("activation_consistency_diseased", "activation_consistency_healthy", "activation_consistency")
        if method is not None and not (is_method(method) and method_spec(method).signed):
            for column in columns:
                values[column] = math.nan
                reasons[column] = NOT_SIGNED.format(method=method)
        else:
            value, reason = M.metric_or_reason(M.activation_consistency, sal, label_index)
            diseased = label_index != 0
            values[columns[0]] = value if diseased else math.nan
            values[columns[1]] = math.nan if diseased else value
            values[columns[2]] = value
            reasons[columns[1 if diseased else 0]] = "diseased image" if diseased else "healthy image"
            if reason:
                reasons[columns[0 if diseased else 1]] = reasons[columns[2]] = reason
    if "pointing_game" in chosen:
        calls.append(("pointing_game", M.pointing_game, (sal, where, settings.pointing_tolerance)))
    if "iou_top" in chosen:
        calls.append((f"iou_top{iou}", M.iou_top_fraction, (sal, mask, settings.iou_fraction)))
    if "energy_top" in chosen:
        calls.append((f"energy_top{energy}", M.energy_top_fraction, (sal, mask, settings.energy_fraction)))
        calls.append((f"energy_count_top{energy}", M.energy_top_fraction, (sal, mask, settings.energy_fraction, "count")))
    if "average_precision" in chosen:
        calls.append(("average_precision", M.average_precision, (sal, mask)))
        calls.append(("average_precision_cascam", M.average_precision_cascam, (sal, mask)))
    for column, fn, args in calls:
        if points_only and fn in AREA_METRICS:
            values[column], reasons[column] = math.nan, POINTS_ONLY
            continue
        value, reason = M.metric_or_reason(fn, *args)
        values[column] = value
        if reason:
            reasons[column] = reason
    return values, reasons


NO_REGION = "no annotated region"


def _add_lesion_occlusion(rows: list[dict], order: list[tuple[int, str]], model, xs: torch.Tensor,
                          masks: list[np.ndarray], point_masks: list[np.ndarray | None], targets: list[int],
                          patch: int, settings: "EvalSettings") -> None:
    """Fill ``lesion_drop`` / ``control_drop`` (:func:`softcam_core.metrics.lesion_occlusion`, the
    explained class, the deletion baseline) on every row of each annotated image of the batch."""
    import warnings

    regions = [m if pm is None else (m | pm) for m, pm in zip(masks, point_masks)]
    annotated = [k for k in dict.fromkeys(k for k, _ in order) if regions[k].any()]
    drops: dict[int, tuple[float, float]] = {}
    if annotated:
        baseline = settings.occlusion_baseline
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", M.MetricUndefined)  # the reasons are written below
            lesion, control = M.lesion_occlusion(model, xs[annotated], np.stack([regions[k] for k in annotated]),
                                                 [targets[k] for k in annotated], patch, baseline)
        drops = {k: (float(a), float(b)) for k, a, b in zip(annotated, lesion, control)}
    for row, (k, _) in zip(rows, order):
        lesion_drop, control_drop = drops.get(k, (math.nan, math.nan))
        row["lesion_drop"], row["control_drop"] = lesion_drop, control_drop
        if k not in drops:
            row["_reasons"]["lesion_drop"] = row["_reasons"]["control_drop"] = NO_REGION
        elif math.isnan(lesion_drop):
            row["_reasons"]["lesion_drop"] = row["_reasons"]["control_drop"] = "target probability of the intact image is 0"
        elif math.isnan(control_drop):
            row["_reasons"]["control_drop"] = "the annotation touches more than half of the cells: no same-size control"


def _notes(reasons: dict[str, str]) -> str:
    """``"reason (col, col); reason (col)"``: why cells of a row are empty."""
    by_reason: dict[str, list[str]] = {}
    for column, reason in reasons.items():
        by_reason.setdefault(reason, []).append(column)
    return "; ".join(f"{r} ({', '.join(cols)})" for r, cols in by_reason.items())


def choose_target(policy: str, probs: np.ndarray, label_index: int) -> int:
    """Class index whose evidence is explained and scored (see :class:`EvalSettings`)."""
    pred = int(np.argmax(probs))
    if policy == "label":
        return int(label_index)
    if policy == "pred":
        return pred
    if probs.size == 2:
        return 1
    if label_index != 0:
        return int(label_index)
    return 1 + int(np.argmax(probs[1:]))


# ----------------------------------------------------------------------------------------------
# the cohort folder and its annotations


@dataclass
class _Item:
    path: Path
    stem: str
    label_index: int
    split: str
    unlabeled: bool = False


def _record_item(record: Any) -> _Item:
    """Adapt a CohortFolder record (attributes or a (path, label, split) tuple) to an _Item."""
    if isinstance(record, (tuple, list)) and not hasattr(record, "_fields"):
        path, label, split = record[0], record[1], record[2] if len(record) > 2 else ""
    else:
        path = next(getattr(record, a) for a in ("path", "image_path", "image") if hasattr(record, a))
        label = next(getattr(record, a) for a in ("label_index", "label") if hasattr(record, a))
        split = getattr(record, "split", "")
    path = Path(path)
    # a database record names its image by pseudonym (the stored file is named by its hash)
    stem = getattr(record, "stem", None) or path.stem
    return _Item(path=path, stem=str(stem), label_index=int(label), split=str(split),
                 unlabeled=bool(getattr(record, "unlabeled", False)))


def image_stems(folder: Any, split: str, limit: int | None = None) -> list[str]:
    """The image keys (the ``image`` column) an evaluation of ``split`` scores, in its order."""
    stems = [_record_item(r).stem for r in _open_folder(folder).split(split)]
    return stems[:limit] if limit else stems


def _open_folder(folder: Any):
    if isinstance(folder, (str, Path)):
        from softcam_core.data import open_cohort

        return open_cohort(folder)
    return folder


@dataclass
class _Resolved:
    key: Any
    width: int | None = None
    height: int | None = None


def load_box_annotations(path: str | Path, items: Sequence[_Item]) -> dict[str, list]:
    """COCO boxes per image stem, read with :func:`annotations.formats.read_coco`.

    Images of the file that are not in ``items`` are ignored; a malformed file or row raises
    ValueError naming the file and the first problem.
    """
    from annotations.formats import read_coco

    by_name: dict[str, str] = {}
    for item in items:
        by_name[item.path.name] = item.stem
        by_name[item.stem] = item.stem

    def resolve(ref: str, fuzzy: bool) -> _Resolved:
        name = Path(ref.replace("\\", "/")).name
        return _Resolved(by_name.get(name) or by_name.get(Path(name).stem))

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: annotation file not found")
    report = read_coco(path, resolve)
    if report.errors:
        raise ValueError(f"{path.name}: {report.errors[0]} ({len(report.errors)} problem(s) in all)")
    boxes: dict[str, list] = {}
    for ann in report.annotations:
        if ann.image is None or getattr(ann.geometry, "kind", "box") != "box":
            continue
        boxes.setdefault(ann.image, []).append(ann.geometry)
    return boxes


# ----------------------------------------------------------------------------------------------
# streaming output


def _read_done(per_image: Path, header: list[str], repair: bool = True) -> set[tuple[str, str]]:
    """(image, method) pairs already in per_image.csv; drops a torn last line from a killed run
    (rewriting the file without it when ``repair``: only the process that owns the file does)."""
    if not per_image.exists():
        return set()
    with per_image.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return set()
    if rows[0] != header:
        raise ValueError(
            f"{per_image}: written with other columns ({', '.join(rows[0][:12])}...); "
            "use another --out or run without --resume"
        )
    good = [r for r in rows[1:] if len(r) == len(header)]
    if repair and len(good) != len(rows) - 1:  # rewrite without the torn row
        with per_image.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(good)
    image_col, method_col = header.index("image"), header.index("method")
    return {(restore(r[image_col]), restore(r[method_col])) for r in good}


def _append_rows(path: Path, header: list[str], rows: list[dict[str, Any]]) -> None:
    """Append rows in one write (header first if the file is new) and flush them to disk."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, extrasaction="raise")
    new = not path.exists() or path.stat().st_size == 0
    if new:
        writer.writeheader()
    for row in rows:  # text cells neutralised for spreadsheets (annotations.cells), numbers untouched
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else neutralise(v)) for k, v in row.items()})
    with path.open("a", newline="", encoding="utf-8") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())


def _settings_fingerprint(meta: dict, settings: EvalSettings, patch: int, annotations: str | None) -> dict:
    model_id = hashlib.sha256(
        json.dumps({k: meta.get(k) for k in sorted(meta) if k != "metrics"}, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    return {
        "model": model_id,
        "columns": settings.columns(),
        "patch": patch,
        "iou_fraction": settings.iou_fraction,
        "energy_fraction": settings.energy_fraction,
        "deletion_steps": settings.deletion_steps,
        "deletion_baseline": settings.deletion_baseline,
        "occlusion_baseline": settings.occlusion_baseline,
        # what the definitions are: runs of the earlier definitions (mass-weighted consistency,
        # top-k over min(k, #positive), full-image deletion of the explained class) are not resumed
        "definitions": METRIC_DEFINITIONS,
        "target": settings.target,
        "pointing_tolerance": settings.pointing_tolerance,
        "point_radius": settings.point_radius,
        "annotations": annotations,
    }


# ----------------------------------------------------------------------------------------------
# the evaluation


def _chunks(values: list, size: int) -> list[list]:
    return [values[i : i + size] for i in range(0, len(values), size)]


def _explain_batch(
    explain: Callable[..., torch.Tensor],
    model: torch.nn.Module,
    xs: torch.Tensor,
    rows: list[int],
    method: str,
    targets: list[int],
    per_image_method: set[str],
) -> tuple[list[np.ndarray], list[float]]:
    """Maps (H, W) of ``method`` for images ``xs[rows]`` and the seconds charged to each.

    One ``explain`` call for all of them; each image is charged the call's time / number of
    images (its share of the batch). A method whose batched call raises is retried one image at
    a time, then and for the rest of the run (``per_image_method``); an error that also happens
    for one image is raised as it is.
    """
    if method not in per_image_method and len(rows) > 1:
        start = time.perf_counter()
        try:
            maps = explain(model, xs[rows], method, target=targets)
        except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError):
            per_image_method.add(method)
        else:
            seconds = (time.perf_counter() - start) / len(rows)
            return list(maps.detach().float().cpu().numpy()), [seconds] * len(rows)
    maps, seconds = [], []
    for row, target in zip(rows, targets):
        start = time.perf_counter()
        sal = explain(model, xs[row : row + 1], method, target=[target])
        maps.append(sal.detach().float().cpu().numpy()[0])
        seconds.append(time.perf_counter() - start)
    return maps, seconds


@dataclass
class EvaluationResult:
    """Where the outputs went and the tables themselves (small: one row per image x method)."""

    out_dir: Path
    per_image: pd.DataFrame
    cohort: pd.DataFrame
    paired: pd.DataFrame
    curves: pd.DataFrame
    files: dict[str, Path] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # config.json's: e.g. a modality mismatch


def evaluate_cohort(
    model: torch.nn.Module,
    meta: dict,
    folder: Any,
    methods: Sequence[str],
    metrics: Sequence[str] | None = None,
    out_dir: str | Path = "evaluation",
    progress: Progress | None = None,
    resume: bool = False,
    *,
    annotations: str | Path | None = None,
    settings: EvalSettings | None = None,
    device: torch.device | str | None = None,
) -> EvaluationResult:
    """Evaluate ``methods`` on ``model`` over a cohort; stream rows to ``out_dir/per_image.csv``.

    Args:
        model, meta: from :func:`softcam_core.models.load_checkpoint` (meta gives img_size, mean,
            std, classes).
        folder: a :class:`softcam_core.data.CohortFolder` or its path (synth layout).
        methods: explanation method names (``softcam_core.explain.METHODS``, ``cascam:<base>``).
        metrics: subset of :data:`METRIC_CHOICES` (None = ``settings.metrics``, by default
            :data:`DEFAULT_METRICS`; given, it overrides ``settings.metrics``).
        out_dir: output folder (created). progress: ``progress(done, total, message)`` called
            once per image x method, after its batch's rows are written, and with ``done``
            unchanged before each method's maps and the deletion curves of a batch, so a long batch
            says what it computes and a job cancelled through the callback (it raises) stops
            there (no Streamlit here; the page passes its own callback).
        resume: keep rows already in per_image.csv and compute only the missing image x method
            pairs; without it, earlier outputs in ``out_dir`` are replaced.
        annotations: COCO file whose boxes replace the folder's ``masks/`` as ground truth.
        settings: :class:`EvalSettings` (``batch_size``: images per batch). device: default
            :func:`softcam_core.device.default_device`.
    Returns:
        :class:`EvaluationResult`.

    Classes: the maps explain ``settings.target`` (default the disease class) and every map metric
    scores that map. Deletion follows the paper instead: it tracks the model's *predicted* class
    (the ``pred`` column) under the map of that class, explained once more (same method, not timed)
    for the images where the predicted class is not the target. ``correct`` (per image: the
    prediction equals the true class; empty without a class label) gives ``audc_correct``, the
    AUDC on correctly classified images; :func:`common_correct` / :func:`with_common_correct` give
    the images every compared model classifies correctly.

    Batching: a batch's images share one forward pass (probabilities, target choice), one
    ``explain`` call per method (a method whose batched call fails runs one image at a time) and
    one :func:`softcam_core.metrics.deletion_curves` call per deletion metric (the intact
    probabilities of that forward are its step 0). The ``seconds`` column is then the method's batch time divided by
    the batch's images. Values equal the one-image-at-a-time run (``batch_size=1``) up to the
    float rounding of batched kernels (tests: 1e-5). ``folder`` is used from the calling thread
    only (``split``, ``mask``, ``classes``, ``root``); on CUDA a worker thread reads and decodes
    the next batch's image files.
    """
    from tqdm.auto import tqdm

    from softcam_core.device import default_device, join_process_group
    from softcam_core.explain import explain
    from softcam_core.explain.cli import check_methods
    from softcam_core.inference import modality_warning, model_input

    settings = settings or EvalSettings()
    if metrics is not None:
        settings.metrics = tuple(metrics)
    settings.validate()
    methods = list(dict.fromkeys(m.strip() for m in methods if m.strip()))
    if not methods:
        raise ValueError("no explanation method given")
    # every method must apply to this model before anything is written (a refused run leaves the
    # output folder as it was: no config.json, no cleared rows)
    check_methods(model, methods)
    folder = _open_folder(folder)
    classes = list(meta["classes"])
    img_size = int(meta["img_size"])
    patch = int(settings.patch or max(1, img_size // 16))
    cell_rows, cell_cols = M.cell_grid((img_size, img_size), patch)
    settings.validate(cell_rows.size * cell_cols.size)
    deletions = [m for m in DELETION_VARIANTS if m in settings.metrics]

    items = [_record_item(r) for r in folder.split(settings.split)]
    if not items:
        raise ValueError(f"{getattr(folder, 'root', folder)}: no image in split {settings.split!r}")
    if settings.limit:
        items = items[: settings.limit]
    if settings.images is not None:
        wanted = set(settings.images)
        items = [item for item in items if item.stem in wanted]
    boxes = load_box_annotations(annotations, items) if annotations else None
    folder_classes = list(getattr(folder, "classes", classes))
    # point annotations ((x, y) in original pixels per image), where the cohort source has them
    folder_points = getattr(folder, "points", None) if boxes is None else None
    point_radius = float(patch) / 2 if settings.point_radius is None else float(settings.point_radius)
    cohort_modality = getattr(folder, "modality", None)
    root = getattr(folder, "root", None)  # a database cohort names itself ("database cohort 'ward7'")
    what = root if isinstance(root, str) else f"the cohort folder {root}" if root is not None else "the cohort"
    warnings = [w for w in [modality_warning(meta.get("modality"), cohort_modality, what)] if w]

    out_dir = Path(out_dir)
    per_image_path = out_dir / "per_image.csv"
    curves_path = out_dir / "deletion_curves.csv"
    config_path = out_dir / "config.json"
    header = list(ID_COLUMNS) + settings.columns() + ["notes"]
    curve_header = ["image", "method"] + [f"s{s}" for s in range(settings.deletion_steps + 1)]
    fingerprint = _settings_fingerprint(meta, settings, patch, str(annotations) if annotations else None)

    # under torchrun every process takes every world-th image (of the split's stable order) and
    # streams its rows to a shard file of its own; rank 0 merges them at the end (see _merge_shards)
    device = torch.device(device) if device is not None else default_device()
    rank, world, device, started_group = join_process_group(device)
    all_items = items
    items = items[rank::world]
    if world > 1:
        per_image_path = out_dir / SHARD_FOLDER / f"rank{rank}-of-{world}.per_image.csv"
        curves_path = out_dir / SHARD_FOLDER / f"rank{rank}-of-{world}.deletion_curves.csv"
    if rank == 0:
        for warning in warnings:
            print(f"softcam evaluate: warning: {warning}", file=sys.stderr)
        if resume and config_path.exists():
            previous = json.loads(config_path.read_text())
            changed = [k for k, v in fingerprint.items() if previous.get("fingerprint", {}).get(k) != v]
            if changed:
                raise ValueError(
                    f"{config_path}: earlier run used other settings ({', '.join(changed)}); "
                    "use another --out or run without --resume"
                )
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            for stale in (out_dir / "per_image.csv", out_dir / "deletion_curves.csv"):
                stale.unlink(missing_ok=True)
            shutil.rmtree(out_dir / SHARD_FOLDER, ignore_errors=True)
        config_path.write_text(json.dumps(
            {"fingerprint": fingerprint, "methods": methods, "split": settings.split, "limit": settings.limit,
             "resamples": settings.resamples, "seed": settings.seed, "classes": classes,
             "arch": meta.get("arch"), "head": meta.get("head"),
             "modality": {"model": meta.get("modality"), "cohort": cohort_modality},
             "warnings": warnings}, indent=2, default=str))
    if world > 1:
        _barrier()  # rank 0 has checked the settings and cleared a fresh run's old rows
        per_image_path.parent.mkdir(parents=True, exist_ok=True)
    # rows of an earlier run count wherever they are: the merged table and every shard, whatever the
    # number of processes then (a run cut off under torchrun resumes in one process and vice versa)
    done = set().union(*(_read_done(path, header, repair=path == per_image_path)
                         for path in _row_files(out_dir, "per_image"))) if resume else set()
    model = model.to(device).eval()
    total = len(items) * len(methods)
    finished = sum(1 for it in items for m in methods if (it.stem, m) in done)
    bar = tqdm(total=total, initial=finished, desc="evaluate" if world == 1 else f"evaluate [rank {rank}/{world}]",
               unit="map", disable=progress is not None, position=rank)
    if progress:
        progress(finished, total, "resuming" if finished else "starting")

    batch_size = settings.batch_size or (EVAL_BATCH_CUDA if device.type == "cuda" else EVAL_BATCH_CPU)
    todo = [(item, [m for m in methods if (item.stem, m) not in done]) for item in items]
    batches = _chunks([(item, pending) for item, pending in todo if pending], batch_size)

    def decode(batch: list[tuple[_Item, list[str]]]) -> list[tuple[tuple[int, int], torch.Tensor, Any]]:
        """File reads, decoding and preprocessing of a batch: (original (H, W), input, geometry)."""
        decoded = []
        for item, _ in batch:
            x, geometry, image = model_input(item.path, meta)  # as predict and the app prepare it
            decoded.append((tuple(image.pixels.shape[:2]), x, geometry))
        return decoded

    # On CUDA the next batch is read and decoded in a worker thread while this one is explained
    # (file I/O and the image codecs release the GIL): decoding + preprocessing takes 4-23 ms per
    # image (128-512 px synth PNGs to 224 px), a large share of a GPU's ~30 ms per image. On CPU
    # it is next to nothing (~1.5 s per image at 224 px) and a second allocating thread only
    # raised the peak memory (benchmark 6), so decoding stays inline there. The cohort source
    # itself (split, mask) is only used from this thread, so a source bound to its creating thread
    # (a database connection) works.
    batch_explain = device.type == "cuda" if settings.batch_explain is None else bool(settings.batch_explain)
    # methods explained one image at a time: all of them without batch_explain, else those whose
    # batched call failed
    per_image_method: set[str] = set() if batch_explain else set(methods)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evaluate-decode") if device.type == "cuda" else None
    try:
        upcoming = pool.submit(decode, batches[0]) if pool is not None and batches else None
        for index, batch in enumerate(batches):
            if pool is None:
                decoded = decode(batch)
            else:
                decoded = upcoming.result()
                upcoming = pool.submit(decode, batches[index + 1]) if index + 1 < len(batches) else None
            masks, point_masks = [], []
            for (item, _), (shape, _, geometry) in zip(batch, decoded):
                if boxes is not None:
                    from annotations.geometry import boxes_to_mask

                    original_mask = boxes_to_mask(boxes.get(item.stem, []), *shape)
                else:
                    original_mask = folder.mask(item.stem)
                    if original_mask is None:
                        original_mask = np.zeros(shape, dtype=bool)
                masks.append(np.asarray(geometry.mask_to_input(np.asarray(original_mask) > 0), dtype=bool))
                original_points = folder_points(item.stem) if folder_points is not None else None
                point_masks.append(None if not original_points else M.point_region(
                    geometry.points_to_input(original_points), (img_size, img_size), point_radius))
            xs = torch.stack([x for _, x, _ in decoded]).to(device)
            del decoded
            with torch.inference_mode():
                logits = model(xs)
                probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
            targets = [choose_target(settings.target, p, item.label_index) for p, (item, _) in zip(probs, batch)]
            preds = [int(np.argmax(p)) for p in probs]
            # deletion follows the paper: the predicted class's probability, under that class's map
            with torch.inference_mode():
                intact = M.target_probability(logits, torch.tensor(preds, device=logits.device)).double().cpu().numpy()

            # maps: one explain call per method over the images of the batch that still need it
            found: dict[tuple[int, str], tuple[np.ndarray, float]] = {}
            for method in methods:
                rows_of = [k for k, (_, pending) in enumerate(batch) if method in pending]
                if not rows_of:
                    continue
                if progress:
                    progress(finished, total, f"{method} maps of {len(rows_of)} image(s)")
                maps, seconds = _explain_batch(explain, model, xs, rows_of, method, [targets[k] for k in rows_of],
                                               per_image_method)
                for k, sal, sec in zip(rows_of, maps, seconds):
                    if sal.shape != masks[k].shape:
                        raise ValueError(f"{method}: map shape {sal.shape} differs from the model input {masks[k].shape}")
                    found[(k, method)] = (sal, sec)
            # deletion maps: the scored map where it explains the predicted class, else one more map
            deletion_maps: dict[tuple[int, str], np.ndarray] = {}
            if deletions:
                for method in methods:
                    rows_of = [k for k, (_, pending) in enumerate(batch) if method in pending]
                    other = [k for k in rows_of if preds[k] != targets[k]]
                    for k in rows_of:
                        if preds[k] == targets[k]:
                            deletion_maps[(k, method)] = found[(k, method)][0]
                    if not other:
                        continue
                    if progress:
                        progress(finished, total, f"{method} maps of the predicted class ({len(other)} image(s))")
                    maps, _ = _explain_batch(explain, model, xs, other, method, [preds[k] for k in other],
                                             per_image_method)
                    for k, sal in zip(other, maps):
                        deletion_maps[(k, method)] = sal

            order = [(k, m) for k, (_, pending) in enumerate(batch) for m in pending]  # image, then method
            rows = []
            for k, method in order:
                item = batch[k][0]
                sal, seconds = found[(k, method)]
                values, reasons = score_map(sal, masks[k], item.label_index, settings, patch, method, point_masks[k])
                pred = preds[k]
                known = not item.unlabeled and item.label_index < len(classes)
                rows.append({
                    "image": item.stem, "split": item.split,
                    "label": folder_classes[item.label_index] if item.label_index < len(folder_classes) else item.label_index,
                    "pred": classes[pred], "correct": (pred == item.label_index) if known else "",
                    "target": classes[targets[k]], "p_target": float(probs[k][targets[k]]),
                    "method": method, "seconds": round(seconds, 6), **values, "_reasons": reasons,
                })
            if "lesion_occlusion" in settings.metrics:
                _add_lesion_occlusion(rows, order, model, xs, masks, point_masks, targets, patch, settings)
            if deletions:
                image_rows = torch.tensor([k for k, _ in order], device=xs.device)
                deletion_sals = np.stack([deletion_maps[pair] for pair in order])
                deletion_targets = [preds[k] for k, _ in order]
            for choice in deletions:
                # every (image, method) pair of the batch in one call: step 0 is the probability
                # computed above, and inputs shared between maps are forwarded once (see deletion_curves)
                column, options = DELETION_VARIANTS[choice]
                if progress:
                    variant = "" if choice == "deletion" else f" ({choice.removeprefix('deletion_')})"
                    progress(finished, total, f"deletion curves{variant} of {len(order)} map(s)")
                baseline = settings.deletion_baseline if options["baseline"] is None else options["baseline"]
                curves = M.deletion_curves(
                    model, xs[image_rows], deletion_sals, deletion_targets, patch, settings.deletion_steps, baseline,
                    intact_probs=intact[[k for k, _ in order]], protocol=options["protocol"], scale=options["scale"],
                )
                for row, curve in zip(rows, curves):
                    value, reason = M.metric_or_reason(M.audc, curve)
                    row[column] = value
                    if reason:
                        row["_reasons"][column] = reason
                if choice != "deletion":
                    continue
                curve_rows = []
                for row, (k, method), curve in zip(rows, order, curves):
                    row["audc_correct"] = row["audc"] if row["correct"] is True else math.nan
                    if row["correct"] is not True:
                        row["_reasons"]["audc_correct"] = (
                            "misclassified image (faithfulness is scored on correctly classified images)"
                            if row["correct"] is False else "no class label: correctness unknown"
                        )
                    elif "audc" in row["_reasons"]:
                        row["_reasons"]["audc_correct"] = row["_reasons"]["audc"]
                    curve_rows.append({"image": batch[k][0].stem, "method": method,
                                       **{f"s{s}": float(v) for s, v in enumerate(curve)}})
                _append_rows(curves_path, curve_header, curve_rows)
            for row in rows:
                row["notes"] = _notes(row.pop("_reasons"))
            _append_rows(per_image_path, header, rows)
            del xs, logits, found, deletion_maps
            for k, method in order:
                done.add((batch[k][0].stem, method))
                finished += 1
                bar.update(1)
                if progress:
                    progress(finished, total, f"{batch[k][0].stem} · {method}")
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    if world == 1:
        return finalise(out_dir, settings, methods=methods, items={it.stem for it in items})
    try:
        _barrier()  # every shard is complete (a process that died has made torchrun stop the others)
        if rank == 0:
            _merge_shards(out_dir, header, curve_header, [it.stem for it in all_items], methods)
            result = finalise(out_dir, settings, methods=methods, items={it.stem for it in all_items})
        _barrier()  # the merged tables are written
        return result if rank == 0 else read_result(out_dir)
    finally:
        if started_group:
            import torch.distributed as dist

            dist.destroy_process_group()


SHARD_FOLDER = "shards"


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _row_files(out_dir: Path, kind: str) -> list[Path]:
    """The merged ``<kind>.csv`` and every shard's, those that exist (kind: per_image, deletion_curves)."""
    files = [out_dir / f"{kind}.csv"] + sorted((out_dir / SHARD_FOLDER).glob(f"rank*-of-*.{kind}.csv"))
    return [path for path in files if path.is_file()]


def _merge_shards(out_dir: Path, header: list[str], curve_header: list[str], stems: list[str],
                  methods: list[str]) -> None:
    """Rank 0, once every process is done: the merged ``per_image.csv`` and ``deletion_curves.csv``
    hold each image x method once (the last row written wins, as for a resumed run), in the order
    a one-process run writes them (images in split order, then methods); the shard files go."""
    merge_rows(out_dir, {kind: _row_files(out_dir, kind) for kind in ("per_image", "deletion_curves")},
               {"per_image": header, "deletion_curves": curve_header}, stems, methods)
    shutil.rmtree(out_dir / SHARD_FOLDER, ignore_errors=True)


def merge_rows(out_dir: Path, files_by_kind: dict[str, list[Path]], columns_by_kind: dict[str, list[str]] | None,
               stems: list[str], methods: list[str]) -> None:
    """Write ``out_dir/<kind>.csv`` (kind: per_image, deletion_curves) from the rows of ``files``:
    each image x method once (a later file's row wins), images in ``stems`` order, then methods in
    ``methods`` order, as one process writes them. ``columns_by_kind`` None: the first file's header."""
    image_order = {stem: k for k, stem in enumerate(stems)}
    method_order = {method: k for k, method in enumerate(methods)}
    for kind, files in files_by_kind.items():
        files = [path for path in files if path.is_file()]
        if not files:
            continue
        if columns_by_kind is None or kind not in columns_by_kind:
            with open(files[0], newline="") as handle:
                columns = next(csv.reader(handle))
        else:
            columns = columns_by_kind[kind]
        rows: dict[tuple[str, str], dict[str, str]] = {}
        for path in files:
            with open(path, newline="") as handle:
                for row in csv.DictReader(handle):
                    if None in row or None in row.values():
                        continue  # a torn last line of a process that was killed while writing
                    rows[(row["image"], row["method"])] = row
        ordered = sorted(rows.values(), key=lambda r: (image_order.get(r["image"], len(image_order)), r["image"],
                                                       method_order.get(r["method"], len(method_order)), r["method"]))
        target = out_dir / f"{kind}.csv"
        partial = target.with_suffix(".csv.partial")
        with open(partial, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(ordered)
        partial.replace(target)  # atomic: a reader never sees half a table


def read_result(out_dir: str | Path) -> EvaluationResult:
    """The :class:`EvaluationResult` an evaluation wrote to ``out_dir`` (its Parquet tables)."""
    out_dir = Path(out_dir)
    tables = {name: pd.read_parquet(out_dir / f"{name}.parquet") for name in ("per_image", "cohort", "paired")}
    curves_path = out_dir / "deletion_curves.csv"
    curves = restore_frame(pd.read_csv(curves_path, dtype={"image": str})) if curves_path.exists() else pd.DataFrame()
    files = {name: out_dir / f"{name}.csv" for name in ("per_image", "cohort", "paired", "lesion_occlusion")
             if name != "lesion_occlusion" or (out_dir / f"{name}.csv").is_file()}
    return EvaluationResult(out_dir, tables["per_image"], tables["cohort"], tables["paired"], curves, files,
                            _config_warnings(out_dir))


def _config_warnings(out_dir: Path) -> list[str]:
    """The ``warnings`` an evaluation recorded in ``out_dir/config.json`` (empty when none or no file)."""
    try:
        config = json.loads((Path(out_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return []
    found = config.get("warnings") if isinstance(config, dict) else None
    return [str(w) for w in found] if isinstance(found, list) else []


def finalise(
    out_dir: str | Path,
    settings: EvalSettings | None = None,
    methods: Sequence[str] | None = None,
    items: set[str] | None = None,
) -> EvaluationResult:
    """Write cohort / paired tables, Parquet copies and figures from the streamed CSVs."""
    settings = settings or EvalSettings()
    out_dir = Path(out_dir)
    per_image = restore_frame(pd.read_csv(out_dir / "per_image.csv", dtype={"image": str, "notes": str}))
    if items is not None:
        per_image = per_image[per_image["image"].isin(items)]
    if methods is not None:
        per_image = per_image[per_image["method"].isin(methods)]
    per_image = per_image.drop_duplicates(["image", "method"], keep="last").reset_index(drop=True)
    curves_path = out_dir / "deletion_curves.csv"
    curves = pd.DataFrame()
    if curves_path.exists():
        curves = restore_frame(pd.read_csv(curves_path, dtype={"image": str}))
        curves = curves.drop_duplicates(["image", "method"], keep="last")
        curves = curves.merge(per_image[["image", "method"]], on=["image", "method"]).reset_index(drop=True)
    cohort = summarise(per_image, resamples=settings.resamples, seed=settings.seed)
    paired = paired_tests(per_image)
    files = {"per_image": out_dir / "per_image.csv", "cohort": out_dir / "cohort.csv", "paired": out_dir / "paired.csv"}
    if set(LESION_COLUMNS) <= set(per_image.columns):
        from softcam_core.claims import lesion_reliance_claim

        verdict = lesion_reliance_claim(per_image, resamples=settings.resamples, seed=settings.seed)
        files["lesion_occlusion"] = out_dir / "lesion_occlusion.csv"
        neutralise_frame(verdict.table()).to_csv(files["lesion_occlusion"], index=False)
    neutralise_frame(cohort).to_csv(files["cohort"], index=False)
    neutralise_frame(paired).to_csv(files["paired"], index=False)
    for name, table in (("per_image", per_image), ("cohort", cohort), ("paired", paired)):
        path = out_dir / f"{name}.parquet"
        table.to_parquet(path, index=False)
        files[f"{name}_parquet"] = path
    if not curves.empty:
        files["deletion_curves"] = curves_path
    if settings.figures and not per_image.empty:
        for name, paths in write_figures(per_image, curves, out_dir / "figures", png=settings.png).items():
            for path in paths:
                files[f"figure_{name}{path.suffix}"] = path
    return EvaluationResult(out_dir, per_image, cohort, paired, curves, files, _config_warnings(out_dir))


def cohort_figures(per_image: pd.DataFrame, curves: pd.DataFrame, group: str | None = None, title: str = "") -> dict:
    """The standard figures of a cohort evaluation: top-k precision vs k, deletion, box plots."""
    from softcam_core import plots

    prefix = f"{title}: " if title else ""
    figures = {}
    if any(c.startswith("topk_precision_k") for c in per_image.columns):
        figures["topk_precision"] = plots.topk_precision_figure(per_image, group, f"{prefix}top-k localization precision")
    if curves is not None and not curves.empty:
        figures["deletion_curves"] = plots.deletion_figure(curves, group, f"{prefix}deletion curves (lower AUDC = more faithful)")
    box_metrics = [c for c in metric_columns(per_image) if not c.startswith("topk_precision_k") and c != "p_target"]
    if box_metrics:
        figures["metric_boxplots"] = plots.metric_boxplots(per_image, box_metrics, group, f"{prefix}per-image metrics")
    return figures


def write_figures(per_image: pd.DataFrame, curves: pd.DataFrame, out_dir: Path, png: bool = True) -> dict[str, list[Path]]:
    from softcam_core import plots

    return plots.save_figures(cohort_figures(per_image, curves), out_dir, png=png)


# ----------------------------------------------------------------------------------------------
# CLI


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="all explainability metrics for a cohort (per_image.csv, cohort.csv, paired.csv, figures)",
        description="Explain every image of a cohort with each method and score the maps against the "
        "annotations. Streams rows to DIR2/per_image.csv; --resume continues a stopped run.",
    )
    parser.add_argument("--model", required=True, help="checkpoint (.pt) written by `softcam train`")
    parser.add_argument("--data", help="cohort folder laid out like `softcam synth` output, a folder of images "
                        "with --labels, or an ImageFolder tree (or --cohort)")
    parser.add_argument("--labels", default=None,
                        help="label CSV of the --data folder, e.g. the OUT.splits.csv `softcam train` wrote "
                        "(image,label[,split]; Kaggle DR image,level; RSNA patientId,Target)")
    parser.add_argument("--cohort", help="database cohort (SOFTCAM_DB_URL), scored against the boxes drawn or "
                                         "imported into the database (instead of --data)")
    parser.add_argument("--box-label", help="with --cohort: only boxes with this label are ground truth")
    parser.add_argument("--annotator", help="with --cohort: only this annotator's shapes are ground truth (a user "
                        "name, e.g. the consensus of an adjudication); 'each': one evaluation per annotator in "
                        "OUT/annotator-<name>/ and OUT/annotator_spread.csv, the spread of every metric across "
                        "annotators (the ground truth's own uncertainty)")
    parser.add_argument("--methods", required=True, help="comma-separated method names, e.g. softcam,gradcam,cascam:gradcam")
    parser.add_argument("--out", required=True, help="output folder DIR2")
    parser.add_argument("--annotations", help="COCO JSON with boxes to use instead of the folder's masks/")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                        help=f"comma-separated subset of: {', '.join(METRIC_CHOICES)} (default: every paper "
                             f"metric, i.e. all but the named variants {', '.join(VARIANT_METRICS)})")
    parser.add_argument("--split", default="test", help="cohort split to evaluate: train, val, test or all (default test)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images of the split")
    parser.add_argument("--resume", action="store_true", help="keep rows already in DIR2/per_image.csv, compute the rest")
    parser.add_argument("--patch", type=int, help="grid-cell side in model-input pixels (default img_size // 16)")
    parser.add_argument("--topk", type=_int_list, default=DEFAULT_TOPK, help="k values for top-k precision (default 1,3,5,10,15,20)")
    parser.add_argument("--iou-fraction", type=float, default=0.10,
                        help="top fraction of all pixels for the IoU (default 0.10, CasCAM's top 10 %%)")
    parser.add_argument("--energy-fraction", type=float, default=0.15,
                        help="top fraction for the energy / count share (default 0.15, CasCAM's Top-15 %% Energy)")
    parser.add_argument("--top-fraction", type=float,
                        help="old spelling: sets both --iou-fraction and --energy-fraction")
    parser.add_argument("--steps", type=int, default=DEFAULT_DELETION_STEPS,
                        help=f"deletion steps: top cells removed one per step, at most the number of cells "
                             f"(default {DEFAULT_DELETION_STEPS}, the paper's top-30 patches)")
    parser.add_argument("--baseline", default="zero", help="deletion fill: zero, mean, blur or a number (default zero)")
    parser.add_argument("--occlusion-baseline", default="blur",
                        help="lesion_occlusion fill: zero, mean, blur or a number (default blur)")
    parser.add_argument("--point-radius", type=float, default=None,
                        help="tolerance radius of point annotations in model-input pixels (default: half a grid cell)")
    parser.add_argument("--target", choices=TARGET_POLICIES, default="disease", help="class explained (default disease)")
    parser.add_argument("--tolerance", type=float, default=0.0, help="pointing-game tolerance in pixels (default 0)")
    parser.add_argument("--bootstrap", type=int, default=BOOTSTRAP_RESAMPLES, help="bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=BOOTSTRAP_SEED, help="bootstrap seed (default 0)")
    parser.add_argument("--no-figures", action="store_true", help="skip the plotly figures")
    parser.add_argument("--batch-size", type=int,
                        help=f"images per batch (default {EVAL_BATCH_CUDA} on CUDA, {EVAL_BATCH_CPU} on CPU)")
    parser.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from softcam_core.models import load_checkpoint

    if (args.data is None) == (args.cohort is None):
        raise ValueError("give either --data DIR (a cohort folder) or --cohort NAME (a database cohort)")
    if args.cohort and args.annotations:
        raise ValueError("--annotations replaces a folder's masks; with --cohort the boxes come from the database")
    if args.box_label and not args.cohort:
        raise ValueError("--box-label selects database boxes: use it with --cohort")
    if args.data is not None and not Path(args.data).is_dir():
        raise ValueError(f"{args.data}: cohort folder not found")
    model, meta = load_checkpoint(args.model)
    from softcam_core.explain.cli import check_methods, parse_methods

    check_methods(model, parse_methods(args.methods))  # before a database cohort is opened or --out is made
    baseline, occlusion = (_fill(v) for v in (args.baseline, args.occlusion_baseline))
    settings = EvalSettings(
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
        patch=args.patch, topk=tuple(args.topk),
        iou_fraction=args.iou_fraction if args.top_fraction is None else args.top_fraction,
        energy_fraction=args.energy_fraction if args.top_fraction is None else args.top_fraction,
        deletion_steps=args.steps, deletion_baseline=baseline, occlusion_baseline=occlusion, target=args.target,
        pointing_tolerance=args.tolerance, point_radius=args.point_radius, split=args.split, limit=args.limit,
        resamples=args.bootstrap, seed=args.seed, figures=not args.no_figures, batch_size=args.batch_size,
    )
    if args.annotator and not args.cohort:
        raise ValueError("--annotator selects database shapes: use it with --cohort")
    if args.annotator == "each":
        lister = getattr(args, "database_annotators", None)  # set by db/cli.py
        annotators = lister(args.cohort) if lister else []
        if len(annotators) < 2:
            raise ValueError(f"cohort {args.cohort!r}: --annotator each needs shapes by at least two annotators "
                             f"(found {', '.join(annotators) or 'none'})")
        cohorts = {}
        for annotator in annotators:
            out = Path(args.out) / f"annotator-{_safe_name(annotator)}"
            print(f"-- ground truth: {annotator}")
            cohorts[annotator] = _run_cli_evaluation(args, model, meta, settings, annotator, out).cohort
        spread = annotator_spread(cohorts)
        path = Path(args.out) / "annotator_spread.csv"
        spread.to_csv(path, index=False)
        shown = spread[spread.metric.isin(["topk_precision_k5", "pointing_game", "activation_precision", "audc"])]
        if len(shown):
            print(shown[["method", "metric", "min", "max", "spread"]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"wrote {path} (one evaluation per annotator in {args.out}/annotator-<name>/)")
        return 0
    _run_cli_evaluation(args, model, meta, settings, args.annotator, Path(args.out))
    return 0


def _fill(text: str) -> Any:
    """A baseline argument: a number when it parses as one, else the name (zero, mean, blur)."""
    try:
        return float(text)
    except ValueError:
        return text


def _safe_name(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "annotator"


def _run_cli_evaluation(args: argparse.Namespace, model, meta: dict, settings: "EvalSettings",
                        annotator: str | None, out: Path) -> "EvaluationResult":
    """One ``softcam evaluate`` run (``annotator``: only that author's database shapes), printed."""
    if args.cohort:
        opener = getattr(args, "open_database_cohort", None)  # set by db/cli.py: softcam_core never imports db
        if opener is None:
            raise ValueError("--cohort needs the database package (db)")
        data, summary = opener(args.cohort, meta, settings, box_label=args.box_label, annotator=annotator)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"cohort {args.cohort}: {summary['images']} images, {summary['with_boxes']} with boxes, "
                  f"{summary.get('with_points', 0)} with points, {summary.get('with_regions', 0)} with polygons or "
                  f"masks, {summary['unlabeled_left_out']} unlabeled left out")
    elif args.labels:
        from softcam_core.data import CohortFolder

        data = CohortFolder(args.data, args.labels, classes=meta.get("classes"))
    else:
        data = Path(args.data)
    result = evaluate_cohort(
        model, meta, data, args.methods.split(","), None, out, resume=args.resume,
        annotations=args.annotations, settings=settings,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return result  # under torchrun rank 0 reports the merged run
    columns = [c for c in ("activation_precision_mean", "topk_precision_k5_mean", "audc_mean", "audc_correct_mean")
               if c in result.cohort]
    print(result.cohort[["method", "images", *columns]].to_string(index=False))
    if "lesion_occlusion" in result.files:
        lesion = restore_frame(pd.read_csv(result.files["lesion_occlusion"])).iloc[0]
        print(f"{lesion['claim']}: {lesion['verdict']} ({lesion['evidence']})")
    print(f"wrote {result.out_dir}/per_image.csv, cohort.csv, paired.csv"
          f"{', lesion_occlusion.csv' if 'lesion_occlusion' in result.files else ''} (+ .parquet, figures/)")
    return result


def annotator_spread(cohorts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """How much each method's cohort means move when the ground truth is another annotator's.

    ``cohorts``: ``{annotator: cohort table}`` (``cohort.csv`` of one evaluation per annotator, the
    same methods). Returns one row per method and metric: the mean under each annotator (one column
    per annotator), ``min``, ``max`` and ``spread = max - min`` (NaN means left out). A method
    difference smaller than the spread is within the disagreement of the readers themselves.
    """
    rows = []
    names = list(cohorts)
    first = cohorts[names[0]]
    metrics = [c[: -len("_mean")] for c in first.columns if c.endswith("_mean")]
    for method in first["method"]:
        for metric in metrics:
            values = {}
            for name in names:
                table = cohorts[name]
                match = table.loc[table["method"] == method, f"{metric}_mean"] if f"{metric}_mean" in table else []
                values[name] = float(match.iloc[0]) if len(match) else math.nan
            finite = [v for v in values.values() if not math.isnan(v)]
            rows.append({"method": method, "metric": metric, **values,
                         "min": min(finite) if finite else math.nan, "max": max(finite) if finite else math.nan,
                         "spread": max(finite) - min(finite) if finite else math.nan})
    return pd.DataFrame(rows)
