"""The caption decision on stored statistics: no parse, only numbers and thresholds."""

import pytest

from engine.records import TextStats
from filters.text import (
    LOW_ACTION_COMPLEXITY,
    LOW_OBJECT_COMPLEXITY,
    TOO_MANY_OBJECTS,
    caption_decision,
)

# Stored statistics of "A man riding a horse on a beach." (see test_text_stats.py).
RIDER = TextStats(
    objects=["man", "horse", "beach"],
    actions=["riding"],
    object_complexity=2.0,
    action_complexity=3.0,
)
# "A stop sign on a street corner": no verb.
STOP_SIGN = TextStats(objects=["stop sign", "street corner"], object_complexity=3.0)


def test_no_thresholds_keep_everything():
    assert caption_decision(RIDER) == (True, None)
    assert caption_decision(TextStats()) == (True, None)


@pytest.mark.parametrize(
    ("thresholds", "expected"),
    [
        ({"max_objects": 3}, (True, None)),
        ({"max_objects": 2}, (False, TOO_MANY_OBJECTS)),
        ({"min_object_complexity": 2.0}, (True, None)),
        ({"min_object_complexity": 2.5}, (False, LOW_OBJECT_COMPLEXITY)),
        ({"min_action_complexity": 3.0}, (True, None)),
        ({"min_action_complexity": 3.5}, (False, LOW_ACTION_COMPLEXITY)),
        # Every test fails: the first one, in argument order, gives the reason.
        (
            {"max_objects": 1, "min_object_complexity": 9, "min_action_complexity": 9},
            (False, TOO_MANY_OBJECTS),
        ),
        ({"min_object_complexity": 9, "min_action_complexity": 9}, (False, LOW_OBJECT_COMPLEXITY)),
    ],
)
def test_thresholds(thresholds, expected):
    assert caption_decision(RIDER, **thresholds) == expected


def test_action_complexity_only_judges_captions_with_actions():
    assert caption_decision(STOP_SIGN, min_action_complexity=2.0) == (True, None)
    with_action = TextStats(objects=["dog"], actions=["runs"], action_complexity=1.0)
    assert caption_decision(with_action, min_action_complexity=2.0) == (
        False,
        LOW_ACTION_COMPLEXITY,
    )


def test_a_caption_without_objects_fails_a_positive_object_complexity():
    assert caption_decision(TextStats(), min_object_complexity=1.0) == (
        False,
        LOW_OBJECT_COMPLEXITY,
    )
    assert caption_decision(TextStats(), min_object_complexity=0.0) == (True, None)


def test_thresholds_per_caption_kind():
    # The same detailed-looking statistics pass the thresholds of a more detailed caption
    # and fail those of a brief one.
    stats = TextStats(objects=[f"object{i}" for i in range(12)], object_complexity=3.5)
    brief = {"max_objects": 8, "min_object_complexity": 1.5}
    more_detailed = {"max_objects": 60, "min_object_complexity": 2.5}
    assert caption_decision(stats, **brief) == (False, TOO_MANY_OBJECTS)
    assert caption_decision(stats, **more_detailed) == (True, None)
