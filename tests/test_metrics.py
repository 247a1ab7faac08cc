"""Every metric pinned on tiny hand-computed arrays; edge cases; batched deletion == plain loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from softcam_core import metrics as M


def _mask(shape, *points):
    mask = np.zeros(shape, dtype=bool)
    for r, c in points:
        mask[r, c] = True
    return mask


# ---------------------------------------------------------------- top-k localization precision

SAL_4x4 = np.array(
    [
        [4, 4, 0, 0],
        [4, 4, 0, 0],
        [1, 1, -2, -2],
        [1, 3, -2, -2],
    ],
    dtype=np.float32,
)


@pytest.mark.parametrize("k, by_k, by_positive", [(1, 0.0, 0.0), (2, 0.5, 0.5), (3, 1 / 3, 0.5), (4, 0.25, 0.5)])
def test_topk_precision_hand_computed(k, by_k, by_positive):
    # patch 2 -> cells TL, TR, BL, BR with means 4, 0, (1+1+1+3)/4 = 1.5, -2.
    # positive cells ranked: TL (4), BL (1.5); TR (mean 0) is not positive: fewer than k = 3, 4 positive cells.
    # mask touches BL only -> hits: k=1: [TL] -> 0; k>=2: [TL, BL] -> 1.
    # default (paper, Eq. 7) divides by k: 0/1, 1/2, 1/3, 1/4 (a map with fewer than k positive cells is penalised);
    # denominator="positive" divides by min(k, #positive) = 1, 2, 2, 2: 0, 1/2, 1/2, 1/2
    mask = _mask((4, 4), (3, 0))
    assert M.topk_localization_precision(SAL_4x4, mask, k, patch=2) == pytest.approx(by_k)
    assert M.topk_localization_precision(SAL_4x4, mask, k, patch=2, denominator="positive") == pytest.approx(by_positive)


def test_topk_precision_k_beyond_the_cells():
    mask = _mask((4, 4), (3, 0))
    # 4 cells: with the k denominator no map could reach 1 at k = 10 -> refused; the positive variant allows it
    with pytest.raises(ValueError, match="exceeds the 4 grid cells"):
        M.topk_localization_precision(SAL_4x4, mask, 10, patch=2)
    assert M.topk_localization_precision(SAL_4x4, mask, 10, patch=2, denominator="positive") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="denominator"):
        M.topk_localization_precision(SAL_4x4, mask, 1, patch=2, denominator="m")


def test_topk_precision_partial_edge_cells_use_their_own_pixels():
    # 5x5 with patch 2 -> 3x3 cells; the last row/column of cells is 1 pixel wide.
    # corner cell (4,4) holds one pixel of value 10 -> mean 10 (NOT 10/4 = 2.5 as zero padding would give);
    # top-left cell: four pixels of 8 -> mean 8. So the corner ranks first.
    sal = np.zeros((5, 5))
    sal[4, 4] = 10
    sal[0:2, 0:2] = 8
    assert M.topk_localization_precision(sal, _mask((5, 5), (4, 4)), 1, patch=2) == 1.0
    assert M.topk_localization_precision(sal, _mask((5, 5), (0, 0)), 1, patch=2) == 0.0
    # k=2: [corner, top-left], mask touches top-left only -> 1/2
    assert M.topk_localization_precision(sal, _mask((5, 5), (1, 1)), 2, patch=2) == 0.5


def test_topk_precision_ties_broken_by_cell_index():
    # two cells with equal mean 1: row-major order puts TL (index 0) before BR (index 3)
    sal = np.zeros((4, 4))
    sal[0:2, 0:2] = 1
    sal[2:4, 2:4] = 1
    assert M.topk_localization_precision(sal, _mask((4, 4), (0, 0)), 1, patch=2) == 1.0
    assert M.topk_localization_precision(sal, _mask((4, 4), (3, 3)), 1, patch=2) == 0.0


def test_topk_precision_no_positive_cell():
    # every cell mean is negative: the map points at nothing. Default: 0 hits / k = 0 (penalised, defined);
    # the min(k, #positive) variant has nothing to divide by -> undefined
    negative = -SAL_4x4 - 5
    assert M.metric_or_reason(M.topk_localization_precision, negative, _mask((4, 4), (0, 0)), 3, 2) == (0.0, None)
    value, reason = M.metric_or_reason(M.topk_localization_precision, negative, _mask((4, 4), (0, 0)), 3, 2, "positive")
    assert math.isnan(value) and "positive" in reason


# ---------------------------------------------------------------- activation precision / sensitivity


def test_activation_precision_hand_computed():
    sal = np.array([[2.0, -1.0], [1.0, 3.0]])
    # P = [[2, 0], [1, 3]] -> total 6; inside mask {(0,0)}: 2 -> 2/6
    assert M.activation_precision(sal, _mask((2, 2), (0, 0))) == pytest.approx(1 / 3)
    # mask {(0,1), (1,1)}: 0 + 3 -> 3/6
    assert M.activation_precision(sal, _mask((2, 2), (0, 1), (1, 1))) == pytest.approx(0.5)


def test_activation_sensitivity_hand_computed():
    sal = np.array([[2.0, -1.0], [1.0, 3.0]])
    # P / max(P) = [[2/3, 0], [1/3, 1]]
    # mask {(0,0)}: (2/3) / 1 pixel
    assert M.activation_sensitivity(sal, _mask((2, 2), (0, 0))) == pytest.approx(2 / 3)
    # mask {(0,0), (0,1)}: (2/3 + 0) / 2 pixels = 1/3
    assert M.activation_sensitivity(sal, _mask((2, 2), (0, 0), (0, 1))) == pytest.approx(1 / 3)
    # whole image: (2/3 + 0 + 1/3 + 1) / 4 = 0.5
    assert M.activation_sensitivity(sal, np.ones((2, 2), bool)) == pytest.approx(0.5)
    # count: share of annotated pixels with P > 0; {(0,0), (0,1)}: 1 of 2; whole image: 3 of 4
    assert M.activation_sensitivity(sal, _mask((2, 2), (0, 0), (0, 1)), kind="count") == pytest.approx(0.5)
    assert M.activation_sensitivity(sal, np.ones((2, 2), bool), kind="count") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="kind"):
        M.activation_sensitivity(sal, np.ones((2, 2), bool), kind="area")


def test_activation_precision_and_sensitivity_score_a_map_without_evidence_0_and_a_flat_map_at_chance():
    """SoftCAM E.3: the epsilon in Eqs. 8-9 only prevents division by zero, so a map with no positive
    evidence scores 0 (it is kept in the cohort mean: leaving it out would reward abstaining), and a
    constant map has a value: precision at chance (the annotated share), sensitivity 1 (a recall)."""
    mask = _mask((4, 4), (0, 0), (0, 1), (1, 1))  # 3 of 16 pixels
    negative = -np.arange(1, 17, dtype=float).reshape(4, 4)
    assert M.metric_or_reason(M.activation_precision, negative, mask) == (0.0, None)
    assert M.metric_or_reason(M.activation_sensitivity, negative, mask) == (0.0, None)
    assert M.activation_sensitivity(negative, mask, kind="count") == 0.0
    assert M.activation_precision(np.zeros((4, 4)), mask) == 0.0
    flat = np.full((4, 4), 2.5)
    assert M.activation_precision(flat, mask) == pytest.approx(3 / 16)
    assert M.activation_sensitivity(flat, mask) == pytest.approx(1.0)
    assert M.activation_sensitivity(flat, mask, kind="count") == pytest.approx(1.0)
    # a cohort of one perfect map and one without evidence: mean 0.5 (the paper's), not 1.0
    perfect = mask.astype(float)
    assert np.mean([M.activation_precision(perfect, mask), M.activation_precision(negative, mask)]) == 0.5


def test_activation_consistency_hand_computed():
    # 2x3 maps (6 pixels each); zeros count as neither sign
    diseased = np.array([[3.0, -1.0, 0.0], [2.0, 0.0, -4.0]])  # 2 of 6 pixels > 0 -> 1/3 (mass: pos 5 / 10 = 1/2)
    healthy = np.array([[-1.0, -2.0, 0.0], [1.0, 0.0, 0.0]])  # 2 of 6 pixels < 0 -> 1/3 (mass: neg 3 / 4 = 3/4)
    healthy_relu = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # non-negative map: 0 pixels < 0 -> 0 (mass: 0)
    zeros = np.zeros((2, 3))  # diseased, no evidence at all: 0 of 6 pixels > 0 -> 0, kept (mass: left out)
    mostly = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, -1.0]])  # diseased: 5 of 6 > 0 -> 5/6 (mass 5/6)
    maps = np.stack([diseased, healthy, healthy_relu, zeros, mostly])
    labels = [1, 0, 0, 1, 1]
    # pooled: mean(1/3, 1/3, 0, 0, 5/6) = (2/6 + 2/6 + 5/6) / 5 = 9/30 = 0.3
    assert M.activation_consistency(maps, labels) == pytest.approx(0.3)
    # class-wise: diseased mean(1/3, 0, 5/6) = (2/6 + 5/6) / 3 = 7/18; healthy mean(1/3, 0) = 1/6
    by_class = M.activation_consistency_by_class(maps, labels)
    assert by_class == pytest.approx({"diseased": 7 / 18, "healthy": 1 / 6, "pooled": 0.3})
    # one map = that image's score
    assert M.activation_consistency(diseased, 1) == pytest.approx(1 / 3)
    assert M.activation_consistency(diseased, 0) == pytest.approx(2 / 6)  # 2 pixels < 0 as well
    assert M.metric_or_reason(M.activation_consistency, zeros, 1) == (0.0, None)
    # today's mass-weighted variant: mean(1/2, 3/4, 0, 5/6) without the all-zero map = (6 + 9 + 0 + 10) / 48
    assert M.activation_consistency_mass(maps, labels) == pytest.approx(25 / 48)
    value, reason = M.metric_or_reason(M.activation_consistency_mass, zeros, 1)
    assert math.isnan(value) and "zeros" in reason
    with pytest.raises(ValueError, match="labels"):
        M.activation_consistency(maps, [1, 0])


def test_activation_consistency_undefined_parts():
    diseased = np.array([[3.0, -1.0, 0.0], [2.0, 0.0, -4.0]])
    with_nan = diseased.copy()
    with_nan[0, 0] = np.nan
    # a non-finite map is left out: mean over the finite one only
    assert M.activation_consistency(np.stack([diseased, with_nan]), [1, 1]) == pytest.approx(1 / 3)
    value, reason = M.metric_or_reason(M.activation_consistency, with_nan, 1)
    assert math.isnan(value) and "NaN" in reason
    # no healthy image: that class is undefined and says so; the others are defined
    value, reason = M.metric_or_reason(M.activation_consistency_by_class, diseased, 1)
    assert value["diseased"] == pytest.approx(1 / 3) and value["pooled"] == pytest.approx(1 / 3)
    assert math.isnan(value["healthy"]) and reason == "no healthy image"


# ---------------------------------------------------------------- pointing game


def test_pointing_game_hand_computed():
    sal = np.zeros((3, 3))
    sal[1, 1] = 5
    assert M.pointing_game(sal, _mask((3, 3), (1, 1))) == 1.0
    assert M.pointing_game(sal, _mask((3, 3), (0, 0))) == 0.0
    # distance from (1,1) to (0,0) is sqrt(2) = 1.414: within 1.5, not within 1
    assert M.pointing_game(sal, _mask((3, 3), (0, 0)), tolerance_px=1.5) == 1.0
    assert M.pointing_game(sal, _mask((3, 3), (0, 0)), tolerance_px=1) == 0.0
    # two tied maxima, one on the annotation -> 1/2
    sal[2, 2] = 5
    assert M.pointing_game(sal, _mask((3, 3), (2, 2))) == 0.5


# ---------------------------------------------------------------- top-fraction IoU / energy, AP


def test_iou_and_energy_top_fraction_hand_computed():
    sal = np.arange(1, 11, dtype=float).reshape(2, 5)  # values 1..10
    mask = np.isin(sal, [9, 8, 7, 6])
    # frac 0.3 of 10 pixels -> top 3 = {10, 9, 8}; mask {9, 8, 7, 6}
    # IoU = |{9, 8}| / |{10, 9, 8, 7, 6}| = 2/5
    assert M.iou_top_fraction(sal, mask, 0.3) == pytest.approx(0.4)
    # energy: inside (9 + 8) over top region (10 + 9 + 8) = 17/27
    assert M.energy_top_fraction(sal, mask, 0.3) == pytest.approx(17 / 27)


def test_iou_top10_of_all_pixels_hand_computed():
    sal = np.arange(100, dtype=float).reshape(10, 10)  # values 0..99, row-major
    mask = np.zeros((10, 10), bool)
    mask[8:10, 0:5] = True  # values 80..84 and 90..94
    # default frac 0.10 -> ceil(10) = 10 pixels: values 90..99 (row 9). IoU = |90..94| / (10 + 10 - 5) = 5/15
    assert M.iou_top_fraction(sal, mask) == pytest.approx(1 / 3)
    # energy (frac 0.10 given): inside 90+91+92+93+94 = 460 over 90+...+99 = 945; count: 5 of 10 pixels
    assert M.energy_top_fraction(sal, mask, 0.10) == pytest.approx(460 / 945)
    assert M.energy_top_fraction(sal, mask, 0.10, kind="count") == pytest.approx(0.5)
    # default frac 0.15 -> values 85..99: energy 460 / (85+...+99 = 1380) = 1/3; count 5 of 15 = 1/3
    assert M.energy_top_fraction(sal, mask) == pytest.approx(1 / 3)
    assert M.energy_top_fraction(sal, mask, kind="count") == pytest.approx(1 / 3)
    # shifted so only 96..99 are positive (values 1..4), 95 -> 0, the rest negative
    shifted = sal - 95
    right = np.zeros((10, 10), bool)
    right[8:10, 5:10] = True  # 85..89 and 95..99
    # all pixels (default): top 10 = row 9 again; inside 95..99 -> 5 / (10 + 10 - 5) = 1/3
    assert M.iou_top_fraction(shifted, right) == pytest.approx(1 / 3)
    # positive_only (named variant): region {96..99}, all inside -> 4 / 10
    assert M.iou_top_fraction(shifted, right, positive_only=True) == pytest.approx(0.4)
    # the all-negative region of -sal still has a top 10 %: values 0..-9 (row 0), mask row 0 -> IoU 1
    top_row = np.zeros((10, 10), bool)
    top_row[0] = True
    assert M.iou_top_fraction(-sal, top_row) == 1.0
    with pytest.raises(ValueError, match="kind"):
        M.energy_top_fraction(sal, mask, kind="mass")


def test_top_fraction_ties_and_positive_only():
    sal = np.zeros((2, 5))
    sal[0, 0], sal[0, 1] = 2.0, 1.0  # only 2 positive pixels, frac 0.5 asks for 5
    mask = _mask((2, 5), (0, 1), (1, 4))
    # all pixels: the 5th highest value is 0, shared by 8 pixels; ties at the threshold all enter
    # -> region = the whole image; IoU = |mask| / 10 = 2/10; count = 2/10
    assert M.iou_top_fraction(sal, mask, 0.5) == pytest.approx(0.2)
    assert M.energy_top_fraction(sal, mask, 0.5, kind="count") == pytest.approx(0.2)
    # energy: zeros carry none -> 1 / (2 + 1), with or without positive_only
    assert M.energy_top_fraction(sal, mask, 0.5) == pytest.approx(1 / 3)
    # positive_only: region = {(0,0), (0,1)}; IoU = 1 / |{(0,0), (0,1), (1,4)}| = 1/3; count 1/2
    assert M.iou_top_fraction(sal, mask, 0.5, positive_only=True) == pytest.approx(1 / 3)
    assert M.energy_top_fraction(sal, mask, 0.5, positive_only=True) == pytest.approx(1 / 3)
    assert M.energy_top_fraction(sal, mask, 0.5, kind="count", positive_only=True) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="frac"):
        M.iou_top_fraction(sal, mask, 0.0)


def test_average_precision_hand_computed():
    sal = np.array([[0.9, 0.8], [0.7, 0.6]])
    mask = np.array([[True, False], [True, False]])
    # ranked: 0.9 (hit, P=1, R=1/2), 0.8 (miss), 0.7 (hit, P=2/3, R=1) -> AP = 1/2*1 + 1/2*2/3 = 5/6
    assert M.average_precision(sal, mask) == pytest.approx(5 / 6)
    # tie: scores 0.9, 0.5, 0.5, 0.1 with labels 1, 1, 0, 0: threshold 0.5 admits both tied pixels
    # -> P=1 at R=1/2, then P=2/3 at R=1 -> 5/6 (not 1.0, which a scan order could give)
    sal_tie = np.array([[0.9, 0.5], [0.5, 0.1]])
    assert M.average_precision(sal_tie, np.array([[True, True], [False, False]])) == pytest.approx(5 / 6)
    assert M.average_precision(sal_tie, np.array([[True, False], [True, False]])) == pytest.approx(5 / 6)


def test_average_precision_cascam_hand_computed():
    sal = np.array([[0.9, 0.8], [0.7, 0.6]])
    mask = np.array([[True, False], [True, False]])
    # points (recall, precision): start (0, 1); after 0.9 (1/2, 1); 0.8 (1/2, 1/2); 0.7 (1, 2/3); 0.6 (1, 1/2)
    # trapezoids over recall: 1/2 * (1 + 1)/2 = 1/2; 0; 1/2 * (1/2 + 2/3)/2 = 7/24; 0 -> 19/24 (step AP: 5/6)
    assert M.average_precision_cascam(sal, mask) == pytest.approx(19 / 24)
    # min-max scaling changes no ranking: a shifted, scaled, signed copy gives the same value
    assert M.average_precision_cascam(3 * sal - 2.5, mask) == pytest.approx(19 / 24)
    # first pixel a miss: (0, 1) -> (0, 0) -> (1, 1/2): area 0 + (0 + 1/2)/2 = 1/4 (step AP 1/2)
    assert M.average_precision_cascam(np.array([[0.9, 0.1]]), np.array([[False, True]])) == pytest.approx(0.25)
    assert M.average_precision(np.array([[0.9, 0.1]]), np.array([[False, True]])) == pytest.approx(0.5)


def test_average_precision_cascam_matches_sklearn_trapezoid():
    from sklearn.metrics import auc, precision_recall_curve

    rng = np.random.default_rng(1)
    for _ in range(3):
        sal = np.round(rng.normal(size=(24, 24)), 1)  # ties
        mask = rng.random((24, 24)) < 0.15
        scaled = (sal - sal.min()) / (sal.max() - sal.min())
        precision, recall, _ = precision_recall_curve(mask.ravel(), scaled.ravel())
        assert M.average_precision_cascam(sal, mask) == pytest.approx(auc(recall, precision), abs=1e-12)


def test_average_precision_matches_sklearn():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    sal = np.round(rng.normal(size=(32, 32)), 1)  # rounding creates many ties
    mask = rng.random((32, 32)) < 0.2
    assert M.average_precision(sal, mask) == pytest.approx(average_precision_score(mask.ravel(), sal.ravel()))


# ---------------------------------------------------------------- edge cases shared by all map metrics

MASS_METRICS = (M.activation_precision, M.activation_sensitivity)
MAP_METRICS = [
    lambda s, m: M.topk_localization_precision(s, m, 2, 2),
    lambda s, m: M.topk_localization_precision(s, m, 2, 2, denominator="positive"),
    M.activation_precision,
    M.activation_sensitivity,
    M.pointing_game,
    lambda s, m: M.iou_top_fraction(s, m, 0.25),
    lambda s, m: M.iou_top_fraction(s, m, 0.25, positive_only=True),
    lambda s, m: M.energy_top_fraction(s, m, 0.25),
    lambda s, m: M.energy_top_fraction(s, m, 0.25, kind="count"),
    M.average_precision,
    M.average_precision_cascam,
]


@pytest.mark.parametrize("metric", MAP_METRICS)
def test_edge_cases_are_explicit(metric):
    good = SAL_4x4.astype(float)
    mask = _mask((4, 4), (0, 0))
    with pytest.raises(ValueError, match="shape"):
        metric(good, np.zeros((4, 5), bool))
    value, reason = M.metric_or_reason(metric, good, np.zeros((4, 4), bool))
    assert math.isnan(value) and reason == "empty annotation mask"
    value, reason = M.metric_or_reason(metric, np.full((4, 4), 3.0), mask)
    if metric in MASS_METRICS:  # defined on a constant map (chance; see the test above)
        assert np.isfinite(value) and reason is None
    else:
        assert math.isnan(value) and "constant" in reason
    with_nan = good.copy()
    with_nan[1, 1] = np.nan
    value, reason = M.metric_or_reason(metric, with_nan, mask)
    assert math.isnan(value) and "NaN" in reason
    with pytest.warns(M.MetricUndefined, match="empty annotation mask"):
        assert math.isnan(metric(good, np.zeros((4, 4), bool)))
    value, reason = M.metric_or_reason(metric, good, mask)
    assert np.isfinite(value) and reason is None


def test_no_positive_evidence_is_undefined():
    negative = -np.arange(16, dtype=float).reshape(4, 4) - 1
    mask = _mask((4, 4), (0, 0))
    needs_positive = (  # (activation precision / sensitivity score such a map 0: see above)
        M.energy_top_fraction,
        lambda s, m: M.iou_top_fraction(s, m, positive_only=True),
        lambda s, m: M.topk_localization_precision(s, m, 1, 2, denominator="positive"),
    )
    for metric in needs_positive:
        value, reason = M.metric_or_reason(metric, negative, mask)
        assert math.isnan(value) and "positive" in reason
    # rank-only metrics stay defined: top 10 % of all pixels = 2 pixels (-1, -2 at (0,0), (0,1)) -> IoU 1/2
    assert M.iou_top_fraction(negative, mask) == pytest.approx(0.5)


# ---------------------------------------------------------------- deletion curves and AUDC


def test_audc_hand_computed():
    # x = 0, 0.5, 1: trapezoids 0.5 * (1 + 0.5) / 2 + 0.5 * (0.5 + 0) / 2 = 0.375 + 0.125
    assert M.audc([1.0, 0.5, 0.0]) == pytest.approx(0.5)
    assert M.audc([1.0, 1.0]) == pytest.approx(1.0)
    value, reason = M.metric_or_reason(M.audc, [1.0, np.nan, 0.2])
    assert math.isnan(value) and reason


class _SumModel(nn.Module):
    """One logit = sum of channel 0; probability = sigmoid(sum)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x[:, 0].sum(dim=(1, 2)).unsqueeze(1) + self.dummy


