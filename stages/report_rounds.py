"""The report's view across rounds: every round so far side by side, and quality by round.

Read from small files only (round state, commit markers, ``student.json``,
``quality.json``), so a report of round 30 costs no more than one of round 1.
"""

from __future__ import annotations

import io

from engine.layout import round_layout
from engine.round_state import read_round_state, started_rounds
from engine.store import Store, records_dataset
from stages.report_stats import StatTable

# Headline rows of quality.json plotted and tabled per round (the round as kept: the
# last evaluation point).
QUALITY_ROWS = ("box AP50", "box P @.5", "box R @.5", "grounding R")
# Shares of annotations against the parent round (churn.json, refinement/churn.py).
CHURN = ("added", "changed", "retired")


def round_quality_values(
    store: Store, number: int, rows: tuple[str, ...] = QUALITY_ROWS
) -> dict[str, float]:
    """The headline ``rows`` of a round as kept (quality.json's last evaluation point), by
    row label; empty without quality.json, and a row without a value is left out."""
    quality = store.read_json(round_layout(number).quality)
    if quality is None:
        return {}
    values = {row[0]: row[-1] for row in quality["rows"]}
    return {name: float(values[name]) for name in rows if values.get(name, "-") != "-"}


def rounds_table(store: Store, up_to: int) -> StatTable:
    """One row per round with a state, up to ``up_to``: state, parent, records, the
    student's verdict and the headline quality."""
    rows = []
    for number in [n for n in started_rounds(store) if n <= up_to]:
        state = read_round_state(store, number)
        student = store.read_json(round_layout(number).student_report)
        verdict = "-" if student is None else "accepted" if student["accepted"] else "refused"
        policy = store.read_json(round_layout(number).policy)
        merged = "-" if policy is None else accepted_families(policy) or "none"
        quality = round_quality_values(store, number)
        churn = store.read_json(round_layout(number).churn) or {}
        rows.append(
            (
                round_layout(number).name,
                state.status,
                "-" if state.parent is None else round_layout(state.parent).name,
                store.committed_rows(records_dataset(store, number)),
                verdict,
                merged,
                *(churn.get(name) for name in CHURN),
                *(quality.get(name) for name in QUALITY_ROWS),
            )
        )
    columns = ["round", "status", "parent", "records", "student", "merged", *CHURN]
    columns += QUALITY_ROWS
    return StatTable(
        "rounds",
        "Rounds so far",
        columns,
        rows,
        note="records: the round's kept records; student: whether its Florence-2 student "
        "passed the image check (student.json); merged: the task families of its output "
        "the merge policy took (policy.json); added, changed, retired: shares of "
        "annotations against the parent round (churn.json); quality: against ground "
        "truth where a round was scored (quality.json), the round as kept",
    )


def accepted_families(policy: dict) -> str:
    return ", ".join(name for name, family in policy["families"].items() if family["accepted"])


def policy_table(store: Store, round_number: int) -> StatTable | None:
    """The merge policy's decision of a refinement round, one row per task family of the
    student's output; None for a round without one (round 0)."""
    policy = store.read_json(round_layout(round_number).policy)
    if policy is None:
        return None
    rows = [
        (name, f["figure"], f["images"], f["parent"], f["student"], f["accepted"], f["reason"])
        for name, f in policy["families"].items()
    ]
    columns = ["family", "figure", "images", "parent", "student", "accepted", "reason"]
    return StatTable(
        "policy",
        "What the round took from its student",
        columns,
        rows,
        note=f"measured on {policy['validation_images']} held-out human-labelled images "
        "the student never trained on: the family's figure for the parent round's "
        "annotations and for them with the student's output merged in (policy.json); "
        "no row: the student was refused by its image check",
    )


def quality_by_round_png(store: Store, up_to: int) -> bytes | None:
    """Quality against round, one line per headline metric; None with fewer than two
    scored rounds."""
    scored = {
        n: values
        for n in started_rounds(store)
        if n <= up_to and (values := round_quality_values(store, n))
    }
    if len(scored) < 2:
        return None
    # Imported here: status reads quality through this module and draws nothing.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 3.4), dpi=100, layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for name in QUALITY_ROWS:
        points = [(n, v[name]) for n, v in scored.items() if name in v]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=name)
    axes.set_title("Quality against ground truth by round")
    axes.set_xlabel("round")
    axes.set_xticks(sorted(scored))
    axes.legend(fontsize=8)
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()
