"""The report's numbers, computed with DuckDB over a round's records.

``connect`` gives a DuckDB connection the records (in the layout of ``engine.records``):
the committed Parquet parts themselves, which DuckDB reads column by column as each
query needs them, or an Arrow table. It lays them out long: one row per caption, per
region, per grounded phrase. Each table function below is then one or two SQL queries
over those views.

Tokens are whitespace-separated words throughout. The paper does not name the tokenizer
behind its "#Avg Tokens"; words keep the figures independent of any model's vocabulary
and close to what a reader counts by eye.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from engine.records import CAPTION_KINDS, REGION_KINDS, TEXT_STATS_TYPE
from filters.text import load_pipeline, text_stats

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
        if filesystem is not None and not _reads_natively(filesystem):
            con.register_filesystem(filesystem)
        # Parts written before a column or a struct field was added lack it: read by name.
        paths = ", ".join("'" + path.replace("'", "''") + "'" for path in records)
        con.execute(
            f"CREATE VIEW records AS SELECT * FROM read_parquet([{paths}], union_by_name = true)"
        )
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


def _reads_natively(filesystem: fsspec.AbstractFileSystem) -> bool:
    protocols = filesystem.protocol
    return bool({"file", "local"} & set([protocols] if isinstance(protocols, str) else protocols))


def _by_kind(con: duckdb.DuckDBPyConnection, sql: str) -> dict[str, tuple[Any, ...]]:
    """Rows of a query whose first column is a kind, keyed by it."""
    return {row[0]: row[1:] for row in con.sql(sql).fetchall()}


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


def annotation_table(con: duckdb.DuckDBPyConnection) -> StatTable:
    """FLD-5B Table 2 for these records: one row per annotation type and text type."""
    texts = _by_kind(
        con,
        "SELECT kind, count(DISTINCT image_id), count(*), avg(ntokens(text)) "
        "FROM captions GROUP BY kind",
    )
    regions = _by_kind(
        con,
        "SELECT r.kind, count(DISTINCT image_id), count(*), avg(ntokens(r.text)) "
        "FROM regions GROUP BY r.kind",
    )
    # A grounded caption is a caption with at least one grounded phrase; its regions are
    # the phrase-region links, as in the paper's text-phrase-region triplets.
    triplets = _by_kind(
        con,
        """
        WITH grounded AS (
            SELECT image_id, p.caption AS kind, count(*) AS phrases,
                   sum(len(p.regions)) AS links, sum(ntokens(p.text)) AS phrase_tokens
            FROM phrases GROUP BY ALL
        )
        SELECT g.kind, count(*), sum(g.phrases), avg(ntokens(c.text)), sum(g.links),
               sum(g.phrase_tokens) / sum(g.phrases)
        FROM grounded g JOIN captions c USING (image_id, kind) GROUP BY g.kind
        """,
    )
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
        images, count, tokens = texts.get(kind, (0, 0, None))
        table.rows.append(
            _annotation_row("text", kind, images, count, tokens, FLD5B_CAPTION_TOKENS[kind])
        )
    for kind in REGION_KINDS:
        images, count, tokens = regions.get(kind, (0, 0, None))
        table.rows.append(
            _annotation_row(
                "region-text",
                kind,
                images,
                count,
                regions=count,
                region_tokens=tokens,
                paper_regions=FLD5B_REGIONS_PER_IMAGE if kind == "object" else None,
            )
        )
    for kind in CAPTION_KINDS:
        images, phrases, tokens, links, phrase_tokens = triplets.get(kind, (0, 0, None, 0, None))
        table.rows.append(
            _annotation_row(
                "text-phrase-region",
                kind,
                images,
                phrases,
                tokens,
                regions=links,
                paper_regions=FLD5B_REGIONS_PER_GROUNDED_CAPTION[kind],
                region_tokens=phrase_tokens,
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


def text_table(con: duckdb.DuckDBPyConnection) -> StatTable:
    """FLD-5B Table 3: per caption kind, mean counts and complexities per caption.

    Needs ``parse_missing_stats`` first. A complexity is averaged over the captions that
    have at least one object (action): a caption with none has no complexity to speak
    of, and counting it as 0 would mix "short" with "simple".
    """
    averages = ", ".join(f"avg(len(s.{name}))" for name in TEXT_STAT_NAMES[:4])
    found = _by_kind(
        con,
        f"""
        WITH stats AS (
            SELECT c.kind, coalesce(c.stats, p.stats) AS s, c.stats IS NULL AS parsed_now
            FROM captions c LEFT JOIN parsed p USING (image_id, kind)
        )
        SELECT kind, count(*), count(*) FILTER (WHERE parsed_now), {averages},
               avg(s.object_complexity) FILTER (WHERE len(s.objects) > 0),
               avg(s.action_complexity) FILTER (WHERE len(s.actions) > 0)
        FROM stats GROUP BY kind
        """,
    )
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
        count, parsed, *values = found.get(kind, (0, 0, *[None] * len(TEXT_STAT_NAMES)))
        row: list[Any] = [kind, count, parsed]
        for name, value in zip(TEXT_STAT_NAMES, values, strict=True):
            row += [value, FLD5B_TEXT_STATS[kind][name]]
        table.rows.append(tuple(row))
    return table


def source_table(con: duckdb.DuckDBPyConnection) -> StatTable:
    """Images by input source, and annotations by the specialist (lineage) that made them."""
    rows = con.sql(
        """
        SELECT 'image' AS annotation, '' AS kind, source, count(*) AS n FROM records GROUP BY ALL
        UNION ALL SELECT 'caption', kind, source, count(*) FROM captions GROUP BY ALL
        UNION ALL SELECT 'region', r.kind, r.source, count(*) FROM regions GROUP BY ALL
        UNION ALL SELECT 'phrase', p.caption, p.source, count(*) FROM phrases GROUP BY ALL
        ORDER BY annotation, kind, n DESC, source
        """
    ).fetchall()
    return StatTable("sources", "Counts by source", ["annotation", "kind", "source", "count"], rows)


def reason_table(
    con: duckdb.DuckDBPyConnection, refused: pa.Table, name: str, title: str
) -> StatTable:
    """Counts by ``reason`` (and by ``item`` where the table has it) of refused rows, or
    the sum of their ``count`` column where the table has one (``dropped_counts``)."""
    con.register(name, refused)
    keys = [c for c in ("item", "reason") if c in refused.column_names]
    group = ", ".join(keys)
    n = "sum(count)::BIGINT" if "count" in refused.column_names else "count(*)"
    rows = con.sql(
        f"SELECT {group}, {n} AS n FROM {name} GROUP BY ALL ORDER BY n DESC, {group}"
    ).fetchall()
    return StatTable(name, title, [*keys, "count"], rows)


# The columns of the dropped records that ``dropped_counts`` reads: no image, no stats.
DROPPED_COUNT_COLUMNS = ["reason", "captions", "regions", "phrases"]


def dropped_counts(dropped: pa.Table) -> pa.Table:
    """``reason`` and ``count`` of each dropped row, counted as the filter stage counts
    them in its summary: an image for an ``image:`` reason, else the annotations the row
    sets aside (captions, regions, phrases). ``dropped`` needs DROPPED_COUNT_COLUMNS."""
    count = pc.add(
        pc.fill_null(pc.list_value_length(dropped.column("regions")), 0),
        pc.fill_null(pc.list_value_length(dropped.column("phrases")), 0),
    )
    for index in range(len(CAPTION_KINDS)):
        text = pc.struct_field(dropped.column("captions"), [index, 0])
        count = pc.add(count, pc.cast(pc.is_valid(text), pa.int32()))
    whole_image = pc.starts_with(dropped.column("reason"), "image:")
    count = pc.if_else(whole_image, 1, count)
    return pa.table({"reason": dropped.column("reason"), "count": pc.cast(count, pa.int64())})


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