def _hand_image_and_map():
    image = torch.zeros(3, 4, 4)
    image[0, 0:2, 0:2] = 1.0  # top-left cell contributes 4 to the logit
    image[0, 2:4, 2:4] = 0.5  # bottom-right cell contributes 2
    sal = np.zeros((4, 4))
    sal[0:2, 0:2] = 3.0  # ranked first
    sal[2:4, 2:4] = 2.0  # second
    sal[0:2, 2:4] = 1.0  # third, holds nothing
    return image, sal


def _sig(z):
    return 1 / (1 + math.exp(-z))


def test_deletion_curve_hand_computed():
    image, sal = _hand_image_and_map()
    # paper protocol: step s occludes the top s cells. 4 cells, 4 steps -> 0, 1, 2, 3, 4 cells occluded
    # -> logits 6, 2, 0, 0, 0 (zero baseline); p = sigmoid(logit)
    expected = np.array([_sig(6), _sig(2), _sig(0), _sig(0), _sig(0)]) / _sig(6)
    curve = M.deletion_curve(_SumModel(), image, sal, target=0, patch=2, steps=4, baseline="zero")
    np.testing.assert_allclose(curve, expected, rtol=1e-6)
    # baseline 0.25 everywhere: step 1 -> TL cell = 4 * 0.25 = 1, plus BR 2 -> logit 3
    curve = M.deletion_curve(_SumModel(), image, sal, target=0, patch=2, steps=4, baseline=0.25)
    assert curve[1] == pytest.approx(_sig(3) / _sig(6), rel=1e-6)
    assert M.audc(curve) < 1.0


