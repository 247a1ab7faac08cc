"""Inter-annotator agreement: how well two annotators' shapes on the same images agree.

Explanation metrics are scored against annotations, so they are only as good as the annotations:
where two annotators agree on F1 0.6, no map can be expected to "localise" better than that. These
pure functions are the maths behind ``softcam annotations agreement`` (db/agreement.py reads the
shapes):

* **Matching** (:func:`match_points`, :func:`match_boxes`): a one-to-one matching of annotator A's
  shapes to annotator B's of the **same label**, a pair allowed only when the points lie within
  ``tolerance`` pixels (Euclidean) or the boxes overlap with IoU >= ``iou``. Among the matchings with
  the most pairs, the one with the least total distance (points) or the most total IoU (boxes) is
  taken (the Hungarian algorithm, :func:`scipy.optimize.linear_sum_assignment`, on costs that make
  every allowed pair cheaper than any number of forbidden ones).
* **F1** of an image: ``2 * matched / (n_a + n_b)`` (the Dice coefficient of the two shape sets;
  equal to the F1 of B scored against A and of A against B). Undefined (NaN) when neither marked
  anything: agreement on absence is what κ measures.
* **Cohen's κ** on image-level presence (:func:`cohen_kappa`): over the images, whether each
  annotator marked at least one shape; ``κ = (p_o - p_e) / (1 - p_e)`` with ``p_o`` the fraction of
  images on which they agree and ``p_e = p_a p_b + (1 - p_a)(1 - p_b)`` (``p_a``: A's fraction of
  images with a shape). Undefined (NaN) when ``p_e = 1`` (both constant and equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Matching:
    """A one-to-one matching: ``pairs`` ``(index in A, index in B)``, and the set sizes."""

    pairs: tuple[tuple[int, int], ...]
    n_a: int
    n_b: int

    @property
    def matched(self) -> int:
        return len(self.pairs)

    @property
    def f1(self) -> float:
        """``2 * matched / (n_a + n_b)``; NaN when both sets are empty."""
        total = self.n_a + self.n_b
        return 2 * self.matched / total if total else math.nan


def _assign(allowed: np.ndarray, cost: np.ndarray) -> list[tuple[int, int]]:
    """Maximum-cardinality, then minimum-cost, matching of the ``allowed`` pairs (bool (N, M); cost
    (N, M) in [0, 1]): forbidden pairs cost more than all allowed ones together."""
    from scipy.optimize import linear_sum_assignment

    if not allowed.any():
        return []
    forbidden = float(min(allowed.shape)) + 1.0
    rows, cols = linear_sum_assignment(np.where(allowed, cost, forbidden))
    return sorted((int(r), int(c)) for r, c in zip(rows, cols) if allowed[r, c])


def _by_label(a_labels: Sequence, b_labels: Sequence, pair_matching) -> list[tuple[int, int]]:
    pairs: list[tuple[int, int]] = []
    for label in sorted(set(a_labels) & set(b_labels), key=str):
        ia = [i for i, x in enumerate(a_labels) if x == label]
        ib = [j for j, x in enumerate(b_labels) if x == label]
        pairs += [(ia[i], ib[j]) for i, j in pair_matching(ia, ib)]
    return sorted(pairs)


def match_points(a: np.ndarray, b: np.ndarray, tolerance: float, a_labels: Sequence | None = None,
                 b_labels: Sequence | None = None) -> Matching:
    """One-to-one matching of points ``a`` (N, 2) and ``b`` (M, 2), ``(x, y)`` image pixels, of the
    same label (``a_labels`` / ``b_labels``; all one label when omitted), a pair only within
    ``tolerance`` pixels (inclusive)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 2)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    a_labels = list(a_labels) if a_labels is not None else [None] * len(a)
    b_labels = list(b_labels) if b_labels is not None else [None] * len(b)

    def pair(ia, ib):
        distance = np.linalg.norm(a[ia][:, None, :] - b[ib][None, :, :], axis=2)
        return _assign(distance <= tolerance, distance / (tolerance + 1.0))

    return Matching(tuple(_by_label(a_labels, b_labels, pair)), len(a), len(b))


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4), ``x0, y0, x1, y1``: (N, M)
    (the same value as :func:`annotations.geometry.box_iou`, vectorised)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_boxes(a: np.ndarray, b: np.ndarray, iou: float, a_labels: Sequence | None = None,
                b_labels: Sequence | None = None) -> Matching:
    """One-to-one matching of boxes ``a`` (N, 4) and ``b`` (M, 4), ``x0, y0, x1, y1`` image pixels,
    of the same label, a pair only when IoU >= ``iou`` (and > 0)."""
    if not 0 <= iou <= 1:
        raise ValueError(f"IoU threshold must be in [0, 1], got {iou}")
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    a_labels = list(a_labels) if a_labels is not None else [None] * len(a)
    b_labels = list(b_labels) if b_labels is not None else [None] * len(b)

    def pair(ia, ib):
        overlap = box_iou_matrix(a[ia], b[ib])
        return _assign((overlap >= iou) & (overlap > 0), 1.0 - overlap)

    return Matching(tuple(_by_label(a_labels, b_labels, pair)), len(a), len(b))


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Cohen's κ of two raters' yes/no judgements of the same items (see module doc); NaN when
    there is no item or chance agreement is 1."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"the two raters judged different numbers of items ({a.size} and {b.size})")
    if a.size == 0:
        return math.nan
    observed = float(np.mean(a == b))
    pa, pb = float(a.mean()), float(b.mean())
    chance = pa * pb + (1 - pa) * (1 - pb)
    if math.isclose(chance, 1.0):
        return math.nan
    return (observed - chance) / (1 - chance)
