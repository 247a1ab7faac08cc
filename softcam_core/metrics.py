"""Explainability metrics: localization, activation mass, consistency, faithfulness (deletion).

Defaults follow the papers: the SoftCAM paper (Djoumessi & Berens, MIDL 2026, Appendix E) for
activation consistency, top-k localization precision, activation precision / sensitivity and
deletion (faithfulness), and the CasCAM evaluation (§4.5) for IoU, top-15 % energy and AP (CasCAM
states neither IoU's region nor AP's estimator: the top 10 % and the trapezoid come from the papers'
index and issue 16, and the step AP is reported beside it). Every departure from a paper is a *named* option or function (``denominator=
"positive"``, ``positive_only=True``, ``protocol="full"``, ``scale="logodds"``,
:func:`activation_consistency_mass`, ...); ``docs/metrics.md`` lists each one beside the paper
sentence it departs from, with every formula and edge-case rule.

Conventions shared by every function here:

* ``sal`` is a saliency / evidence map, float array (H, W) at the model-input resolution, higher =
  more evidence for the target class. Signed maps stay signed; a metric that needs non-negative
  values uses the positive part ``P = max(sal, 0)`` and says so.
* ``mask`` is the annotation, (H, W), bool (any non-zero value counts as annotated).
* Shapes that disagree raise :class:`ValueError`. A metric that is *undefined* for its input
  (empty mask, constant map, NaN / infinite values, no positive evidence ...) returns ``nan`` and
  emits a :class:`MetricUndefined` warning whose text is the reason; :func:`metric_or_reason`
  returns that reason instead, so tables can record why a cell is empty. An undefined value is
  never replaced by 0 or 1 and is never averaged in.
* Grid cells (``patch``): the map is cut into non-overlapping ``patch`` x ``patch`` cells from the
  top-left corner. When H or W is not a multiple of ``patch`` the last row / column of cells is
  narrower (it covers the remainder) and its mean is taken over the pixels it actually has; no
  padding value ever enters a mean. Ties in a ranking are broken by cell index (row-major), so
  results are deterministic.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "MetricUndefined",
    "metric_or_reason",
    "cell_grid",
    "topk_localization_precision",
    "activation_precision",
    "activation_sensitivity",
    "activation_consistency",
    "activation_consistency_by_class",
    "activation_consistency_mass",
    "pointing_game",
    "iou_top_fraction",
    "energy_top_fraction",
    "average_precision",
    "average_precision_cascam",
    "deletion_curve",
    "deletion_curves",
    "deletion_curve_reference",
    "audc",
    "target_probability",
    "target_log_odds",
    "TOPK_DENOMINATORS",
    "ENERGY_KINDS",
    "DELETION_PROTOCOLS",
    "DELETION_SCALES",
    "DEFAULT_DELETION_STEPS",
]

TOPK_DENOMINATORS = ("k", "positive")
# the top-30 patches of the paper's deletion experiments (SoftCAM App. I)
DEFAULT_DELETION_STEPS = 30
ENERGY_KINDS = ("energy", "count")
DELETION_PROTOCOLS = ("top", "full")
DELETION_SCALES = ("ratio", "logodds")


class MetricUndefined(UserWarning):
    """A metric is undefined for its input; the value returned is ``nan`` and the message says why."""


# When metric_or_reason() is active in this thread / context, reasons are collected here instead of
# being emitted as warnings (warnings.catch_warnings is process-global and not thread-safe, and the
# cohort page evaluates in a background thread).
_REASON_SINK: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("_REASON_SINK", default=None)


def _undefined(reason: str) -> float:
    sink = _REASON_SINK.get()
    if sink is not None:
        sink.append(reason)
    else:
        warnings.warn(reason, MetricUndefined, stacklevel=3)
    return math.nan


def metric_or_reason(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, str | None]:
    """Call a metric and return ``(value, reason)``; ``reason`` is None when the value is defined.

    Example: ``metric_or_reason(activation_precision, sal, mask)`` -> ``(nan, "empty annotation mask")``.
    Thread-safe; no warning is emitted for reasons it collects.
    """
    sink: list[str] = []
    token = _REASON_SINK.set(sink)
    try:
        value = fn(*args, **kwargs)
    finally:
        _REASON_SINK.reset(token)
    return value, ("; ".join(dict.fromkeys(sink)) if sink else None)


# ----------------------------------------------------------------------------------------------
# input checks


def _as_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) array, got shape {arr.shape}")
    return arr


def _pair(sal: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert ``(sal, mask)``; raises ValueError on a shape mismatch."""
    sal_arr = _as_array(sal, "saliency map").astype(np.float64, copy=False)
    mask_arr = _as_array(mask, "mask")
    if sal_arr.shape != mask_arr.shape:
        raise ValueError(f"saliency map shape {sal_arr.shape} does not match mask shape {mask_arr.shape}")
    return sal_arr, mask_arr.astype(bool, copy=False)


def _map_problem(sal: np.ndarray) -> str | None:
    if not np.all(np.isfinite(sal)):
        return "map contains NaN or infinite values"
    if sal.size == 0:
        return "map is empty"
    if sal.max() == sal.min():
        return "constant map: it ranks no pixel above another"
    return None


def _pair_problem(sal: np.ndarray, mask: np.ndarray) -> str | None:
    problem = _map_problem(sal)
    if problem:
        return problem
    if not mask.any():
        return "empty annotation mask"
    return None


# ----------------------------------------------------------------------------------------------
# grid cells


