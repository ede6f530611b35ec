"""Stage summaries: what was lost apart from what was done, and passes folded together."""

from collections import Counter

from engine.summary import StageSummary


def test_two_passes_fold_into_one_summary_with_drops_apart_from_notes():
    old = StageSummary("merge", inputs=8, outputs=8, units_run=2, seconds=1.5)
    old.dropped["region: duplicate"] += 3
    new = StageSummary("merge", inputs=4, outputs=4, units_run=1, units_skipped=1, seconds=0.5)
    new.notes["region: polygons attached"] += 2
    old.add(new)
    assert (old.inputs, old.outputs, old.units_run, old.units_skipped) == (12, 12, 3, 1)
    assert old.seconds == 2.0
    assert old.dropped == Counter({"region: duplicate": 3})
    assert old.notes == Counter({"region: polygons attached": 2})
    text = old.format()
    assert "dropped 3" in text.splitlines()[0]
    assert "    note: region: polygons attached: 2" in text
