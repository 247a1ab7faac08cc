"""Box / Point / Polygon / Mask geometry and mask <-> boxes, pinned on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from annotations.geometry import (
    Box,
    Mask,
    Point,
    Polygon,
    boxes_to_mask,
    decode_rle,
    encode_rle,
    geometry_from_json,
    mask_bounds,
    mask_to_boxes,
    snap,
)


def test_box_conversions_hand_computed():
    # COCO / RSNA x, y, w, h -> exclusive end
    assert Box.from_xywh(637, 276, 188, 282) == Box(637, 276, 825, 558)
    assert Box(637, 276, 825, 558).to_xywh() == (637, 276, 188, 282)
    # inclusive pixel indices (OCT derived boxes): columns 31..39 are 9 pixels wide
    box = Box.from_inclusive(31, 217, 39, 227)
    assert (box.x0, box.x1, box.width, box.height) == (31, 40, 9, 11)
    assert box.to_inclusive() == (31, 217, 39, 227)
    # YOLO on a 200 x 100 image: centre (0.5, 0.25), size (0.1, 0.2) -> x 90..110, y 15..35
    assert Box.from_yolo(0.5, 0.25, 0.1, 0.2, 200, 100) == Box(90, 15, 110, 35)
    assert Box(90, 15, 110, 35).to_yolo(200, 100) == pytest.approx((0.5, 0.25, 0.1, 0.2), abs=1e-15)
    assert Box(0, 0, 4, 2).area == 8


def test_box_rejects_negative_size_and_nan():
    with pytest.raises(ValueError, match="negative size"):
        Box(5, 0, 4, 1)
    with pytest.raises(ValueError, match="finite"):
        Box(float("nan"), 0, 1, 1)


def test_snap_keeps_float32_values_and_makes_sums_exact():
    value = float(np.float32(381.8337097167969))
    assert snap(value) == value
    # float32 values >= 1 are on the 2**-24 grid already: COCO x + w - x gives w back exactly
    x, w = float(np.float32(126.8733901977539)), float(np.float32(44.565773010253906))
    box = Box.from_xywh(x, w, w, x)
    assert box.to_xywh() == (x, w, w, x)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 4000), st.integers(0, 4000), st.integers(1, 500), st.integers(1, 500),
       st.integers(600, 5000), st.integers(600, 5000))
def test_yolo_round_trip_is_exact_after_first_conversion(x, y, w, h, width, height):
    first = Box(x / 7, y / 3, x / 7 + w / 11, y / 3 + h)
    again = Box.from_yolo(*first.to_yolo(width, height), width, height)
    assert again == first


def test_box_to_mask_uses_pixel_centres():
    mask = Box(1, 0, 3, 2).to_mask(3, 4)
    expected = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], bool)
    assert np.array_equal(mask, expected)
    # a half-pixel box covers the pixels whose centre it contains
    assert Box(0.6, 0, 1.4, 1).to_mask(1, 3).tolist() == [[False, False, False]]
    assert Box(0.6, 0, 1.6, 1).to_mask(1, 3).tolist() == [[False, True, False]]
    assert Box(0.4, 0, 1.6, 1).to_mask(1, 3).tolist() == [[True, True, False]]


def test_mask_to_boxes_connectivity_hand_case():
    mask = np.zeros((6, 7), bool)
    mask[1:3, 1:3] = True          # 2x2 block
    mask[3, 3] = True              # touches the block only diagonally
    mask[5, 6] = True              # single pixel far away
    eight = mask_to_boxes(mask)
    assert eight == [Box(1, 1, 4, 4), Box(6, 5, 7, 6)]
    four = mask_to_boxes(mask, connectivity=4)
    assert four == [Box(1, 1, 3, 3), Box(3, 3, 4, 4), Box(6, 5, 7, 6)]
    assert mask_to_boxes(mask, min_pixels=2) == [Box(1, 1, 4, 4)]
    assert mask_bounds(mask) == Box(1, 1, 7, 6)
    assert mask_bounds(np.zeros((3, 3), bool)) is None
    assert np.array_equal(boxes_to_mask(eight, 6, 7) & mask, mask)


@settings(max_examples=100, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 20), st.integers(1, 20))))
def test_rle_round_trip(mask):
    assert np.array_equal(decode_rle(encode_rle(mask), mask.shape), mask)
    restored = geometry_from_json("mask", Mask(mask).to_json())
    assert restored == Mask(mask)


def test_rle_size_mismatch_is_an_error():
    code = encode_rle(np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="covers 4 pixels"):
        decode_rle(code, (3, 3))


def test_polygon_and_point():
    square = Polygon(((1, 1), (3, 1), (3, 3), (1, 3)))
    assert square.bounds() == Box(1, 1, 3, 3)
    assert np.array_equal(square.to_mask(4, 4), Box(1, 1, 3, 3).to_mask(4, 4))
    assert geometry_from_json("polygon", square.to_json()) == square
    assert geometry_from_json("point", Point(2.5, 4).to_json()) == Point(2.5, 4)
    with pytest.raises(ValueError, match="at least 3"):
        Polygon(((0, 0), (1, 1)))
    with pytest.raises(ValueError, match="unknown annotation kind"):
        geometry_from_json("ellipse", {})


def test_polygon_mask_triangle_hand_case():
    # right triangle (0,0) (4,0) (0,4): pixel centres with x + y < 4 are inside
    tri = Polygon(((0, 0), (4, 0), (0, 4)))
    expected = np.array([[x + 0.5 + y + 0.5 < 4 for x in range(5)] for y in range(5)])
    assert np.array_equal(tri.to_mask(5, 5), expected)