def cell_grid(shape: tuple[int, int], patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets of the non-overlapping ``patch`` x ``patch`` cells along rows and columns.

    Returns ``(row_starts (nr,), col_starts (nc,))`` with ``nr = ceil(H / patch)``; the last cell of
    a row / column is narrower when ``patch`` does not divide the size.
    """
    if int(patch) != patch or patch < 1:
        raise ValueError(f"patch must be a positive integer, got {patch!r}")
    height, width = shape
    return np.arange(0, height, int(patch)), np.arange(0, width, int(patch))


def _cell_reduce(values: np.ndarray, patch: int) -> np.ndarray:
    """Sum of ``values`` (H, W) over each grid cell -> (nr, nc)."""
    rows, cols = cell_grid(values.shape, patch)
    return np.add.reduceat(np.add.reduceat(values, rows, axis=0), cols, axis=1)


def _cell_means(sal: np.ndarray, patch: int) -> np.ndarray:
    """Mean of ``sal`` over each cell's own pixels -> (nr, nc)."""
    counts = _cell_reduce(np.ones(sal.shape, dtype=np.float64), patch)
    return _cell_reduce(sal, patch) / counts


def _cell_rank_map(sal: np.ndarray, patch: int) -> tuple[np.ndarray, int]:
    """Per-pixel rank (0 = highest mean) of the pixel's cell, and the number of cells.

    Cells are ranked by mean activation, descending; ties by cell index (row-major).
    """
    means = _cell_means(sal, patch)
    order = np.argsort(-means.ravel(), kind="stable")
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    rank_grid = rank.reshape(means.shape)
    rank_map = np.repeat(np.repeat(rank_grid, patch, axis=0), patch, axis=1)[: sal.shape[0], : sal.shape[1]]
    return rank_map, order.size


# ----------------------------------------------------------------------------------------------
# localization and activation-mass metrics


def topk_localization_precision(sal: Any, mask: Any, k: int, patch: int, denominator: str = "k") -> float:
    """Fraction of the top-k positive grid cells that touch the annotation (SoftCAM App. E.2).

    The map (H, W) is cut into ``patch`` x ``patch`` pixel cells (see module notes for sizes that
    ``patch`` does not divide). Cells are ranked by mean activation; only cells with a strictly
    positive mean are candidates ("the top-k positively activated regions"). The first
    ``m = min(k, #positive cells)`` candidates are chosen and ``hits`` = how many of them overlap
    the mask by at least one pixel.

    ``denominator="k"`` (default, the paper's Eq. 7): ``hits / k``. A map with fewer than k positive
    cells is penalised (the missing picks count as misses), and a map with no positive cell at all
    scores 0: it points at nothing, which is a miss, not an undefined value. ``k`` must not exceed
    the number of cells (no map could reach 1), else ValueError.
    ``denominator="positive"`` (named variant): ``hits / m``, the precision over the cells the map
    does mark positive; a map without a positive cell is then undefined.

    Args:
        sal: (H, W) map. mask: (H, W) bool annotation. k: >= 1 cells. patch: cell side in pixels.
        denominator: ``"k"`` or ``"positive"``.
    Returns:
        float in [0, 1]; nan (MetricUndefined) for an empty mask or a constant / non-finite map
        (and, with ``denominator="positive"``, a map without any positive cell).
    """
    sal, mask = _pair(sal, mask)
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if denominator not in TOPK_DENOMINATORS:
        raise ValueError(f"unknown top-k denominator {denominator!r}; use {' or '.join(map(repr, TOPK_DENOMINATORS))}")
    rows, cols = cell_grid(sal.shape, patch)
    if denominator == "k" and k > rows.size * cols.size:
        raise ValueError(
            f"k = {k} exceeds the {rows.size * cols.size} grid cells of a {sal.shape[0]}x{sal.shape[1]} map "
            f"with patch {patch}; use a smaller k or patch, or denominator='positive'"
        )
    problem = _pair_problem(sal, mask)
    if problem:
        return _undefined(problem)
    means = _cell_means(sal, patch).ravel()
    touches = (_cell_reduce(mask.astype(np.float64), patch) > 0).ravel()
    order = np.argsort(-means, kind="stable")
    positive = order[means[order] > 0]
    chosen = positive[: int(k)]
    if denominator == "positive":
        if positive.size == 0:
            return _undefined("no grid cell has a positive mean activation")
        return float(touches[chosen].mean())
    return float(touches[chosen].sum() / int(k))


def _mass_problem(sal: np.ndarray, mask: np.ndarray) -> str | None:
    """What makes a mass metric (activation precision / sensitivity) undefined: a non-finite or
    empty map, or an empty mask. A constant map or one without positive evidence has a value."""
    if not np.all(np.isfinite(sal)):
        return "map contains NaN or infinite values"
    if sal.size == 0:
        return "map is empty"
    if not mask.any():
        return "empty annotation mask"
    return None


def activation_precision(sal: Any, mask: Any) -> float:
    """Share of the positive evidence mass that lies inside the annotation (SoftCAM App. E.3, Eq. 8).

    ``sum(P * mask) / (sum(P) + eps)`` with ``P = max(sal, 0)`` (the positive part, clipped here).
    The paper's ``eps`` only prevents division by zero, so it is taken to 0: the ratio where the map
    has positive evidence, and 0 where it has none (none of its evidence is on the lesion). A
    constant positive map scores the annotated share of the image, i.e. chance.
    Returns float in [0, 1]; nan for an empty mask or a non-finite map.
    """
    sal, mask = _pair(sal, mask)
    problem = _mass_problem(sal, mask)
    if problem:
        return _undefined(problem)
    positive = np.clip(sal, 0.0, None)
    total = positive.sum()
    return float(positive[mask].sum() / total) if total > 0 else 0.0


SENSITIVITY_KINDS = ("weighted", "count")


def activation_sensitivity(sal: Any, mask: Any, kind: str = "weighted") -> float:
    """How completely the positive evidence covers the annotation (SoftCAM App. E.3, Eq. 9).

    ``kind="weighted"`` (default): ``sum(P / max(P) * mask) / sum(mask)`` with ``P = max(sal, 0)``,
    the paper's reading in which "the low activation contributes only minimally to the numerator":
    each annotated pixel counts with its evidence as a fraction of the map's peak, so the value is 1
    only when every annotated pixel carries the peak. ``kind="count"``: the share of annotated pixels
    with ``P > 0`` (the paper's other sentence, "the proportion of mask pixels that receive any
    positive activation"). A map without positive evidence scores 0; a constant positive map 1 (a
    recall: read it beside :func:`activation_precision`, which scores that map at chance).
    Returns float in [0, 1]; nan for an empty mask or a non-finite map.
    """
    if kind not in SENSITIVITY_KINDS:
        raise ValueError(f"kind must be one of {SENSITIVITY_KINDS}, got {kind!r}")
    sal, mask = _pair(sal, mask)
    problem = _mass_problem(sal, mask)
    if problem:
        return _undefined(problem)
    positive = np.clip(sal, 0.0, None)
    if kind == "count":
        return float((positive[mask] > 0).sum() / mask.sum())
    peak = positive.max()
    if peak <= 0:
        return 0.0
    return float((positive[mask] / peak).sum() / mask.sum())


def _consistency_scores(maps: Any, labels: Any, weighting: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-image consistency scores (N,) (nan where undefined), diseased flags (N,) and the reasons.

    ``weighting="pixels"``: share of the map's pixels with the sign the label calls for (A > 0 on a
    diseased image, A < 0 on a healthy one; zeros count as neither). ``"mass"``: share of the
    absolute evidence mass with that sign (an all-zero map is undefined).
    """
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().cpu().numpy()
    maps_arr = np.asarray(maps, dtype=np.float64)
    labels_arr = np.asarray(labels)
    if maps_arr.ndim == 2:
        maps_arr = maps_arr[None]
        labels_arr = labels_arr.reshape(1)
    if maps_arr.ndim != 3:
        raise ValueError(f"maps must be (N, H, W) or (H, W), got shape {maps_arr.shape}")
    if labels_arr.shape != (maps_arr.shape[0],):
        raise ValueError(f"labels shape {labels_arr.shape} does not match {maps_arr.shape[0]} maps")
    diseased = labels_arr != 0
    scores = np.full(maps_arr.shape[0], np.nan)
    problems: list[str] = []
    for i, (m, sick) in enumerate(zip(maps_arr, diseased)):
        if m.size == 0:
            problems.append("map is empty")
            continue
        if not np.all(np.isfinite(m)):
            problems.append("map contains NaN or infinite values")
            continue
        if weighting == "pixels":
            scores[i] = np.count_nonzero(m > 0 if sick else m < 0) / m.size
            continue
        pos = np.clip(m, 0.0, None).sum()
        neg = np.clip(-m, 0.0, None).sum()
        if pos + neg == 0:
            problems.append("map is all zeros")
            continue
        scores[i] = (pos if sick else neg) / (pos + neg)
    return scores, diseased, problems


def _mean_or_undefined(scores: np.ndarray, problems: list[str], empty: str) -> float:
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        return _undefined("; ".join(dict.fromkeys(problems)) or empty)
    return float(finite.mean())


def activation_consistency(maps: Any, labels: Any) -> float:
    """Pooled activation consistency (SoftCAM App. E.1): the per-image pixel share, averaged over images.

    For each map ``m`` (H, W), the evidence for the *disease* class: a diseased image (label != 0)
    scores the proportion of its pixels with ``m > 0``, a healthy image (label == 0) the proportion
    with ``m < 0``; pixels equal to 0 count as neither. An all-zero map therefore scores 0 and is
    kept (it shows no evidence either way); a map with NaN / inf values is left out. The paper
    reports the two class-wise figures (:func:`activation_consistency_by_class`); this pooled mean
    over all images is the secondary figure, and for one map it is that image's score (what
    ``softcam evaluate`` stores per image). A map that is non-negative by construction (Grad-CAM
    after its ReLU) cannot score above 0 on a healthy image: the figure does not apply to it.

    Args:
        maps: (N, H, W) maps, or one (H, W) map. labels: (N,) ints/bools, or a scalar for one map.
    Returns:
        float in [0, 1] (units: fraction of pixels, averaged per image); nan when no map is finite.
    """
    scores, _, problems = _consistency_scores(maps, labels, "pixels")
    return _mean_or_undefined(scores, problems, "no maps")


def activation_consistency_by_class(maps: Any, labels: Any) -> dict[str, float]:
    """Class-wise activation consistency (SoftCAM App. E.1, Eqs. 5-6) and the pooled figure.

    Same per-image score as :func:`activation_consistency`. Returns ``{"diseased": mean over
    diseased images (share of pixels with A > 0), "healthy": mean over healthy images (share with
    A < 0), "pooled": mean over all images}``; a class without a usable image gives nan with a
    MetricUndefined reason ("no diseased image" / "no healthy image").
    """
    scores, diseased, problems = _consistency_scores(maps, labels, "pixels")
    return {
        "diseased": _mean_or_undefined(
            scores[diseased], [], "no diseased image" + (" with a finite map" if diseased.any() else "")
        ),
        "healthy": _mean_or_undefined(
            scores[~diseased], [], "no healthy image" + (" with a finite map" if (~diseased).any() else "")
        ),
        "pooled": _mean_or_undefined(scores, problems, "no maps"),
    }


def activation_consistency_mass(maps: Any, labels: Any) -> float:
    """Named variant of :func:`activation_consistency`: the share of evidence *mass* with the right sign.

    For each map with ``pos = sum(max(m, 0))`` and ``neg = sum(max(-m, 0))``: a diseased image
    scores ``pos / (pos + neg)``, a healthy image ``neg / (pos + neg)``; the result is the mean over
    images whose map is not all zeros (an all-zero map is left out, not scored 0).
    Returns float in [0, 1]; nan when no map is usable (all zeros, or non-finite values).
    """
    scores, _, problems = _consistency_scores(maps, labels, "mass")
    return _mean_or_undefined(scores, problems, "no maps")


def point_region(points_xy: Any, shape: tuple[int, int], radius_px: float) -> np.ndarray:
    """Ground truth of point annotations on a (H, W) map: the pixels within ``radius_px`` of a point.

    Points are ``(x, y)`` in the map's continuous pixel-edge coordinates (pixel ``(i, j)`` covers
    ``[j, j+1) x [i, i+1)``, its centre is ``(j + 0.5, i + 0.5)``). A pixel belongs to the region
    when its centre lies within ``radius_px`` (Euclidean) of a point, and the pixel holding a point
    always does, so ``radius_px = 0`` marks exactly the pixels the points fall in. Points outside the
    map (cropped away by preprocessing) mark nothing. The region then takes the place of the
    annotation mask in the metrics that ask *where* the evidence is (top-k localisation precision:
    a cell is a hit when it touches the region; pointing game: the peak hits when it lies in it);
    a point has no area, so area metrics are not computed from it (docs/metrics.md, "Points").

    Returns (H, W) bool.
    """
    height, width = int(shape[0]), int(shape[1])
    if radius_px < 0 or not math.isfinite(radius_px):
        raise ValueError(f"radius_px must be a finite number >= 0, got {radius_px!r}")
    region = np.zeros((height, width), dtype=bool)
    points = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    reach = int(math.ceil(radius_px)) + 1
    for x, y in points:
        if not (0 <= x < width and 0 <= y < height):
            continue
        col, row = int(math.floor(x)), int(math.floor(y))
        region[row, col] = True
        r0, r1 = max(0, row - reach), min(height, row + reach + 1)
        c0, c1 = max(0, col - reach), min(width, col + reach + 1)
        rows, cols = np.mgrid[r0:r1, c0:c1]
        region[r0:r1, c0:c1] |= (cols + 0.5 - x) ** 2 + (rows + 0.5 - y) ** 2 <= radius_px ** 2
    return region


def pointing_game(sal: Any, mask: Any, tolerance_px: float = 0) -> float:
    """Whether the map's maximum falls on the annotation (Zhang et al. 2016).

    A maximal pixel hits when its Euclidean distance to the nearest annotated pixel is at most
    ``tolerance_px`` (0: it must be annotated itself). When the maximum is attained at several
    pixels the result is the fraction of them that hit, so it is exactly 1.0 or 0.0 for a unique
    maximum and no tie is resolved by scan order.
    Returns float in [0, 1]; nan for an empty mask or a constant / non-finite map.
    """
    sal, mask = _pair(sal, mask)
    if tolerance_px < 0:
        raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px!r}")
    problem = _pair_problem(sal, mask)
    if problem:
        return _undefined(problem)
    if tolerance_px > 0:
        from scipy.ndimage import distance_transform_edt

        target = distance_transform_edt(~mask) <= tolerance_px
    else:
        target = mask
    peaks = sal == sal.max()
    return float(target[peaks].mean())


def _top_region(sal: np.ndarray, frac: float, positive_only: bool = False) -> np.ndarray | None:
    """The map's top-``frac`` region: pixels at or above the ``ceil(frac * H * W)``-th highest value.

    Pixels tied with that value are all admitted (no tie is resolved by scan order), so the region
    can hold more than ``ceil(frac * H * W)`` pixels when the threshold value is shared.
    ``positive_only``: keep only pixels > 0 (a sparse map is not padded with zero-evidence pixels).
    Returns a (H, W) bool array, or None when ``positive_only`` leaves no pixel.
    """
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac!r}")
    count = max(1, math.ceil(frac * sal.size - 1e-9))
    threshold = np.partition(sal.ravel(), sal.size - count)[sal.size - count]
    region = sal >= threshold
    if positive_only:
        region &= sal > 0
    return region if region.any() else None


def iou_top_fraction(sal: Any, mask: Any, frac: float = 0.10, positive_only: bool = False) -> float:
    """Intersection over union of the map's top-``frac`` region with the annotation (CasCAM: top 10 %).

    The region ``T`` is the ``ceil(frac * H * W)`` highest-valued pixels of the whole map (values
    taken as they are: only their order matters), pixels tied at the threshold all in;
    ``IoU = |T & mask| / |T | mask|``. Named variant ``positive_only=True``: ``T`` keeps only its
    positive pixels, so a map with fewer positive pixels than the fraction asks for is not padded
    with zero-evidence ones (and a map without a positive pixel is undefined).
    Returns float in [0, 1]; nan for an empty mask or a constant / non-finite map.
    """
    sal, mask = _pair(sal, mask)
    problem = _pair_problem(sal, mask)
    if problem:
        return _undefined(problem)
    region = _top_region(sal, frac, positive_only)
    if region is None:
        return _undefined("map has no positive activation")
    return float((region & mask).sum() / (region | mask).sum())


def energy_top_fraction(
    sal: Any, mask: Any, frac: float = 0.15, kind: str = "energy", positive_only: bool = False
) -> float:
    """Share of the map's top-``frac`` region that lies on the annotation (CasCAM's Top-15 % Energy).

    ``T`` is the region of :func:`iou_top_fraction` (top ``ceil(frac * H * W)`` pixels, ties in).
    ``kind="energy"`` (default): ``sum(P * T * mask) / sum(P * T)`` with ``P = max(sal, 0)``, the
    share of the region's positive energy that is annotated (nan when ``T`` holds no positive
    energy). ``kind="count"``: ``|T & mask| / |T|``, the share of the region's pixels that are
    annotated. ``positive_only`` as in :func:`iou_top_fraction` (it does not change the energy,
    which zero / negative pixels do not carry, only the count).
    Returns float in [0, 1]; nan for an empty mask or a constant / non-finite map.
    """
    sal, mask = _pair(sal, mask)
    if kind not in ENERGY_KINDS:
        raise ValueError(f"unknown energy kind {kind!r}; use {' or '.join(map(repr, ENERGY_KINDS))}")
    problem = _pair_problem(sal, mask)
    if problem:
        return _undefined(problem)
    region = _top_region(sal, frac, positive_only)
    if region is None:
        return _undefined("map has no positive activation")
    if kind == "count":
        return float((region & mask).sum() / region.sum())
    energy = np.where(region, np.clip(sal, 0.0, None), 0.0)
    total = energy.sum()
    if total <= 0:
        return _undefined("map has no positive activation in its top region")
    return float(energy[mask].sum() / total)


def _pr_points(sal: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) after each distinct map value taken as threshold, highest first.

    A threshold admits a whole group of tied pixels at once. Shapes (n_distinct,).
    """
    scores = sal.ravel()
    truth = mask.ravel()
    order = np.argsort(-scores, kind="stable")
    scores, truth = scores[order], truth[order]
    # last index of each run of equal scores: a threshold admits a whole tie group at once
    ends = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    true_pos = np.cumsum(truth)[ends]
    return true_pos / (ends + 1), true_pos / truth.sum()


