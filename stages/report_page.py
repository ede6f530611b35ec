"""The report's page: histograms as PNG (matplotlib, Agg) and one self-contained HTML file.

The page references its figures and gallery images by relative paths beside it, and
carries its own CSS: it opens from a local folder, a bucket or a web server alike, with
no request leaving for the network. Every piece of text from the data is escaped.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from engine.records import ImageRecord
from stages.report_gallery import region_colour
from stages.report_stats import PAPER_SUFFIX, StatTable

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 0.3em; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; }
td.text { text-align: left; }
td.paper, th.paper { color: #777; font-style: italic; background: #fafafa; }
p.note { color: #555; font-size: 13px; max-width: 1000px; }
.figures img { max-width: 32%; margin-right: 1%; }
/* As many columns as the window holds: a wide screen shows more images, a narrow one fewer. */
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr));
           gap: 16px; align-items: start; }
.gallery.dropped { grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); }
.gallery figure { margin: 0; border: 1px solid #ddd; padding: 8px; min-width: 0; }
.gallery img { max-width: 100%; display: block; }
.gallery figcaption { font-size: 13px; overflow-wrap: anywhere; }
.gallery .reason { font-weight: bold; color: #a00; }
pre.config { background: #f7f7f7; border: 1px solid #ddd; padding: 8px; font-size: 13px;
             overflow-x: auto; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 2px;
          vertical-align: middle; border: 1px solid #0003; }
.empty { padding: 1em; background: #fff6d6; border: 1px solid #e0c060; }
"""
MAX_BINS = 40


@dataclass
class GalleryItem:
    record: ImageRecord
    # Path of the drawn image, relative to the page.
    src: str


@dataclass
class DroppedItem:
    """What a filter set aside for ``reason``: a whole record or only its dropped parts."""

    record: ImageRecord
    reason: str
    # Path of the drawn image, relative to the page; None when the manifest lacks it.
    src: str | None


def file_name(uri: str) -> str:
    """The last part of ``uri``'s path, the member's for a tar member (``x.tar#dir/cat.jpg``).

    This is the name a person looks for in their input folder; an image id is not.
    """
    _, in_tar, member = uri.rpartition(".tar#")
    path = member if in_tar else uri
    return path.rstrip("/").rsplit("/", 1)[-1] or uri


def integer_bins(series: dict[str, Mapping[float, int]]) -> list[float]:
    """Bins for counts: one unit wide and centred on the integers, widened to keep ``MAX_BINS``."""
    top = int(max((v for counts in series.values() for v in counts), default=0))
    step = max(1, math.ceil((top + 1) / MAX_BINS))
    return [k - 0.5 for k in range(0, top + step + 1, step)]


# Bins for fractions of the image.
UNIT_BINS = [k / 25 for k in range(26)]


def histogram_png(
    title: str, xlabel: str, series: dict[str, Mapping[float, int]], bins: Sequence[float]
) -> bytes:
    """Overlaid step histograms over the bin edges ``bins``, one per named series of
    counts (value -> how many), as PNG."""
    figure = Figure(figsize=(5.5, 3.4), dpi=100, layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for name, counts in series.items():
        if counts:
            axes.hist(
                list(counts),
                bins=bins,
                weights=list(counts.values()),
                histtype="step",
                linewidth=1.6,
                label=f"{name} ({sum(counts.values())})",
            )
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("count")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.2f}"
    return escape(str(value))


