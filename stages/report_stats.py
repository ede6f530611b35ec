"""The report's numbers, computed with DuckDB over a round's records.

``connect`` gives a DuckDB connection the records (in the layout of ``engine.records``):
Parquet parts, which DuckDB reads column by column as each query needs them, or an
Arrow table. It lays them out long: one row per caption, per region, per grounded
phrase. ``record_stats`` runs every query on a batch of committed parts at a time
(``engine.duck.PARTS_PER_READ``) and adds the results up: each query returns counts and
sums, never averages, and a dataset's units hold disjoint images, so the totals are
those of one query over all of it while the driver holds one batch's working set,
however large the dataset.

Tokens are whitespace-separated words throughout. The paper does not name the tokenizer
behind its "#Avg Tokens"; words keep the figures independent of any model's vocabulary
and close to what a reader counts by eye.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import fsspec
import pyarrow as pa

from engine.duck import part_batches, view_parts
from engine.records import CAPTION_KINDS, REGION_KINDS, TEXT_STATS_TYPE, ImageRecord
from filters.text import load_pipeline, text_stats
from stages.report_gallery import records_for

# FLD-5B figures published with Florence-2 (arXiv 2311.06242, Tables 2 and 3), as collected
# in FLD_REFERENCE.md §1. Figures the reference does not give are left out, not guessed.
FLD5B_CAPTION_TOKENS = {"brief": 7.95, "detailed": 31.65, "more_detailed": 70.53}
FLD5B_REGIONS_PER_IMAGE = 5.42
FLD5B_REGIONS_PER_GROUNDED_CAPTION = {"brief": 4.27, "detailed": 10.25, "more_detailed": 10.17}
FLD5B_TEXT_STATS: dict[str, dict[str, float]] = {
    "brief": {
        "objects": 3.23, "attributes": 2.80, "actions": 0.58, "proper_nouns": 1.10,
        "object_complexity": 2.80, "action_complexity": 1.14,
    },
    "detailed": {
        "objects": 13.31, "attributes": 7.27, "actions": 4.21, "proper_nouns": 2.40,
        "object_complexity": 4.00, "action_complexity": 3.63,
    },
    "more_detailed": {
        "objects": 28.06, "attributes": 16.25, "actions": 8.76, "proper_nouns": 2.41,
        "object_complexity": 4.02, "action_complexity": 4.38,
    },
}  # fmt: skip
TEXT_STAT_NAMES = tuple(FLD5B_TEXT_STATS["brief"])

# A column named ``<metric>_fld5b`` holds the paper's figure for the column ``<metric>``.
PAPER_SUFFIX = "_fld5b"


@dataclass
class StatTable:
    """One table of the report: ``rows`` are tuples in the order of ``columns``."""

    name: str
    title: str
    columns: list[str]
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "note": self.note,
            "columns": self.columns,
            "rows": [dict(zip(self.columns, row, strict=True)) for row in self.rows],
        }


_CAPTIONS_VIEW = " UNION ALL ".join(
    f"SELECT image_id, '{kind}' AS kind, captions.{kind}.text AS text, "
    f"captions.{kind}.source AS source, captions.{kind}.stats AS stats "
    f"FROM records WHERE captions.{kind} IS NOT NULL"
    for kind in CAPTION_KINDS
)


def connect(
    records: pa.Table | Sequence[str], filesystem: fsspec.AbstractFileSystem | None = None
) -> duckdb.DuckDBPyConnection:
    """A connection holding ``records`` (a table, or the URLs of Parquet parts, read
    through ``filesystem`` where DuckDB cannot read them itself) and its long views:
    captions, regions, phrases."""
    con = duckdb.connect()
    if isinstance(records, pa.Table):
        con.register("records", records)
    else:
        view_parts(con, "records", records, filesystem)
    con.execute(
        r"CREATE MACRO ntokens(t) AS "
        r"CASE WHEN trim(t) = '' THEN 0 ELSE len(string_split_regex(trim(t), '\s+')) END"
    )
    con.execute(f"CREATE VIEW captions AS {_CAPTIONS_VIEW}")
    con.execute(
        "CREATE VIEW regions AS SELECT image_id, width, height, unnest(regions) AS r FROM records"
    )
    con.execute("CREATE VIEW phrases AS SELECT image_id, unnest(phrases) AS p FROM records")
    return con


Sums = dict[Any, list[float]]


def _add(totals: Sums, rows: list[tuple[Any, ...]], keys: int = 1) -> None:
    """Add query rows (``keys`` key columns, then counts and sums) into ``totals``; a
    NULL sum (of no rows) adds nothing."""
    for row in rows:
        key = row[0] if keys == 1 else tuple(row[:keys])
        values = [value or 0 for value in row[keys:]]
        if key in totals:
            totals[key] = [a + b for a, b in zip(totals[key], values, strict=True)]
        else:
            totals[key] = values


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


_ANNOTATION_COLUMNS = [
    "annotation", "text_type", "images", "annotations", "avg_tokens", "avg_tokens" + PAPER_SUFFIX,
    "regions", "avg_regions", "avg_regions" + PAPER_SUFFIX, "avg_region_tokens",
]  # fmt: skip


def _annotation_row(
    annotation: str,
    kind: str,
    images: int,
    annotations: int,
    tokens: float | None = None,
    paper_tokens: float | None = None,
    regions: int | None = None,
    paper_regions: float | None = None,
    region_tokens: float | None = None,
) -> tuple[Any, ...]:
    avg_regions = None if regions is None else _ratio(regions, images)
    return (
        annotation, kind, images, annotations, tokens, paper_tokens,
        regions, avg_regions, paper_regions, region_tokens,
    )  # fmt: skip


# Per kind: images carrying it (a unit's records are its own images, so these add up
# across batches), annotations, their words.
_CAPTION_SUMS = (
    "SELECT kind, count(DISTINCT image_id), count(*), sum(ntokens(text)) FROM captions "
    "GROUP BY kind"
)
_REGION_SUMS = (
    "SELECT r.kind, count(DISTINCT image_id), count(*), sum(ntokens(r.text)) FROM regions "
    "GROUP BY r.kind"
)
# A grounded caption is a caption with at least one grounded phrase; its regions are the
# phrase-region links, as in the paper's text-phrase-region triplets. Per caption kind:
# grounded captions, phrases, caption words, links, phrase words.
_TRIPLET_SUMS = """
    WITH grounded AS (
        SELECT image_id, p.caption AS kind, count(*) AS phrases,
               sum(len(p.regions)) AS links, sum(ntokens(p.text)) AS phrase_tokens
        FROM phrases GROUP BY ALL
    )
    SELECT g.kind, count(*), sum(g.phrases), sum(ntokens(c.text)), sum(g.links),
           sum(g.phrase_tokens)
    FROM grounded g JOIN captions c USING (image_id, kind) GROUP BY g.kind
