from engine.geometry import box_in_image, clip_box, clip_points


def test_boxes_are_clipped_to_the_image_or_refused():
    assert box_in_image((-5, -5, 30, 50), 20, 40) == (0, 0, 20, 40)
    assert box_in_image((25, 5, 30, 10), 20, 40) is None  # wholly outside
    assert box_in_image((5, 5, 5, 10), 20, 40) is None  # no width
    assert box_in_image((float("nan"), 0, 5, 5), 20, 40) is None
    assert clip_box((-1, 2, 25, 50), 20, 40) == (0, 2, 20, 40)


def test_points_clip_per_axis():
    assert clip_points([-3, 50, 25, -1, 10, 10], 20, 40) == [0, 40, 20, 0, 10, 10]
