"""What a stage reports when it ends: counts in and out, refusals by reason, speed.

``dropped`` counts only what was set aside (a record, an annotation or a text that the
output does not carry, each with its reason); ``notes`` counts things done that lose
nothing (a box clipped to its image, polygons attached to a matching box, a batch
halved after running out of memory), so "dropped N" is what was really lost.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class StageSummary:
    stage: str
    inputs: int = 0
    outputs: int = 0
    # Inputs refused into quarantine/, by reason.
    quarantined: Counter[str] = field(default_factory=Counter)
    # Records or annotations a step set aside (dropped/ or counted), by reason.
    dropped: Counter[str] = field(default_factory=Counter)
    # Things a step did that lose nothing, by what was done.
    notes: Counter[str] = field(default_factory=Counter)
    # Units skipped because an earlier run had committed them.
    units_skipped: int = 0
    units_run: int = 0
    seconds: float = 0.0
    # Where the stage's main output lives, for the closing message.
    location: str = ""
    # Rows the store holds in that output (``Store.committed_rows``), set by the stage on
    # its folded summary (``add`` leaves it): a rerun that found everything committed
    # says what is there, not "out 0".
    held: int | None = None

    def add(self, other: StageSummary) -> None:
        """Fold another summary into this one: a unit's, or another pass of the stage (a
        refine round annotates and merges in two passes, old images and new)."""
        self.inputs += other.inputs
        self.outputs += other.outputs
        self.quarantined.update(other.quarantined)
        self.dropped.update(other.dropped)
        self.notes.update(other.notes)
        self.units_run += other.units_run
        self.units_skipped += other.units_skipped
        self.seconds += other.seconds

    def format(self) -> str:
        if self.units_run == 0 and self.inputs == 0:
            # A resumed run with everything committed: zero counts and rates would read
            # as a stage that lost its input.
            head = f"[{self.stage}] nothing to do"
            if self.units_skipped:
                head += f": {self.units_skipped} units already committed"
            if self.held is not None:
                head += f", the store holds {self.held} rows"
        else:
            rate = self.inputs / self.seconds if self.seconds > 0 else 0.0
            head = (
                f"[{self.stage}] in {self.inputs}  out {self.outputs}  "
                f"quarantined {sum(self.quarantined.values())}  "
                f"dropped {sum(self.dropped.values())}  "
                f"units run {self.units_run} skipped {self.units_skipped}  "
                f"{self.seconds:.1f}s  {rate:.1f} items/s"
            )
            if self.held is not None:
                head += f"  held {self.held}"
        lines = [head]
        for label, counts in (
            ("quarantined", self.quarantined),
            ("dropped", self.dropped),
            ("note", self.notes),
        ):
            for reason, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"    {label}: {reason}: {count}")
        if self.location:
            lines.append(f"    -> {self.location}")
        return "\n".join(lines)