def test_deletion_protocols_hand_computed():
    image, sal = _hand_image_and_map()
    # steps = 2 of 4 cells. "top": 0, 1, 2 cells -> logits 6, 2, 0; the image is never blanked
    top = M.deletion_curve(_SumModel(), image, sal, target=0, patch=2, steps=2)
    np.testing.assert_allclose(top, np.array([_sig(6), _sig(2), _sig(0)]) / _sig(6), rtol=1e-6)
    # "full" (named variant): floor(s * 4 / 2) = 0, 2, 4 cells -> logits 6, 0, 0
    full = M.deletion_curve(_SumModel(), image, sal, target=0, patch=2, steps=2, protocol="full")
    np.testing.assert_allclose(full, np.array([_sig(6), _sig(0), _sig(0)]) / _sig(6), rtol=1e-6)
    # "top" removes one cell per step: more steps than cells is refused; "full" repeats counts instead
    with pytest.raises(ValueError, match="exceeds the 4 grid cells"):
        M.deletion_curve(_SumModel(), image, sal, target=0, patch=2, steps=5)
    assert M.deletion_curve(_SumModel(), image, sal, target=0, patch=2, steps=8, protocol="full").shape == (9,)
    with pytest.raises(ValueError, match="protocol"):
        M.deletion_curve(_SumModel(), image, sal, target=0, patch=2, steps=2, protocol="all")