"""


def annotation_table(texts: Sums, regions: Sums, triplets: Sums) -> StatTable:
    """FLD-5B Table 2 for these records, from the totals of ``_CAPTION_SUMS``,
    ``_REGION_SUMS`` and ``_TRIPLET_SUMS``: one row per annotation type and text type."""
    table = StatTable(
        name="annotations",
        title="Annotations (FLD-5B Table 2)",
        columns=_ANNOTATION_COLUMNS,
        note=(
            "images: images carrying the annotation; annotations: captions, regions or "
            "grounded phrases; avg tokens: words per caption; regions: boxes (for "
            "text-phrase-region: phrase-to-box links); avg regions: regions per image that "
            "carries the annotation (per grounded caption for text-phrase-region); avg region "
            "tokens: words per region text or grounded phrase. FLD-5B region texts average "
            "1.19 tokens for category phrases and 2.55 for brief region descriptions; the "
            "records do not tell the two apart, so no figure stands beside the object row."
        ),
    )
    for kind in CAPTION_KINDS:
        images, count, tokens = texts.get(kind, (0, 0, 0))
        table.rows.append(
            _annotation_row(
                "text", kind, images, count, _ratio(tokens, count), FLD5B_CAPTION_TOKENS[kind]
            )
        )
    for kind in REGION_KINDS:
        images, count, tokens = regions.get(kind, (0, 0, 0))
        table.rows.append(
            _annotation_row(
                "region-text",
                kind,
                images,
                count,
                regions=count,
                region_tokens=_ratio(tokens, count),
                paper_regions=FLD5B_REGIONS_PER_IMAGE if kind == "object" else None,
            )
        )
    for kind in CAPTION_KINDS:
        images, phrases, tokens, links, phrase_tokens = triplets.get(kind, (0, 0, 0, 0, 0))
        table.rows.append(
            _annotation_row(
                "text-phrase-region",
                kind,
                images,
                phrases,
                _ratio(tokens, images),
                regions=links,
                paper_regions=FLD5B_REGIONS_PER_GROUNDED_CAPTION[kind],
                region_tokens=_ratio(phrase_tokens, phrases),
            )
        )
    return table


_PARSED_SCHEMA = pa.schema(
    [pa.field("image_id", pa.string()), pa.field("kind", pa.string()), ("stats", TEXT_STATS_TYPE)]
)


def parse_missing_stats(con: duckdb.DuckDBPyConnection, spacy_model: str) -> int:
    """Parse the captions that carry no stored ``stats``; register them as ``parsed``.

    The spaCy pipeline is loaded only when some caption needs it. Returns how many
    captions were parsed.
    """
    missing = con.sql(
        "SELECT image_id, kind, text FROM captions WHERE stats IS NULL ORDER BY image_id, kind"
    ).fetchall()
    stats = (
        text_stats(load_pipeline(spacy_model), [text for _, _, text in missing]) if missing else []
    )
    rows = [
        {"image_id": image_id, "kind": kind, "stats": dataclasses.asdict(s)}
        for (image_id, kind, _), s in zip(missing, stats, strict=True)
    ]
    con.register("parsed", pa.Table.from_pylist(rows, schema=_PARSED_SCHEMA))
    return len(rows)


# Per caption kind, once ``parse_missing_stats`` ran: captions, parsed now, the sums of
# the four counts, then each complexity's sum and how many captions have one.
_TEXT_SUMS = f"""
    WITH stats AS (
        SELECT c.kind, coalesce(c.stats, p.stats) AS s, c.stats IS NULL AS parsed_now
        FROM captions c LEFT JOIN parsed p USING (image_id, kind)
    )
    SELECT kind, count(*), count(*) FILTER (WHERE parsed_now),
           {", ".join(f"sum(len(s.{name}))" for name in TEXT_STAT_NAMES[:4])},
           sum(s.object_complexity) FILTER (WHERE len(s.objects) > 0),
           count(*) FILTER (WHERE len(s.objects) > 0),
           sum(s.action_complexity) FILTER (WHERE len(s.actions) > 0),
           count(*) FILTER (WHERE len(s.actions) > 0)
    FROM stats GROUP BY kind