def average_precision(sal: Any, mask: Any) -> float:
    """Pixel-level average precision of the map as a score for "pixel is annotated" (step AP).

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct map values taken as thresholds, highest
    first (scikit-learn's ``average_precision_score`` definition: no interpolation, tied pixels
    enter together). Signed values are used as they are (only the order matters). CasCAM's
    estimator (trapezoid area) is :func:`average_precision_cascam`.
    Returns float in (0, 1]; nan for an empty or all-covering mask or a constant / non-finite map.
    """
    sal, mask = _pair(sal, mask)
    problem = _ap_problem(sal, mask)
    if problem:
        return _undefined(problem)
    precision, recall = _pr_points(sal, mask)
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def average_precision_cascam(sal: Any, mask: Any) -> float:
    """CasCAM's pixel AP: trapezoid area under the precision-recall curve of the min-max normalised map.

    The map is scaled to [0, 1] (``(sal - min) / (max - min)``; it changes no ranking, so the value
    is that of the raw map up to float ties). Every distinct value is a threshold (highest first,
    tied pixels enter together) giving a point (recall, precision); the curve starts at the point
    (recall 0, precision 1) and ends at the lowest threshold (recall 1, precision = annotated share
    of the image); the area is the trapezoid rule over recall between consecutive points (what
    ``sklearn.metrics.auc(recall, precision)`` gives on ``precision_recall_curve``). Unlike the step
    AP of :func:`average_precision` it interpolates linearly between points (the first segment
    from precision 1 at recall 0), so the two differ wherever precision changes between points.
    Returns float in (0, 1]; nan in the same cases as :func:`average_precision`.
    """
    sal, mask = _pair(sal, mask)
    problem = _ap_problem(sal, mask)
    if problem:
        return _undefined(problem)
    scaled = (sal - sal.min()) / (sal.max() - sal.min())
    precision, recall = _pr_points(scaled, mask)
    precision = np.r_[1.0, precision]
    recall = np.r_[0.0, recall]
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2.0))