def test_deletion_log_odds_hand_computed():
    image, sal = _hand_image_and_map()
    # one logit: the log-odds of sigmoid(z) is z itself -> curve z_s - z_0 = 6-6, 2-6, 0-6, 0-6, 0-6
    curve = M.deletion_curve(_SumModel(), image, sal, target=0, patch=2, steps=4, scale="logodds")
    np.testing.assert_allclose(curve, [0.0, -4.0, -6.0, -6.0, -6.0], atol=1e-6)
    # trapezoids over x = 0, 1/4, ..., 1: 1/4 * ((0-4)/2 + (-4-6)/2 + (-6-6)/2 + (-6-6)/2) = 1/4 * -19
    assert M.audc(curve) == pytest.approx(-4.75)
    # several classes: log(p / (1 - p)) from the logits, exact where p rounds to 1
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 40.0, 0.0]])
    p = torch.softmax(logits.double(), 1)
    got = M.target_log_odds(logits, torch.tensor([0, 1]))
    assert got[0].item() == pytest.approx(math.log(p[0, 0] / (1 - p[0, 0])))
    assert got[1].item() == pytest.approx(40.0 - math.log(2.0))  # p = 1 - 2e-18 in float64: 1 - p is 0 in float32
    with pytest.raises(ValueError, match="scale"):
        M.deletion_curve(_SumModel(), image, sal, target=0, patch=2, steps=4, scale="log")