"""


def text_table(sums: Sums) -> StatTable:
    """FLD-5B Table 3 from the totals of ``_TEXT_SUMS``: per caption kind, mean counts
    and complexities per caption.

    A complexity is averaged over the captions that have at least one object (action): a
    caption with none has no complexity to speak of, and counting it as 0 would mix
    "short" with "simple".
    """
    columns = ["caption", "captions", "parsed_now"]
    for name in TEXT_STAT_NAMES:
        columns += [name, name + PAPER_SUFFIX]
    table = StatTable(
        name="text",
        title="Caption text (FLD-5B Table 3)",
        columns=columns,
        note=(
            "Means per caption of a spaCy parse (filters/text.py): objects, attributes, "
            "actions and proper nouns per caption; complexity = mean degree of object (action) "
            "tokens in the dependency tree, averaged over captions that have any. "
            "parsed now: captions without stored stats, parsed for this report."
        ),
    )
    for kind in CAPTION_KINDS:
        count, parsed, *counts, objects, with_objects, actions, with_actions = sums.get(
            kind, [0] * 10
        )
        values = [_ratio(total, count) for total in counts]
        values += [_ratio(objects, with_objects), _ratio(actions, with_actions)]
        row: list[Any] = [kind, count, parsed]
        for name, value in zip(TEXT_STAT_NAMES, values, strict=True):
            row += [value, FLD5B_TEXT_STATS[kind][name]]
        table.rows.append(tuple(row))
    return table


_SOURCE_SUMS = """
    SELECT 'image' AS annotation, '' AS kind, source, count(*) AS n FROM records GROUP BY ALL
    UNION ALL SELECT 'caption', kind, source, count(*) FROM captions GROUP BY ALL
    UNION ALL SELECT 'region', r.kind, r.source, count(*) FROM regions GROUP BY ALL
    UNION ALL SELECT 'phrase', p.caption, p.source, count(*) FROM phrases GROUP BY ALL
