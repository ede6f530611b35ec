"""engine.geometry against hand-computed values, and the scalar IoU against the array one."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.geometry import (
    all_finite,
    box_area,
    box_in_image,
    boxes_array,
    clip_box,
    clip_points,
    intersection,
    iou,
    is_valid_polygon,
    pairwise_iou,
)
from engine.records import Region

# ---------------------------------------------------------------- validity


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ((0, 1.5, -2, 1e300), True),
        ((), True),
        ([np.float32(1.0), np.int64(3)], True),
        ((0, math.nan), False),
        ((math.inf, 0), False),
        ((0, -math.inf), False),
        ([np.float32("nan")], False),
        # What a JSON file can hold besides numbers: not finite, and no exception.
        ((0, "1"), False),
        ((0, None), False),
        ((0, [1]), False),
    ],
)
def test_all_finite(values, expected):
    assert all_finite(values) is expected


@pytest.mark.parametrize(
    ("coords", "expected"),
    [
        ([0, 0, 10, 0, 10, 10], True),  # a triangle
        ([0, 0, 10, 0, 10, 10, 0, 10], True),
        ([0, 0, 10, 0], False),  # two vertices
        ([0, 0, 10, 0, 10], False),  # odd count
        ([0, 0, 10, 0, 10, 10, 5], False),
        ([0, 0, 10, 0, 10, math.nan], False),
        ([0, 0, 10, 0, 10, "10"], False),
        ([], False),
    ],
)
def test_is_valid_polygon(coords, expected):
    assert is_valid_polygon(coords) is expected


# ---------------------------------------------------------------- areas and overlap


def test_box_area():
    assert box_area((1, 2, 4, 6)) == 12
    assert box_area((5, 5, 5, 9)) == 0  # no width
    assert box_area((4, 2, 1, 6)) == 0  # inverted: nothing, not a negative area
    assert box_area((1, 6, 4, 2)) == 0


def test_intersection():
    assert intersection((0, 0, 10, 10), (5, 5, 15, 15)) == 25
    assert intersection((0, 0, 10, 10), (2, 3, 4, 5)) == 4  # one inside the other
    assert intersection((0, 0, 10, 10), (10, 0, 20, 10)) == 0  # touching edges
    assert intersection((0, 0, 10, 10), (20, 20, 30, 30)) == 0


def test_iou_by_hand():
    assert iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert iou((0, 0, 10, 10), (0, 0, 5, 10)) == pytest.approx(0.5)
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    # Empty boxes overlap nothing, even themselves: no division by zero.
    assert iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0
    # An inverted box has no area: the IoU is 0, not the garbage of signed areas.
    assert iou((10, 10, 0, 0), (0, 0, 10, 10)) == 0.0


def test_pairwise_iou_by_hand():
    a = [(0, 0, 10, 10), (5, 5, 15, 15)]
    b = [(0, 0, 10, 10), (20, 20, 30, 30), (0, 0, 5, 10), (3, 3, 3, 3)]
    expected = [[1.0, 0.0, 0.5, 0.0], [25 / 175, 0.0, 0.0, 0.0]]
    got = pairwise_iou(np.array(a), np.array(b))
    assert got.shape == (2, 4)
    assert got == pytest.approx(np.array(expected))
    # One box of shape (4,) is one row; no boxes give an empty side.
    assert pairwise_iou(a[1], a) == pytest.approx(np.array([[25 / 175, 1.0]]))
    assert pairwise_iou(np.empty((0, 4)), np.array(b)).shape == (0, 4)
    assert pairwise_iou(np.array(a), []).shape == (2, 0)


coordinate = st.floats(-50, 150, allow_nan=False, allow_infinity=False)
any_box = st.tuples(coordinate, coordinate, coordinate, coordinate)  # inverted ones too


@given(st.lists(any_box, max_size=6), st.lists(any_box, max_size=6))
def test_pairwise_iou_equals_the_scalar_iou(a, b):
    got = pairwise_iou(np.array(a).reshape(-1, 4), np.array(b).reshape(-1, 4))
    assert got.tolist() == [[iou(x, y) for y in b] for x in a]


@given(any_box, any_box)
def test_iou_is_symmetric_and_within_0_and_1(a, b):
    assert iou(a, b) == iou(b, a)
    assert 0.0 <= iou(a, b) <= 1.0


def test_boxes_array():
    regions = [Region((0, 1, 2, 3), "a", "object", "s"), Region((4, 5, 6, 7), "b", "ocr", "s")]
    array = boxes_array(regions)
    assert array.dtype == np.float64
    assert array.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert boxes_array([]).shape == (0, 4)


# ---------------------------------------------------------------- clipping to the image


def test_boxes_are_clipped_to_the_image_or_refused():
    assert box_in_image((-5, -5, 30, 50), 20, 40) == (0, 0, 20, 40)
    assert box_in_image((25, 5, 30, 10), 20, 40) is None  # wholly outside
    assert box_in_image((5, 5, 5, 10), 20, 40) is None  # no width
    assert box_in_image((float("nan"), 0, 5, 5), 20, 40) is None
    assert clip_box((-1, 2, 25, 50), 20, 40) == (0, 2, 20, 40)


def test_points_clip_per_axis():
    assert clip_points([-3, 50, 25, -1, 10, 10], 20, 40) == [0, 40, 20, 0, 10, 10]