def test_deletion_constant_map_gives_nan_curve():
    value, reason = M.metric_or_reason(
        M.deletion_curve, _SumModel(), torch.ones(3, 4, 4), np.ones((4, 4)), 0, 2, 4
    )
    assert value.shape == (5,) and np.all(np.isnan(value)) and "constant" in reason


def _tiny_cnn(num_classes=3):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )
    with torch.no_grad():  # non-trivial running statistics so eval-mode BN matters
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.filterwarnings("ignore::softcam_core.metrics.MetricUndefined")
@pytest.mark.parametrize("baseline, protocol, scale, steps", [
    ("zero", "top", "ratio", 6), ("mean", "top", "ratio", 6), ("blur", "top", "ratio", 6),
    ("zero", "top", "ratio", 25),  # steps = every cell: the last step blanks the image
    ("zero", "full", "ratio", 6), ("blur", "full", "ratio", 6),
    ("zero", "top", "logodds", 6), ("blur", "full", "logodds", 6),
])
def test_batched_deletion_equals_loop(baseline, protocol, scale, steps):
    torch.manual_seed(1)
    model = _tiny_cnn()
    model.train()  # must be evaluated in eval mode and handed back in train mode
    images = torch.randn(3, 3, 30, 30)  # 30 is not a multiple of the patch (7): partial edge cells, 5x5 = 25
    sals = np.random.default_rng(2).normal(size=(3, 30, 30))
    sals[1] = 0.5  # constant map -> nan row
    targets = [0, 2, 1]
    options = dict(patch=7, steps=steps, baseline=baseline, protocol=protocol, scale=scale)
    ref = M.deletion_curve_reference(model, images, sals, targets, **options)
    for batch_size in (None, 5, 1):
        got = M.deletion_curves(model, images, sals, targets, batch_size=batch_size, **options)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert model.training
    assert np.all(np.isnan(ref[1])) and np.all(np.isfinite(ref[[0, 2]]))
    assert np.allclose(ref[[0, 2], 0], 0.0 if scale == "logodds" else 1.0)
    # the one-image function is row 0 of the batched one
    one = M.deletion_curve(model, images[0], sals[0], targets[0], **options)
    np.testing.assert_allclose(one, ref[0], atol=1e-5, rtol=0)
    if scale == "logodds":  # a known step 0 is not used on the log-odds scale (p can round to 1)
        with torch.inference_mode():
            p0 = M.target_probability(model.eval()(images), torch.tensor(targets)).numpy()
        known = M.deletion_curves(model, images, sals, targets, intact_probs=p0, **options)
        np.testing.assert_allclose(known, ref, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::softcam_core.metrics.MetricUndefined")
@pytest.mark.parametrize("baseline", ["zero", "mean"])
@pytest.mark.parametrize("protocol, steps", [("full", 6), ("top", 4)])
def test_deletion_forwards_each_distinct_input_once(baseline, protocol, steps):
    """Several maps per image (repeated image rows), fewer cells than steps (full protocol), a
    known step 0: the curves still equal the plain loop, and the model sees each distinct occluded
    input once."""
    torch.manual_seed(3)
    model = _tiny_cnn()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    pictures = torch.randn(2, 3, 14, 14)
    images = pictures[[0, 0, 0, 1, 1]]  # image 0 with three maps, image 1 with two
    rng = np.random.default_rng(4)
    sals = rng.normal(size=(5, 14, 14))
    sals[1] = sals[0] * 2.0  # same cell ranking as map 0: every step shares its input
    sals[2] = 0.5  # constant map: nan row, nothing forwarded
    targets = [0, 1, 2, 2, 0]
    # 4 cells (patch 7). full, 6 steps: counts 0, 0, 1, 2, 2, 3, 4 -> repeated steps; top, 4 steps: 0, 1, 2, 3, 4.
    # Either way the occluded sets are the top 1, 2, 3 cells and then all 4.
    options = dict(patch=7, steps=steps, baseline=baseline, protocol=protocol)
    ref = M.deletion_curve_reference(model, images, sals, targets, **options)
    M.deletion_curves(model, images[:1], sals[:1], targets[:1], patch=7, steps=1)  # first call: BN-fold probe
    seen.clear()
    got = M.deletion_curves(model, images, sals, targets, batch_size=3, **options)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # distinct inputs: intact per image (2); occluded sets with 1, 2, 3 cells: map 0 (= map 1) 3,
    # maps 3 and 4 up to 6 (fewer when they rank the first cells alike); all occluded: 1 when the
    # baseline is constant, else 1 per image
    sets = {(img, tuple(np.argsort(-M._cell_means(sals[m], 7).ravel(), kind="stable")[:n]))
            for m, img in ((0, 0), (3, 1), (4, 1)) for n in (1, 2, 3)}
    full = 1 if baseline == "zero" else 2
    assert sum(seen) == 2 + len({(img, frozenset(c)) for img, c in sets}) + full
    assert max(seen) <= 3
    # step 0 given: the intact images are not forwarded and p0 is the value given
    with torch.inference_mode():
        p0 = M.target_probability(model.eval()(images), torch.tensor(targets)).numpy()
    seen.clear()
    known = M.deletion_curves(model, images, sals, targets, intact_probs=p0, **options)
    np.testing.assert_allclose(known, ref, atol=1e-5, rtol=0)
    assert sum(seen) == len({(img, frozenset(c)) for img, c in sets}) + full
    with pytest.raises(ValueError, match="intact probabilities"):
        M.deletion_curves(model, images, sals, targets, intact_probs=p0[:2], **options)


def test_deletion_keeps_the_model_as_it_was_and_follows_weight_changes():
    """The CPU speed-ups (channels-last weights, BatchNorm folded into the convolutions) are
    temporary: the model's modules and tensors come back as they were, and a changed weight is
    used at the next call."""
    model = _tiny_cnn().eval()
    images, sals = torch.randn(2, 3, 14, 14), np.random.default_rng(0).normal(size=(2, 14, 14))
    modules = list(model)
    before = {name: (p, p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    first = M.deletion_curves(model, images, sals, [0, 1], 7, 4)
    assert list(model) == modules and isinstance(model[1], nn.BatchNorm2d) and model[0].bias is not None
    for name, p in model.named_parameters():
        tensor, pointer, values = before[name]
        assert p is tensor and p.data_ptr() == pointer and p.is_contiguous() and torch.equal(p, values)
    with torch.no_grad():  # an in-place update, as an optimizer step makes
        model[0].weight.mul_(-3.0)
        model[1].running_mean.add_(1.0)
    changed = M.deletion_curves(model, images, sals, [0, 1], 7, 4)
    np.testing.assert_allclose(changed, M.deletion_curve_reference(model, images, sals, [0, 1], 7, 4), atol=1e-5, rtol=0)
    assert np.abs(changed - first).max() > 1e-3
    with torch.inference_mode():  # weights made under inference mode
        frozen = _tiny_cnn().eval()
    np.testing.assert_allclose(M.deletion_curves(frozen, images, sals, [0, 1], 7, 4),
                               M.deletion_curve_reference(frozen, images, sals, [0, 1], 7, 4), atol=1e-5, rtol=0)


def test_deletion_shape_errors():
    model = _tiny_cnn()
    with pytest.raises(ValueError, match="does not match"):
        M.deletion_curves(model, torch.zeros(2, 3, 8, 8), np.zeros((2, 8, 9)), [0, 0], 2, 4)
    with pytest.raises(ValueError, match="targets"):
        M.deletion_curves(model, torch.zeros(2, 3, 8, 8), np.zeros((2, 8, 8)), [0], 2, 4)


@pytest.mark.gpu
def test_batched_deletion_on_gpu_equals_loop():
    """On CUDA: the batched curves equal the one-step-at-a-time loop (TF32 off so both use full
    float32), and the CPU reference; prints the speed-up of the batched path."""
    import time

    import torchvision

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=2).eval()
    images = torch.randn(6, 3, 128, 128)
    sals = np.random.default_rng(0).normal(size=(6, 128, 128))
    targets = [0, 1, 0, 1, 1, 0]
    cpu_ref = M.deletion_curve_reference(model, images, sals, targets, patch=16, steps=20)
    model.cuda()
    batched = M.deletion_curves(model, images.cuda(), sals, targets, patch=16, steps=20)
    torch.cuda.synchronize()
    start = time.perf_counter()
    batched = M.deletion_curves(model, images.cuda(), sals, targets, patch=16, steps=20)
    torch.cuda.synchronize()
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    loop = M.deletion_curve_reference(model, images.cuda(), sals, targets, patch=16, steps=20)
    torch.cuda.synchronize()
    t_loop = time.perf_counter() - start
    np.testing.assert_allclose(batched, loop, atol=1e-5, rtol=0)
    np.testing.assert_allclose(batched, cpu_ref, atol=1e-4, rtol=0)
    print(f"\nGPU deletion, 6 images x 21 steps, resnet18 128px: batched {t_batched * 1e3:.1f} ms, "
          f"loop {t_loop * 1e3:.1f} ms, speed-up {t_loop / t_batched:.1f}x")


# --- lesion occlusion: does the model use the annotated regions? --------------------------------

class _QuadrantModel(torch.nn.Module):
    """Two logits: 0 and ``10 x`` the mean of channel 0 over the rows/cols ``region`` of the input."""

    def __init__(self, region: tuple[slice, slice]):
        super().__init__()
        self.region = region
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device for _model_device

    def forward(self, x):
        evidence = 10 * x[:, 0, self.region[0], self.region[1]].mean(dim=(1, 2)) + self.anchor
        return torch.stack([torch.zeros_like(evidence), evidence], dim=1)


def test_lesion_occlusion_hand_computed():
    top_left = (slice(0, 4), slice(0, 4))
    model = _QuadrantModel(top_left)
    images = torch.ones(2, 3, 8, 8)
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 1:3, 1:3] = True  # touches the 4 cells of the top-left quadrant (patch 2: cells (0..1, 0..1))
    masks[1, 0, 0] = True  # touches one cell: (0, 0)
    lesion, control = M.lesion_occlusion(model, images, masks, [1, 1], patch=2, baseline="zero")
    p_intact = 1 / (1 + math.exp(-10))
    # image 0: the whole quadrant zeroed -> logit 0 -> p = 0.5; no control cell is in the quadrant
    assert lesion[0] == pytest.approx(1 - 0.5 / p_intact, abs=1e-6)  # float32 softmax
    assert control[0] == pytest.approx(0.0, abs=1e-6)
    # image 1: a quarter of the quadrant zeroed -> logit 7.5; each control is one of 15 other cells
    assert lesion[1] == pytest.approx(1 - (1 / (1 + math.exp(-7.5))) / p_intact, abs=1e-6)
    assert 0 <= control[1] <= lesion[1]
    # the controls follow the image and its mask, not its place in the batch
    again_l, again_c = M.lesion_occlusion(model, images.flip(0), masks[::-1].copy(), [1, 1], patch=2, baseline="zero")
    assert np.array_equal(again_l[::-1], lesion) and np.array_equal(again_c[::-1], control)


def test_lesion_occlusion_says_no_for_a_model_that_looks_elsewhere():
    model = _QuadrantModel((slice(4, 8), slice(4, 8)))  # the bottom-right quadrant
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, :4, :4] = True
    lesion, control = M.lesion_occlusion(model, torch.ones(1, 3, 8, 8), masks, [1], patch=2, controls=32, baseline="zero")
    assert lesion[0] == pytest.approx(0.0, abs=1e-12)  # the lesions do not matter to it
    assert control[0] > 0.001  # occluding 4 of the 12 other cells hits its region