"""


def source_table(sums: Sums) -> StatTable:
    """Images by input source, and annotations by the specialist (lineage) that made them,
    from the totals of ``_SOURCE_SUMS``."""
    rows = sorted(
        ((*key, int(n)) for key, (n,) in sums.items()),
        key=lambda row: (row[0], row[1], -row[3], row[2]),
    )
    return StatTable("sources", "Counts by source", ["annotation", "kind", "source", "count"], rows)


# What each refused dataset's table counts by reason: the quarantine its inputs by item
# and reason; the dropped dataset counts as the filter stage counts in its summary, an
# image for an ``image:`` reason, else the annotations the row sets aside.
_DROPPED_COUNT = " + ".join(
    [
        "coalesce(len(regions), 0)",
        "coalesce(len(phrases), 0)",
        *(f"(captions.{kind}.text IS NOT NULL)::INTEGER" for kind in CAPTION_KINDS),
    ]
)
REFUSAL_SUMS = {
    "quarantine": "SELECT item, reason, count(*) FROM refused GROUP BY ALL",
    "dropped": (
        "SELECT reason, sum(CASE WHEN starts_with(reason, 'image:') THEN 1 "
        f"ELSE {_DROPPED_COUNT} END) FROM refused GROUP BY ALL"
    ),
}


def reason_table(
    parts: Sequence[str],
    filesystem: fsspec.AbstractFileSystem | None,
    name: str,
    title: str,
) -> StatTable:
    """Counts by reason of a refused dataset's committed ``parts`` (``name``: a key of
    ``REFUSAL_SUMS``), largest first, read a batch of parts at a time."""
    sums: Sums = {}
    query = REFUSAL_SUMS[name]
    keys = 2 if name == "quarantine" else 1
    for batch in part_batches(parts):
        with duckdb.connect() as con:
            view_parts(con, "refused", batch, filesystem)
            _add(sums, con.sql(query).fetchall(), keys)
    rows = [(*(key if keys > 1 else (key,)), int(n)) for key, (n,) in sums.items()]
    rows.sort(key=lambda row: (-row[-1], *row[:-1]))
    return StatTable(name, title, [*(["item"] if keys > 1 else []), "reason", "count"], rows)


# ---------------------------------------------------------------- histogram data


# Each series is a histogram's data as counts of values (value -> how many), computed in
# DuckDB: the driver holds a count per distinct value, never a value per caption or box.
Counts = dict[float, int]


def caption_tokens(con: duckdb.DuckDBPyConnection) -> dict[str, Counts]:
    """Words per caption, by caption kind."""
    rows = con.sql(
        "SELECT kind, ntokens(text) AS n, count(*) FROM captions GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    return _series(rows)


def regions_per_image(con: duckdb.DuckDBPyConnection) -> dict[str, Counts]:
    """Regions per image by region kind (images without any count as 0), and all kinds."""
    kinds = [("all", "len(coalesce(regions, []))")] + [
        (kind, f"len(list_filter(coalesce(regions, []), lambda x: x.kind = '{kind}'))")
        for kind in REGION_KINDS
    ]
    query = " UNION ALL ".join(
        f"SELECT '{name}' AS kind, {count} AS n, count(*) FROM records GROUP BY ALL"
        for name, count in kinds
    )
    rows = con.sql(f"SELECT * FROM ({query}) ORDER BY ALL").fetchall()
    return {name: counts for name, counts in _series(rows).items() if counts}


def relative_box_sizes(con: duckdb.DuckDBPyConnection, bins: int) -> dict[str, Counts]:
    """sqrt(box area / image area) per region, by kind, counted in ``bins`` equal bins
    of [0, 1] (each value the centre of its bin): a side length as a fraction of the
    image.

    The square root puts a box that is a tenth of the image's width and height at 0.1
    rather than 0.01, which spreads the many small boxes over the histogram. Boxes that
    reach past the image count as 1.
    """
    rows = con.sql(
        f"""
        SELECT kind, (least(floor(size * {bins}), {bins} - 1) + 0.5) / {bins}, count(*)
        FROM (
            SELECT r.kind AS kind,
                   least(1, sqrt(greatest(r.box[3] - r.box[1], 0)
                                 * greatest(r.box[4] - r.box[2], 0) / (width * height))) AS size
            FROM regions WHERE width > 0 AND height > 0 AND isfinite(list_sum(r.box))
        )
        GROUP BY ALL ORDER BY ALL
        """
    ).fetchall()
    return _series(rows)


def _series(rows: list[tuple[str, float, int]]) -> dict[str, Counts]:
    series: dict[str, Counts] = {}
    for name, value, count in rows:
        series.setdefault(name, {})[value] = count
    return series


def _add_counts(totals: dict[str, Counts], series: dict[str, Counts]) -> None:
    for name, counts in series.items():
        into = totals.setdefault(name, {})
        for value, count in counts.items():
            into[value] = into.get(value, 0) + count


# ---------------------------------------------------------------- all of it, batch by batch


@dataclass
class RecordStats:
    """What the report shows of a dataset's records."""

    rows: int
    # Distinct images: the records after a manifest's copies are set aside.
    images: int
    # Captions without stored stats, parsed for the report.
    parsed: int
    tables: list[StatTable]
    caption_tokens: dict[str, Counts]
    regions_per_image: dict[str, Counts]
    box_sizes: dict[str, Counts]
    # The gallery's records: those whose id has the smallest md5, which samples evenly
    # across units and input sources and is the same for the same records on every run.
    gallery: list[ImageRecord]


