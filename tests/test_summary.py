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


def test_a_run_that_found_everything_committed_says_so_not_in_0_out_0():
    resumed = StageSummary("merge", units_skipped=5, seconds=0.2, held=19)
    resumed.notes["files read by an earlier run, not read again"] += 19
    head, note = resumed.format().splitlines()
    assert head == "[merge] nothing to do: 5 units already committed, the store holds 19 rows"
    assert note == "    note: files read by an earlier run, not read again: 19"
    # Without the count of what is held, and with units run, the usual line.
    assert StageSummary("ingest").format() == "[ingest] nothing to do"
    ran = StageSummary("merge", inputs=4, outputs=4, units_run=1, units_skipped=2, held=12)
    assert ran.format().startswith("[merge] in 4  out 4  ")
    assert ran.format().endswith("units run 1 skipped 2  0.0s  0.0 items/s  held 12")