def _ap_problem(sal: np.ndarray, mask: np.ndarray) -> str | None:
    problem = _pair_problem(sal, mask)
    if problem:
        return problem
    if mask.all():
        return "annotation covers the whole image: every ranking scores 1"
    return None


# ----------------------------------------------------------------------------------------------
# faithfulness: deletion curves


def target_probability(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Probability of each row's target class: softmax over C >= 2 logits, sigmoid for C == 1.

    Args: logits (B, C); targets (B,) int64. Returns (B,) float.
    """
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    return torch.softmax(logits.float(), dim=1).gather(1, targets.view(-1, 1)).squeeze(1)


def _log_odds_table(logits: torch.Tensor) -> torch.Tensor:
    """(B, C) log-odds of every class, float64: ``log(p_c / (1 - p_c))`` computed from the logits
    as ``z_c - logsumexp_{j != c} z_j`` (exact where p_c rounds to 1); the logit itself for C == 1."""
    z = logits.double()
    if z.shape[1] == 1:
        return z[:, :1]
    classes = z.shape[1]
    eye = torch.eye(classes, dtype=torch.bool, device=z.device)
    others = z.unsqueeze(1).expand(-1, classes, -1).masked_fill(eye, float("-inf"))
    return z - torch.logsumexp(others, dim=2)


def target_log_odds(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-odds ``log(p / (1 - p))`` of each row's target class, from the logits (see
    :func:`target_probability` for p). Args: logits (B, C); targets (B,) int64. Returns (B,) float64."""
    table = _log_odds_table(logits)
    if table.shape[1] == 1:
        return table[:, 0]
    return table.gather(1, targets.view(-1, 1)).squeeze(1)


BASELINE_NAMES = ("zero", "mean", "blur")  # the named fills of _resolve_baseline (besides a number or a tensor)


def _resolve_baseline(image: torch.Tensor, baseline: str | float | torch.Tensor, patch: int) -> torch.Tensor:
    """What an occluded pixel becomes, (3, H, W) in the model's (normalised) input space.

    ``"zero"``: 0 (the dataset mean colour after normalisation); ``"mean"``: the image's per-channel
    mean; ``"blur"``: the image blurred with a Gaussian of sigma = patch / 2 pixels; a number: that
    constant; a tensor broadcastable to (3, H, W): itself.
    """
    if isinstance(baseline, torch.Tensor):
        return baseline.to(image.device, image.dtype).expand_as(image)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(image, float(baseline))
    if baseline == "zero":
        return torch.zeros_like(image)
    if baseline == "mean":
        return image.mean(dim=(1, 2), keepdim=True).expand_as(image)
    if baseline == "blur":
        from torchvision.transforms.functional import gaussian_blur

        sigma = max(1.0, patch / 2.0)
        kernel = 2 * math.ceil(3 * sigma) + 1
        limit = 2 * min(image.shape[-2:]) - 1  # reflect padding must stay inside the image
        kernel = min(kernel, limit if limit % 2 else limit - 1)
        return gaussian_blur(image.unsqueeze(0), [kernel, kernel], [sigma, sigma])[0]
    raise ValueError(f"unknown deletion baseline {baseline!r}; use {', '.join(BASELINE_NAMES)}, a number or a tensor")


def _deletion_counts(n_cells: int, steps: int, protocol: str = "top") -> np.ndarray:
    """Cells occluded at steps 0..steps -> (steps + 1,) int.

    ``"top"`` (the paper's protocol): ``s`` cells at step ``s``, one cell more per step; ``steps``
    must not exceed ``n_cells`` (at ``steps == n_cells`` the last step occludes every cell).
    ``"full"`` (named variant): ``floor(s * n_cells / steps)``, so the last step always occludes
    the whole image.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if protocol not in DELETION_PROTOCOLS:
        raise ValueError(f"unknown deletion protocol {protocol!r}; use {' or '.join(map(repr, DELETION_PROTOCOLS))}")
    if protocol == "full":
        return (np.arange(steps + 1) * n_cells) // steps
    if steps > n_cells:
        raise ValueError(
            f"steps = {steps} exceeds the {n_cells} grid cells: the 'top' deletion protocol occludes one cell "
            "per step; use steps <= the number of cells, a smaller patch, or protocol='full'"
        )
    return np.arange(steps + 1)


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class _EvalMode:
    """Put a model in eval mode for a block and restore its previous mode after."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.was_training = model.training

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def _prepare_deletion(
    images: torch.Tensor, sals: Any, targets: Any, patch: int, steps: int, baseline: Any, protocol: str, scale: str
) -> tuple[torch.Tensor, list[np.ndarray | None], list[str | None], torch.Tensor, torch.Tensor, np.ndarray]:
    if images.ndim != 4:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    sal_arr = sals.detach().cpu().numpy() if isinstance(sals, torch.Tensor) else np.asarray(sals)
    if sal_arr.ndim != 3 or sal_arr.shape[0] != images.shape[0] or sal_arr.shape[1:] != images.shape[2:]:
        raise ValueError(
            f"saliency maps shape {sal_arr.shape} does not match images {tuple(images.shape)}: need (N, H, W)"
        )
    target_t = torch.as_tensor(np.asarray(targets, dtype=np.int64).reshape(-1))
    if target_t.numel() != images.shape[0]:
        raise ValueError(f"{target_t.numel()} targets for {images.shape[0]} images")
    if scale not in DELETION_SCALES:
        raise ValueError(f"unknown deletion scale {scale!r}; use {' or '.join(map(repr, DELETION_SCALES))}")
    rows, cols = cell_grid(images.shape[2:], patch)
    counts = _deletion_counts(rows.size * cols.size, steps, protocol)
    rank_maps: list[np.ndarray | None] = []
    problems: list[str | None] = []
    for sal in sal_arr.astype(np.float64):
        problem = _map_problem(sal)
        problems.append(problem)
        if problem:
            rank_maps.append(None)
            continue
        rank_map, _ = _cell_rank_map(sal, patch)
        rank_maps.append(rank_map)
    baselines = torch.stack([_resolve_baseline(img, baseline, patch) for img in images])
    return baselines, rank_maps, problems, target_t, torch.as_tensor(counts), counts


def _curves_from_probs(probs: np.ndarray, problems: list[str | None], scale: str = "ratio") -> np.ndarray:
    """Curves from the target scores (N, steps + 1): ``p_s / p_0`` (``"ratio"``) or
    ``lo_s - lo_0`` for log-odds ``lo`` (``"logodds"``); rows of nan with a reason where undefined."""
    curves = np.full(probs.shape, np.nan)
    for i, problem in enumerate(problems):
        if problem:
            _undefined(problem)
            continue
        if scale == "logodds":
            if not np.all(np.isfinite(probs[i])):
                _undefined("target log-odds are not finite")
                continue
            curves[i] = probs[i] - probs[i, 0]
            continue
        if probs[i, 0] <= 0:
            _undefined("target probability of the intact image is 0")
            continue
        curves[i] = probs[i] / probs[i, 0]
    return curves


# Occluded inputs per CPU forward pass: 16 (fewer for inputs larger than 224 x 224, so a pass
# holds at most 16 x 224^2 input pixels). Measured for ResNet-18 at 224 px, channels-last, on the
# 2-core development machine (docs/performance.md, finding 4): CPU-time speed-up 1.57-1.78 at
# batch 16, 1.47-1.69 at 8, 1.51 at 32 (same runs, load 4-7); larger batches only grow the
# activations (at 64 px, 64 per pass reached the higher of two peak-RSS levels of benchmark 6,
# ~1 385 vs ~1 270 MiB, in 3 of 4 runs; 16 in 1 of 2).
CPU_DELETION_PIXELS = 16 * 224 * 224
CPU_DELETION_MAX_BATCH = 16


def _default_batch(device: torch.device, input_shape: tuple[int, ...], jobs: int) -> int:
    """Occluded inputs per forward pass when the caller gives none.

    CUDA: every job at once, capped so that the inputs times a generous activation factor (64 x
    the input size, enough for ResNet/VGG-sized nets) use at most half the free memory; an
    out-of-memory error still halves the batch. CPU: :data:`CPU_DELETION_PIXELS` input pixels
    (16 inputs at 224 px), at most :data:`CPU_DELETION_MAX_BATCH`.
    """
    if device.type != "cuda":
        per_input = int(np.prod(input_shape[-2:]))
        return max(1, min(jobs, CPU_DELETION_MAX_BATCH, CPU_DELETION_PIXELS // per_input))
    free, _ = torch.cuda.mem_get_info(device)
    per_input = 4 * int(np.prod(input_shape)) * 64
    return max(1, min(jobs, int(free * 0.5) // per_input))


def _identical_groups(tensors: torch.Tensor) -> list[int]:
    """Group index per row of ``tensors`` (N, ...): rows share an index only when all their
    elements are equal (``torch.equal``), so sharing a result between them is exact.

    A few sampled elements (copied, no arithmetic, so equal rows always agree) pick the
    candidates; each candidate is confirmed element by element.
    """
    n = tensors.shape[0]
    flat = tensors.reshape(n, -1)
    picks = torch.linspace(0, flat.shape[1] - 1, steps=min(32, flat.shape[1]), device=flat.device).long()
    prints = flat[:, picks].cpu().numpy()
    groups: list[int] = []
    representatives: dict[bytes, list[tuple[int, int]]] = {}  # fingerprint -> [(row, group)]
    n_groups = 0
    for row in range(n):
        candidates = representatives.setdefault(prints[row].tobytes(), [])
        for rep, group in candidates:
            if torch.equal(flat[rep], flat[row]):
                groups.append(group)
                break
        else:
            candidates.append((row, n_groups))
            groups.append(n_groups)
            n_groups += 1
    return groups


def _class_scores(logits: torch.Tensor, scale: str = "ratio") -> torch.Tensor:
    """(B, C) per-class scores a deletion curve tracks. ``"ratio"``: probabilities exactly as
    :func:`target_probability` computes them per row (softmax in float32; sigmoid of the single
    logit for C == 1, in column 0). ``"logodds"``: :func:`target_log_odds` for every class."""
    if scale == "logodds":
        return _log_odds_table(logits)
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, :1])
    return torch.softmax(logits.float(), dim=1)


def deletion_curves(
    model: nn.Module,
    images: torch.Tensor,
    sals: Any,
    targets: Sequence[int] | np.ndarray | torch.Tensor,
    patch: int,
    steps: int = DEFAULT_DELETION_STEPS,
    baseline: str | float | torch.Tensor = "zero",
    batch_size: int | None = None,
    intact_probs: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    protocol: str = "top",
    scale: str = "ratio",
) -> np.ndarray:
    """Deletion curves of several maps, each distinct occluded input forwarded once, in batches.

    The paper's protocol (SoftCAM App. E.4, ``protocol="top"``): cells of ``patch`` x ``patch``
    pixels are ranked by mean saliency (highest first, ties by cell index) and at step ``s``
    (0..steps) the top ``s`` cells are replaced by the baseline, one cell more per step; ``steps``
    must not exceed the number of cells, and the image is blanked only at ``steps == N_cells``.
    Named variant ``protocol="full"``: the first ``floor(s * N_cells / steps)`` cells, so the last
    step blanks the whole image whatever ``steps`` is. The curve (``scale="ratio"``) is the target
    class's probability relative to the intact image, ``p_s / p_0`` (``1 - curve`` is the paper's
    "relative drop in the model's confidence"); a faithful map makes it fall fast. Named variant
    ``scale="logodds"``: ``logit(p_s) - logit(p_0)`` with ``logit(p) = log(p / (1 - p))`` computed
    from the logits (:func:`target_log_odds`): 0 at step 0, negative when the confidence falls
    (lower = more faithful, like the ratio), not squashed where p is near 0 or 1.
    Row ``n`` of ``images`` / ``sals`` / ``targets`` is one (image, map) pair: several maps of one
    image (several methods) are passed as repeated image rows.

    Equal to :func:`deletion_curve_reference` (one forward of one occluded image per step) up to
    float rounding (tests and benchmark: 1e-5); faster because it does less arithmetic, never an
    approximation. Rounding: batched, channels-last and folded convolutions sum in another order,
    so probabilities differ relatively by ~1e-7..1e-5 (deeper nets, larger activations); curves
    near 1 agree to ~1e-7, but ``p_s / p_0`` for a target the model rules out (``p_0`` ~ 1e-9)
    carries that relative difference onto values of 100+ (seen: ResNet-50 with random BatchNorm
    statistics, curve values up to 186, 8e-6 apart unfolded, 2.9e-3 apart folded). The tricks:

    * **One forward per distinct occluded input.** Every (map, step) pair is keyed by what its
      input *is*: the intact image (step 0), the baseline (last step: every cell occluded), or
      (image, baseline, set of occluded cells). Pairs with equal keys have element-for-element
      equal inputs (images and baselines are grouped by ``torch.equal``, occluded-cell sets
      compared as bit masks), so the model's output for one is the output for all; only the
      target-class pick differs per pair. This covers step 0 shared by all maps of one image,
      the fully occluded step shared by every map of every image when the baseline is constant
      (``"zero"``, a number, a tensor), steps whose occluded-cell count does not change (fewer
      cells than steps, ``protocol="full"``), and maps of different methods that occlude the same
      cells at a step.
    * **Known step 0.** ``intact_probs`` (what an evaluation computed anyway to pick the target)
      is ``p_0`` itself: the intact images are then not forwarded at all (ratio scale only: a
      probability that rounds to 1 has no usable log-odds, so ``"logodds"`` forwards step 0).
    * **Batching**: distinct inputs go through the model ``batch_size`` at a time.
    * **Channels-last on CPU**: the conv weights and each input batch are held channels-last,
      which oneDNN runs 1.2-1.3x faster for ResNets; same sums in another order (~1e-6
      relative). Not on CUDA, where fp32 channels-last was slower.
    * **BatchNorm folded into the convolutions on CPU**: eval-mode ``bn(conv(x))`` is one affine
      map per channel, so it runs as one convolution with ``w * g / sqrt(v + eps)`` and bias
      ``(b - m) * g / sqrt(v + eps) + beta`` (~1.2x more on ResNet-18). Both through
      :func:`softcam_core.explain.guard.inference_weights`, the one implementation explain uses
      too: under the model's lock, the model's own tensors and modules put back on exit; pairs
      with hooks are left alone.
    * ``torch.inference_mode`` (no autograd bookkeeping) and the occluded inputs of a batch built
      in one vectorised ``where`` (no per-step Python work beyond the keys).

    Args:
        model: classifier returning logits (B, C); run on its own device, in eval mode, under
            ``torch.inference_mode`` (its train/eval mode is restored afterwards).
        images: (N, 3, H, W) preprocessed model inputs. sals: (N, H, W) maps at input resolution.
        targets: (N,) class indices (an evaluation passes the predicted class, as the paper does).
        patch: cell side in pixels. steps: deletion steps (``"top"``: cells removed, <= N_cells).
        baseline: ``"zero"``, ``"mean"``, ``"blur"``, a number or a tensor (see ``_resolve_baseline``).
        batch_size: distinct occluded inputs per forward pass; None = as many as half the free
            GPU memory allows (halved again on out-of-memory), 16 at 224 px on a CPU.
        intact_probs: optional (N,) target-class probability of each intact image (softmax of
            the logits; sigmoid for one logit), e.g. from the forward pass that chose the target.
            It becomes ``p_0`` and step 0 is not recomputed; pass only values of this model on
            these images (they set every point of the curve). Ignored with ``scale="logodds"``.
        protocol: ``"top"`` (default) or ``"full"``. scale: ``"ratio"`` (default) or ``"logodds"``.
    Returns:
        (N, steps + 1) float64; rows of nan (with a MetricUndefined reason) for constant or
        non-finite maps or a zero intact probability.
    Raises:
        ValueError: shapes, an unknown protocol / scale, ``steps`` > cells with ``"top"``.
    """
    device = _model_device(model)
    images = images.to(device)
    baselines, rank_maps, problems, target_t, counts_t, counts = _prepare_deletion(
        images, sals, targets, patch, steps, baseline, protocol, scale
    )
    n_images, n_steps = images.shape[0], steps + 1
    probs = np.full((n_images, n_steps), np.nan)
    known = None
    if intact_probs is not None and scale == "ratio":
        known = np.asarray(
            intact_probs.detach().cpu().numpy() if isinstance(intact_probs, torch.Tensor) else intact_probs,
            dtype=np.float64,
        ).reshape(-1)
        if known.size != n_images:
            raise ValueError(f"{known.size} intact probabilities for {n_images} images")
    valid = [i for i in range(n_images) if rank_maps[i] is not None]
    if not valid:
        return _curves_from_probs(probs, problems, scale)

    # key every (map, step) by the input it feeds the model; one forward per distinct key
    image_group = _identical_groups(images)
    baseline_group = _identical_groups(baselines)
    rows, cols = cell_grid(images.shape[2:], patch)
    n_cells = rows.size * cols.size
    targets_np = target_t.numpy()
    keys: dict[tuple, int] = {}
    representatives: list[tuple[int, int]] = []  # (map, step) that builds each distinct input
    uses: list[tuple[int, int, int]] = []  # (map, step, distinct input)
    for i in valid:
        cell_rank = rank_maps[i][np.ix_(rows, cols)].ravel()  # rank of each cell, row-major
        occluded_sets = np.packbits(cell_rank[None, :] < counts[:, None], axis=1)
        for s, count in enumerate(counts):
            if count == 0:
                if known is not None:  # nothing occluded (step 0, and more steps when cells < steps)
                    probs[i, s] = known[i]
                    continue
                key: tuple = ("intact", image_group[i])
            elif count >= n_cells:
                key = ("baseline", baseline_group[i])
            else:
                key = ("occluded", image_group[i], baseline_group[i], occluded_sets[s].tobytes())
            u = keys.setdefault(key, len(keys))
            if u == len(representatives):
                representatives.append((i, s))
            uses.append((i, s, u))

    class_probs: list[torch.Tensor] = []
    if representatives:
        rank_t = torch.stack(
            [torch.as_tensor(r if r is not None else np.zeros(images.shape[2:], np.int64)) for r in rank_maps]
        ).to(device)
        counts_t = counts_t.to(device)
        if batch_size is None:
            batch_size = _default_batch(device, images.shape[1:], len(representatives))
        batch_size = max(1, int(batch_size))
        cpu = device.type == "cpu"
        with contextlib.ExitStack() as stack:
            stack.enter_context(_EvalMode(model))
            if cpu:
                from softcam_core.explain.guard import inference_weights, model_lock

                stack.enter_context(model_lock(model))
                # channels-last weights with every foldable BatchNorm folded into its convolution,
                # put back on exit; outside inference mode (the .data swaps). Finding the pairs
                # takes one autograd forward, impossible with weights made under inference mode:
                # those run channels-last only
                probe = None if any(p.is_inference() for p in model.parameters()) else images[:1]
                stack.enter_context(inference_weights(model, channels_last=True, fold_probe=probe))
            stack.enter_context(torch.inference_mode())
            start = 0
            while start < len(representatives):
                chunk = representatives[start : start + batch_size]
                img_idx = torch.tensor([i for i, _ in chunk], device=device)
                step_idx = torch.tensor([s for _, s in chunk], device=device)
                occluded = rank_t[img_idx] < counts_t[step_idx].view(-1, 1, 1)
                inputs = torch.where(occluded.unsqueeze(1), baselines[img_idx], images[img_idx])
                if cpu:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                try:
                    out = _class_scores(model(inputs), scale)
                except torch.cuda.OutOfMemoryError:
                    if batch_size == 1:
                        raise
                    del inputs, occluded
                    torch.cuda.empty_cache()
                    batch_size = max(1, batch_size // 2)
                    continue
                class_probs.append(out.double().cpu())
                start += len(chunk)
    if class_probs:
        table = torch.cat(class_probs).numpy()
        single = table.shape[1] == 1
        for i, s, u in uses:
            probs[i, s] = table[u, 0 if single else targets_np[i]]
    return _curves_from_probs(probs, problems, scale)


def deletion_curve_reference(
    model: nn.Module,
    images: torch.Tensor,
    sals: Any,
    targets: Sequence[int] | np.ndarray | torch.Tensor,
    patch: int,
    steps: int = DEFAULT_DELETION_STEPS,
    baseline: str | float | torch.Tensor = "zero",
    protocol: str = "top",
    scale: str = "ratio",
) -> np.ndarray:
    """The plain loop :func:`deletion_curves` must equal: one image, one step, one forward pass.

    Same arguments and result as :func:`deletion_curves`; kept for tests and benchmarks.
    """
    device = _model_device(model)
    images = images.to(device)
    baselines, rank_maps, problems, target_t, _, counts = _prepare_deletion(
        images, sals, targets, patch, steps, baseline, protocol, scale
    )
    score = target_log_odds if scale == "logodds" else target_probability
    probs = np.full((images.shape[0], steps + 1), np.nan)
    with _EvalMode(model), torch.inference_mode():
        for i, rank_map in enumerate(rank_maps):
            if rank_map is None:
                continue
            for s, count in enumerate(counts):
                occluded = torch.as_tensor(rank_map < count, device=device)
                x = torch.where(occluded, baselines[i], images[i])
                probs[i, s] = float(score(model(x.unsqueeze(0)), target_t[i : i + 1].to(device))[0])
    return _curves_from_probs(probs, problems, scale)


def deletion_curve(
    model: nn.Module,
    image: torch.Tensor,
    sal: Any,
    target: int,
    patch: int,
    steps: int = DEFAULT_DELETION_STEPS,
    baseline: str | float | torch.Tensor = "zero",
    protocol: str = "top",
    scale: str = "ratio",
) -> np.ndarray:
    """Deletion curve of one image (SoftCAM App. E.4): (steps + 1,) ``p_s / p_0`` of class ``target``.

    Step ``s`` occludes the map's top ``s`` cells (``protocol="top"``, ``steps`` <= cells); pass the
    model's predicted class as ``target`` to follow the paper. ``image`` is (3, H, W) (or
    (1, 3, H, W)), ``sal`` (H, W); the variants (``protocol="full"``, ``baseline="blur"``,
    ``scale="logodds"``) are those of :func:`deletion_curves`.
    """
    if image.ndim == 3:
        image = image.unsqueeze(0)
    sal_arr = sal.detach().cpu().numpy() if isinstance(sal, torch.Tensor) else np.asarray(sal)
    if sal_arr.ndim != 2:
        raise ValueError(f"saliency map must be (H, W), got shape {sal_arr.shape}")
    return deletion_curves(model, image, sal_arr[None], [int(target)], patch, steps, baseline, batch_size=None,
                           protocol=protocol, scale=scale)[0]


def audc(curve: Any) -> float:
    """Area under a deletion curve, trapezoid rule over x = s / steps in [0, 1]; lower = more faithful.

    With the paper's protocol x is the share of the ``steps`` top cells removed so far (not of the
    image); for a log-odds curve the area is <= 0 when the confidence falls.

    ``curve``: (steps + 1,) values from :func:`deletion_curve`. Returns nan (MetricUndefined) when the
    curve has a nan or fewer than 2 points.
    """
    values = np.asarray(curve, dtype=np.float64).ravel()
    if values.size < 2:
        return _undefined("deletion curve has fewer than 2 points")
    if not np.all(np.isfinite(values)):
        return _undefined("deletion curve is undefined (nan)")
    x = np.linspace(0.0, 1.0, values.size)
    return float(np.sum((values[1:] + values[:-1]) * np.diff(x)) / 2.0)


# ----------------------------------------------------------------------------------------------
# does the model use the annotated lesions? (a check of the benchmark, not of a map)

DEFAULT_OCCLUSION_CONTROLS = 8


def lesion_cells(mask: Any, patch: int) -> np.ndarray:
    """(nr, nc) bool: the grid cells that touch the annotation by at least one pixel (the
    "patch-annotation" of top-k precision, SoftCAM App. E.2)."""
    mask = np.asarray(mask).astype(bool)
    return _cell_reduce(mask.astype(np.float64), patch) > 0


def _occlusion_seed(image: torch.Tensor, cells: np.ndarray, seed: int) -> np.random.Generator:
    """A generator seeded by the image's content and its lesion cells: the same controls for one
    image whatever its position in a batch, a shard or a resumed run."""
    import hashlib

    digest = hashlib.sha256(image.detach().cpu().float().numpy().tobytes() + np.packbits(cells).tobytes())
    return np.random.default_rng([int(seed), int.from_bytes(digest.digest()[:8], "little")])


def lesion_occlusion(
    model: nn.Module,
    images: torch.Tensor,
    masks: Any,
    targets: Sequence[int] | np.ndarray | torch.Tensor,
    patch: int,
    baseline: str | float | torch.Tensor = "blur",
    controls: int = DEFAULT_OCCLUSION_CONTROLS,
    seed: int = 0,
    batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Relative drop of the target's probability when the annotated lesions are occluded, and when
    as many cells elsewhere are (the control). Not a map metric: it asks whether the *model*
    depends on the annotated regions at all. Where it does not (lesion drop no larger than the
    control's), localisation metrics score maps against regions the prediction does not use, and a
    map that avoids the lesions may still be faithful: the benchmark cannot tell.

    Every ``patch`` cell touching the annotation (:func:`lesion_cells`) is replaced by the
    baseline at once (``_resolve_baseline``: ``"blur"`` by default, the image blurred with sigma
    ``patch / 2``, so the lesion's detail goes but the image stays in distribution; ``"zero"``,
    ``"mean"``, a number or a tensor as in :func:`deletion_curves`). ``drop = 1 - p_occluded / p_intact`` of class
    ``targets[n]`` (softmax; sigmoid for one logit), the complement of a deletion curve's point. The
    control occludes ``controls`` random sets of the same number of cells drawn from the cells
    that do not touch the annotation (seeded by ``seed`` and the image's content) and averages
    their drops.

    Args:
        model: classifier returning logits (B, C), run in eval mode on its own device under
            ``torch.inference_mode`` (its mode is restored). images: (N, 3, H, W) model inputs.
        masks: (N, H, W) bool annotations at input resolution. targets: (N,) class indices.
        patch: cell side in pixels. controls: random control sets per image (>= 1).
        batch_size: occluded inputs per forward (None: 16 at 224 px on CPU, as deletion).
    Returns:
        ``(lesion_drop (N,), control_drop (N,))`` float64, each <= 1 (negative when occluding
        raises the probability). nan with a :class:`MetricUndefined` reason for an empty mask, a
        zero intact probability, or (control only) fewer cells outside the annotation than in it.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    mask_arr = np.asarray(masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else masks).astype(bool)
    if mask_arr.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"masks shape {mask_arr.shape} does not match images {tuple(images.shape)}: need (N, H, W)")
    target_np = np.asarray(targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else targets,
                           dtype=np.int64).reshape(-1)
    if target_np.size != images.shape[0]:
        raise ValueError(f"{target_np.size} targets for {images.shape[0]} images")
    if int(controls) != controls or controls < 1:
        raise ValueError(f"controls must be a positive integer, got {controls!r}")
    device = _model_device(model)
    images = images.to(device)
    rows, cols = cell_grid(images.shape[2:], patch)
    n = images.shape[0]
    lesion = np.full(n, np.nan)
    control = np.full(n, np.nan)
    # (image, cell set) per forward: the intact image first, then the lesion set, then the controls
    jobs: list[tuple[int, np.ndarray | None]] = []
    plan: list[tuple[int, int, list[int]]] = []  # image, its lesion job, its control jobs
    for i in range(n):
        cells = lesion_cells(mask_arr[i], patch)
        if not cells.any():
            _undefined("empty annotation mask")
            continue
        intact = len(jobs)
        jobs.append((i, None))
        jobs.append((i, cells))
        outside = np.flatnonzero(~cells.ravel())
        count = int(cells.sum())
        control_jobs: list[int] = []
        if outside.size >= count:
            rng = _occlusion_seed(images[i], cells, seed)
            for _ in range(int(controls)):
                chosen = np.zeros(cells.size, dtype=bool)
                chosen[rng.choice(outside, size=count, replace=False)] = True
                control_jobs.append(len(jobs))
                jobs.append((i, chosen.reshape(cells.shape)))
        plan.append((i, intact, control_jobs))
    if not jobs:
        return lesion, control
    if batch_size is None:
        batch_size = _default_batch(device, images.shape[1:], len(jobs))
    scores = np.empty(len(jobs))
    baselines: dict[int, torch.Tensor] = {}
    with _EvalMode(model), torch.inference_mode():
        for start in range(0, len(jobs), max(1, int(batch_size))):
            chunk = jobs[start:start + max(1, int(batch_size))]
            inputs = []
            for i, cells in chunk:
                if cells is None:
                    inputs.append(images[i])
                    continue
                if i not in baselines:
                    baselines[i] = _resolve_baseline(images[i], baseline, patch)
                pixels = np.repeat(np.repeat(cells, patch, axis=0), patch, axis=1)[: images.shape[2], : images.shape[3]]
                inputs.append(torch.where(torch.as_tensor(pixels, device=device), baselines[i], images[i]))
            table = _class_scores(model(torch.stack(inputs))).double().cpu().numpy()
            for k, (i, _) in enumerate(chunk):
                scores[start + k] = table[k, 0 if table.shape[1] == 1 else target_np[i]]
    for i, intact, control_jobs in plan:
        p0 = scores[intact]
        if not p0 > 0:
            _undefined("target probability of the intact image is 0")
            continue
        lesion[i] = 1.0 - scores[intact + 1] / p0
        if control_jobs:
            control[i] = float(np.mean(1.0 - scores[control_jobs] / p0))
        else:
            _undefined("the annotation touches more than half of the cells: no same-size control outside it")
    return lesion, control