def record_stats(
    records: pa.Table | Sequence[str],
    filesystem: fsspec.AbstractFileSystem | None,
    spacy_model: str,
    box_bins: int,
    gallery_size: int,
) -> RecordStats:
    """The report's tables, histogram data and gallery records of ``records`` (a table,
    or a dataset's committed parts, read a batch at a time)."""
    counts = [0, 0, 0]
    texts: Sums = {}
    regions: Sums = {}
    triplets: Sums = {}
    text: Sums = {}
    sources: Sums = {}
    tokens: dict[str, Counts] = {}
    per_image: dict[str, Counts] = {}
    sizes: dict[str, Counts] = {}
    # (md5, image id) of the gallery's candidates so far, largest hash first, and their
    # records: one batch's newcomers are read, never more than ``gallery_size`` records.
    chosen: list[tuple[str, str]] = []
    chosen_records: dict[str, ImageRecord] = {}
    for batch in [records] if isinstance(records, pa.Table) else part_batches(records):
        with connect(batch, filesystem) as con:
            [(rows, images)] = con.sql(
                "SELECT count(*), count(DISTINCT image_id) FROM records"
            ).fetchall()
            parsed = parse_missing_stats(con, spacy_model)
            counts = [counts[0] + rows, counts[1] + images, counts[2] + parsed]
            _add(texts, con.sql(_CAPTION_SUMS).fetchall())
            _add(regions, con.sql(_REGION_SUMS).fetchall())
            _add(triplets, con.sql(_TRIPLET_SUMS).fetchall())
            _add(text, con.sql(_TEXT_SUMS).fetchall())
            _add(sources, con.sql(_SOURCE_SUMS).fetchall(), keys=3)
            _add_counts(tokens, caption_tokens(con))
            _add_counts(per_image, regions_per_image(con))
            _add_counts(sizes, relative_box_sizes(con, box_bins))
            smallest = con.sql(
                "SELECT md5(image_id) AS h, image_id FROM records "
                f"ORDER BY h LIMIT {int(gallery_size)}"
            ).fetchall()
            kept = heapq.nsmallest(gallery_size, {*chosen, *smallest})
            newcomers = [image_id for h, image_id in kept if (h, image_id) not in chosen]
            chosen_records.update((r.image_id, r) for r in records_for(con, newcomers))
            chosen_records = {i: chosen_records[i] for _, i in kept if i in chosen_records}
            chosen = kept
    gallery = [chosen_records[i] for _, i in chosen if i in chosen_records]
    return RecordStats(
        rows=counts[0],
        images=counts[1],
        parsed=counts[2],
        tables=[
            annotation_table(texts, regions, triplets),
            text_table(text),
            source_table(sources),
        ],
        caption_tokens=tokens,
        regions_per_image={name: c for name, c in per_image.items() if c},
        box_sizes=sizes,
        gallery=gallery,
    )