def test_lesion_occlusion_undefined_cases_and_shapes():
    model = _QuadrantModel((slice(0, 4), slice(0, 4)))
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[1, :6, :] = True  # 12 of 16 cells: no same-size control outside
    with pytest.warns(M.MetricUndefined):
        lesion, control = M.lesion_occlusion(model, torch.ones(2, 3, 8, 8), masks, [1, 1], patch=2, baseline="zero")
    assert np.isnan(lesion[0]) and np.isnan(control[0])  # empty mask
    assert not np.isnan(lesion[1]) and np.isnan(control[1])
    with pytest.raises(ValueError, match="masks shape"):
        M.lesion_occlusion(model, torch.ones(2, 3, 8, 8), masks[:1], [1, 1], patch=2)
    with pytest.raises(ValueError, match="controls"):
        M.lesion_occlusion(model, torch.ones(2, 3, 8, 8), masks, [1, 1], patch=2, controls=0)


def test_deletion_says_no_to_a_map_that_ranks_what_the_model_reads_last():
    """AUDC, hand-computed: a model reading only the top-left quadrant; the map ranking its 4 cells
    first loses a quarter of the evidence per step, the map ranking them last loses nothing."""
    model = _QuadrantModel((slice(0, 4), slice(0, 4)))
    image = torch.ones(1, 3, 8, 8)
    reads = np.zeros((8, 8))
    reads[:4, :4] = 1.0
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = np.array([sigmoid(10 - 2.5 * s) / sigmoid(10) for s in range(5)])
    faithful = M.deletion_curve(model, image, reads, 1, patch=2, steps=4)
    np.testing.assert_allclose(faithful, expected, atol=1e-6)
    assert M.audc(faithful) == pytest.approx(np.sum((expected[1:] + expected[:-1]) * 0.25) / 2, abs=1e-6)
    elsewhere = M.deletion_curve(model, image, 1.0 - reads, 1, patch=2, steps=4)
    np.testing.assert_allclose(elsewhere, 1.0, atol=1e-6)  # 4 cells outside the quadrant: nothing lost
    assert M.audc(elsewhere) == pytest.approx(1.0, abs=1e-6) and M.audc(faithful) < M.audc(elsewhere) - 0.05