def _table_html(table: StatTable) -> str:
    paper = [c.endswith(PAPER_SUFFIX) for c in table.columns]
    head = "".join(
        '<th class="paper">FLD-5B</th>' if is_paper else f"<th>{escape(c.replace('_', ' '))}</th>"
        for c, is_paper in zip(table.columns, paper, strict=True)
    )
    body = []
    for row in table.rows:
        cells = []
        for value, is_paper in zip(row, paper, strict=True):
            css = "paper" if is_paper else "text" if isinstance(value, str) else ""
            cells.append(f'<td class="{css}">{_cell(value)}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    if not table.rows:
        body.append(f'<tr><td class="text" colspan="{len(table.columns)}">none</td></tr>')
    note = f'<p class="note">{escape(table.note)}</p>' if table.note else ""
    return (
        f'<h2 id="{escape(table.name)}">{escape(table.title)}</h2>'
        f'<table class="stats" data-name="{escape(table.name)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>{note}"
    )


def _swatches(region_indices: Sequence[int]) -> str:
    return "".join(
        f'<span class="swatch" style="background:{region_colour(i)}"></span>'
        for i in region_indices
    )


def _name_html(record: ImageRecord) -> str:
    # The id and full uri stay a hover away, for looking the record up in the store.
    title = escape(f"{record.image_id}\n{record.uri}")
    return f'<b class="name" title="{title}">{escape(file_name(record.uri))}</b>'


def _gallery_item_html(item: GalleryItem) -> str:
    record = item.record
    captions = "".join(
        f"<li><b>{escape(kind)}</b>: {escape(caption.text)}</li>"
        for kind, caption in record.captions.items()
    )
    phrases = "".join(
        f"<li>{_swatches(p.regions)} <b>{escape(p.text)}</b> <small>({escape(p.caption)} → "
        f"{escape(', '.join(f'#{i}' for i in p.regions))})</small></li>"
        for p in record.phrases
    )
    kinds = Counter(region.kind for region in record.regions)
    counts = ", ".join(f"{n} {kind}" for kind, n in kinds.items()) or "no regions"
    name = escape(file_name(record.uri))
    return (
        f'<figure data-image-id="{escape(record.image_id)}">'
        f'<img src="{escape(item.src)}" alt="{name}">'
        f"<figcaption><div>{_name_html(record)} · {record.width}×{record.height} · "
        f"{escape(record.source)} · {escape(counts)}</div>"
        f'<ul class="captions">{captions}</ul>'
        f'<ul class="phrases">{phrases}</ul></figcaption></figure>'
    )


# Regions listed under a dropped example: an image dropped whole may hold a hundred.
MAX_LISTED_REGIONS = 8


def _score(score: float | None) -> str:
    return "" if score is None else f" {score:.2f}"


def _dropped_item_html(item: DroppedItem) -> str:
    record = item.record
    shown = record.regions[:MAX_LISTED_REGIONS]
    lines = [
        f"<li><b>{escape(kind)}</b>: {escape(c.text)}</li>" for kind, c in record.captions.items()
    ]
    lines += [
        f"<li>{_swatches([i])} {escape(r.kind)} <b>{escape(r.text)}</b>{_score(r.score)} "
        f"<small>({escape(r.source)})</small></li>"
        for i, r in enumerate(shown)
    ]
    if len(record.regions) > len(shown):
        lines.append(f"<li>… and {len(record.regions) - len(shown)} more regions</li>")
    # A dropped phrase's region indices refer to the record as scored, not to this part.
    lines += [
        f"<li>phrase <b>{escape(p.text)}</b>{_score(p.score)} <small>(in the {escape(p.caption)} "
        "caption)</small></li>"
        for p in record.phrases
    ]
    image = (
        ""
        if item.src is None
        else f'<img src="{escape(item.src)}" alt="{escape(file_name(record.uri))}">'
    )
    return (
        f'<figure data-image-id="{escape(record.image_id)}" data-reason="{escape(item.reason)}">'
        f'{image}<figcaption><div class="reason">{escape(item.reason)}</div>'
        f"<div>{_name_html(record)} · {escape(record.source)}</div>"
        f"<ul>{''.join(lines)}</ul></figcaption></figure>"
    )


def render(
    title: str,
    facts: Sequence[str],
    tables: Sequence[StatTable],
    figures: Sequence[tuple[str, str]],
    gallery: Sequence[GalleryItem],
    dropped: Sequence[DroppedItem],
    config: str,
    empty: bool,
) -> str:
    """The page: ``facts`` listed at the top, then tables, ``(src, alt)`` figures, gallery,
    dropped examples, and ``config`` (text shown as it is) last."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        "<ul>" + "".join(f"<li>{escape(fact)}</li>" for fact in facts) + "</ul>",
    ]
    if empty:
        parts.append('<p class="empty">Nothing to report yet: this round has no records.</p>')
    parts.extend(_table_html(table) for table in tables)
    if figures:
        images = "".join(
            f'<img src="{escape(src)}" alt="{escape(alt)}" title="{escape(alt)}">'
            for src, alt in figures
        )
        parts.append(f'<h2 id="histograms">Histograms</h2><div class="figures">{images}</div>')
    parts.append(f'<h2 id="gallery">Gallery ({len(gallery)} images)</h2>')
    parts.append(
        '<div class="gallery">' + "".join(_gallery_item_html(item) for item in gallery) + "</div>"
    )
    parts.append(f'<h2 id="dropped-examples">Dropped examples ({len(dropped)})</h2>')
    parts.append(
        '<p class="note">The first records set aside for each reason, as dropped: a whole '
        "image, or only the captions, regions and phrases a filter took from it.</p>"
    )
    parts.append(
        '<div class="gallery dropped">'
        + "".join(_dropped_item_html(item) for item in dropped)
        + "</div>"
    )
    parts.append(
        f'<h2 id="config">Config and thresholds</h2><pre class="config">{escape(config)}</pre>'
    )
    parts.append("</body></html>")
    return "\n".join(parts)
