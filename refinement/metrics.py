"""Metrics: a set of image records scored against ground truth records (pure functions).

The records under test can be any round's annotations (merged, filtered, a model's
predictions); the truth is typically a generated world's (``engine.world.load_truth``).
A predicted record is matched to a truth record by the last path segment of its
``uri`` (the file name: ``.../images/world-0-00012.png`` -> ``world-0-00012.png``), as
that survives ingest, whatever folder or URL scheme each side used. Every truth image
is scored; one without a predicted record counts as one with no annotations, so an
image a filter dropped costs recall. Predicted records without a truth are counted
and otherwise ignored.

Metrics, each over all truth images:

- **box AP, AP50** (``DetectionScores``): pycocotools ``COCOeval`` on the ``object``
  regions, ``bbox`` IoU, 100 detections per image, all areas. AP is the mean over
  IoU 0.50:0.95 and over categories, AP50 at IoU 0.5. By category phrase: a region's
  category is its ``text``, and a predicted phrase that no truth region carries is
  left out (COCO ignores detections of categories without ground truth). Class-agnostic:
  every region is one category. A region's score is its ``score`` (``None`` -> 1.0).
- **box P, R at IoU 0.5** (``Matching``): the annotations as a dataset consumer sees
  them, every kept box counted whatever its score. Per image and category phrase, boxes
  in descending score order each take the unmatched true box they overlap most, if at
  IoU >= 0.5. Precision = matched / predicted boxes, recall = matched / true boxes. AP
  cannot show what a filter buys (a score threshold only removes the tail of AP's
  ranking), these can.
- **mask AP, AP50**: the same with ``segm`` IoU of the regions' polygons (rasterised
  by pycocotools); predicted regions without a polygon are left out, as they have no
  mask to judge.
- **captions** (``CaptionScores``), per caption kind: spaCy (``filters.text``) extracts
  the objects (nouns, a compound counted once by its head: "stop sign") and attributes
  (adjectives and number words) of the predicted and the true caption; per image each
  becomes a set of lower-case words as written ("circle" and "circles" differ).
  Precision = sum over images of |pred & true| / sum of |pred|; recall = the same over
  sum of |true|. An image whose prediction lacks that kind contributes its true words
  to recall only. A caption's stored statistics (``Caption.stats``, from the filter
  stage's parse) are used as they are; only captions without them are parsed.
- **grounding** (``Accuracy``): for each true phrase, the best predicted phrase of the
  same caption kind whose text is equal (case-insensitive) or whose span overlaps;
  ranked by equal text, then overlapping characters, then nearest start. The true
  phrase counts as correct when each of its true boxes has a box of that predicted
  phrase's regions at IoU >= 0.5 (for a one-region phrase, the usual rule).
- **grounding precision**: for each predicted phrase with boxes, the best true phrase
  (same ranking); correct when each predicted box overlaps a box of that true phrase at
  IoU >= 0.5. Phrases a filter should have cut count against it.
- **OCR words** (``Accuracy``): the words (whitespace-separated, case-sensitive, as
  read) of each true ``ocr`` region, found among the words of the predicted ``ocr``
  regions whose box overlaps the true box by at least half of the smaller of the two
  (so a word-level or a line-level prediction both count); each true word is found at
  most as often as it is predicted.

``None`` marks a value with nothing to compute it from (no truth boxes, no predicted
caption words, ...), never zero.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from engine.geometry import box_area, intersection, iou, is_valid_polygon
from engine.records import CAPTION_KINDS, ImageRecord, Phrase, Region
from filters.text import text_stats

if TYPE_CHECKING:
    from spacy.language import Language

GROUNDING_IOU = 0.5
OCR_MIN_OVERLAP = 0.5


@dataclass(frozen=True, slots=True)
class DetectionScores:
    ap: float | None
    ap50: float | None


@dataclass(frozen=True, slots=True)
class Matching:
    """Boxes matched one to one at IoU >= 0.5, of ``predicted`` and of ``true``."""

    matched: int
    predicted: int
    true: int

    @property
    def precision(self) -> float | None:
        return _ratio(self.matched, self.predicted)

    @property
    def recall(self) -> float | None:
        return _ratio(self.matched, self.true)


@dataclass(frozen=True, slots=True)
class CaptionScores:
    """Precision and recall of a caption kind's objects and attributes over ``images``."""

    images: int
    object_precision: float | None
    object_recall: float | None
    attribute_precision: float | None
    attribute_recall: float | None


@dataclass(frozen=True, slots=True)
class Accuracy:
    correct: int
    total: int

    @property
    def value(self) -> float | None:
        return self.correct / self.total if self.total else None


@dataclass(slots=True)
class Evaluation:
    """All scores of one evaluation; ``table()`` prints them, ``to_dict()`` stores them."""

    images: int
    matched: int
    unmatched_predictions: int
    box: DetectionScores
    box_agnostic: DetectionScores
    box_matching: Matching
    mask: DetectionScores
    mask_agnostic: DetectionScores
    box_ap_by_category: dict[str, float | None]
    captions: dict[str, CaptionScores]
    grounding: Accuracy
    grounding_precision: Accuracy
    ocr: Accuracy

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["box_matching"]["precision"] = self.box_matching.precision
        out["box_matching"]["recall"] = self.box_matching.recall
        out["grounding"]["accuracy"] = self.grounding.value
        out["grounding_precision"]["accuracy"] = self.grounding_precision.value
        out["ocr"]["accuracy"] = self.ocr.value
        return out

    def table(self) -> str:
        row = "{:<16}" + "{:>9}" * 5
        lines = [
            f"images: {self.images} scored, {self.matched} with a prediction, "
            f"{self.unmatched_predictions} predictions without truth",
            row.format("", "AP", "AP50", "AP any", "AP50 any", ""),
        ]
        for name, scores, agnostic in (
            ("boxes", self.box, self.box_agnostic),
            ("masks", self.mask, self.mask_agnostic),
        ):
            values = (scores.ap, scores.ap50, agnostic.ap, agnostic.ap50)
            lines.append(row.format(name, *map(format_value, values), ""))
        m = self.box_matching
        lines.append(
            f"{'boxes @ IoU .5':<16}"
            f"{'P ' + format_value(m.precision):>9}{'R ' + format_value(m.recall):>9}"
            f"   ({m.matched} matched / {m.predicted} kept / {m.true} true)"
        )
        if self.captions:
            lines.append(row.format("captions", "obj P", "obj R", "attr P", "attr R", "images"))
            for kind, c in self.captions.items():
                values = (c.object_precision, c.object_recall)
                values += (c.attribute_precision, c.attribute_recall)
                lines.append(row.format(f"  {kind}", *map(format_value, values), c.images))
        else:
            lines.append("captions        not scored (no spaCy pipeline given)")
        for name, acc, unit in (
            ("grounding", self.grounding, "true phrases"),
            ("grounding P", self.grounding_precision, "predicted phrases"),
            ("OCR", self.ocr, "words"),
        ):
            lines.append(
                f"{name:<16}{format_value(acc.value):>9}   ({acc.correct} / {acc.total} {unit})"
            )
        return "\n".join(line.rstrip() for line in lines)


def format_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def evaluate(
    predictions: Iterable[ImageRecord],
    truth: Mapping[str, ImageRecord] | Iterable[ImageRecord],
    nlp: Language | None = None,
) -> Evaluation:
    """Score ``predictions`` against ``truth`` (records, or ``load_truth``'s mapping).

    ``nlp``: a spaCy pipeline (``filters.text.load_pipeline``) for the caption scores;
    without one they are not computed. Raises ``ValueError`` when two records of one
    side share a file name.
    """
    truth_records = list(truth.values()) if isinstance(truth, Mapping) else list(truth)
    truth_by_name = _by_file_name(truth_records, "truth")
    predicted_by_name = _by_file_name(list(predictions), "predicted")
    pairs = [(t, predicted_by_name.get(name)) for name, t in truth_by_name.items()]
    box, by_category = _coco_scores(pairs, "bbox", agnostic=False)
    return Evaluation(
        images=len(pairs),
        matched=sum(p is not None for _, p in pairs),
        unmatched_predictions=len(predicted_by_name.keys() - truth_by_name.keys()),
        box=box,
        box_agnostic=_coco_scores(pairs, "bbox", agnostic=True)[0],
        box_matching=_box_matching(pairs),
        mask=_coco_scores(pairs, "segm", agnostic=False)[0],
        mask_agnostic=_coco_scores(pairs, "segm", agnostic=True)[0],
        box_ap_by_category=by_category,
        captions=_caption_scores(pairs, nlp) if nlp is not None else {},
        grounding=_grounding(pairs),
        grounding_precision=_grounding_precision(pairs),
        ocr=_ocr(pairs),
    )


def figure(
    name: str, pairs: Sequence[tuple[ImageRecord, ImageRecord | None]], nlp: Language | None
) -> float | None:
    """One figure over (truth, prediction) pairs, computed alone: ``box AP50``,
    ``caption object F1`` (the mean over caption kinds of the object words' F1),
    ``grounding F1`` (of grounding precision and recall) or ``OCR word accuracy``.

    Cheaper than ``evaluate`` when one figure is wanted many times (a bootstrap over
    images); pairs may repeat an image. ``nlp`` is needed for the caption figure."""
    pairs = list(pairs)
    if name == "box AP50":
        return _coco_scores(pairs, "bbox", agnostic=False)[0].ap50
    if name == "caption object F1":
        if nlp is None:
            raise ValueError("the caption figure needs a spaCy pipeline")
        scores = _caption_scores(pairs, nlp).values()
        f1s = [f1(c.object_precision, c.object_recall) for c in scores]
        present = [value for value in f1s if value is not None]
        return sum(present) / len(present) if present else None
    if name == "grounding F1":
        return f1(_grounding_precision(pairs).value, _grounding(pairs).value)
    if name == "OCR word accuracy":
        return _ocr(pairs).value
    raise ValueError(f"unknown figure {name!r}")


def f1(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None:
        return None
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def file_name(uri: str) -> str:
    """The matching key of a record: the last path segment of its uri."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _by_file_name(records: list[ImageRecord], side: str) -> dict[str, ImageRecord]:
    out: dict[str, ImageRecord] = {}
    for record in records:
        name = file_name(record.uri)
        if name in out:
            raise ValueError(f"two {side} records for the file name {name!r}")
        out[name] = record
    return out


Pairs = list[tuple[ImageRecord, ImageRecord | None]]


# ---------------------------------------------------------------- COCO AP


def _coco_scores(
    pairs: Pairs, iou_type: str, *, agnostic: bool
) -> tuple[DetectionScores, dict[str, float | None]]:
    masks = iou_type == "segm"
    names = sorted({r.text for t, _ in pairs for r in _objects(t, masks)})
    category_ids = {"object": 1} if agnostic else {name: i + 1 for i, name in enumerate(names)}
    images = [{"id": i + 1, "width": t.width, "height": t.height} for i, (t, _) in enumerate(pairs)]
    truth_anns, predicted_anns = [], []
    for image_id, (t, p) in enumerate(pairs, start=1):
        for regions, anns in (
            (_objects(t, masks), truth_anns),
            (_objects(p, masks), predicted_anns),
        ):
            for r in regions:
                category = category_ids.get("object" if agnostic else r.text)
                if category is not None:
                    anns.append(_annotation(len(anns) + 1, image_id, category, r, masks))
    if not truth_anns:
        return DetectionScores(None, None), {}
    categories = [{"id": i, "name": n} for n, i in category_ids.items()]
    # pycocotools reports every step on stdout; an evaluation returns values instead.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_truth, coco_predicted = COCO(), COCO()
        coco_truth.dataset = {"images": images, "annotations": truth_anns, "categories": categories}
        coco_predicted.dataset = {
            "images": images,
            "annotations": predicted_anns,
            "categories": categories,
        }
        coco_truth.createIndex()
        coco_predicted.createIndex()
        run = COCOeval(coco_truth, coco_predicted, iou_type)
        run.params.imgIds = [image["id"] for image in images]
        run.evaluate()
        run.accumulate()
    # precision: [IoU threshold, recall threshold, category, area range, max detections];
    # area range 0 is "all", the last max-detections setting is 100.
    precision = run.eval["precision"][:, :, :, 0, -1]
    at50 = precision[np.isclose(run.params.iouThrs, 0.5)]
    by_category = {}
    if not agnostic:
        names_by_id = {i: n for n, i in category_ids.items()}
        for k, category in enumerate(run.params.catIds):
            by_category[names_by_id[category]] = _mean(precision[:, :, k])
    return DetectionScores(_mean(precision), _mean(at50)), by_category


def _box_matching(pairs: Pairs) -> Matching:
    matched = predicted_count = true_count = 0
    for truth, predicted in pairs:
        true_objects = _objects(truth, masks=False)
        predicted_objects = _objects(predicted, masks=False)
        true_count += len(true_objects)
        predicted_count += len(predicted_objects)
        unmatched = list(range(len(true_objects)))
        ranked = sorted(predicted_objects, key=lambda r: -(1.0 if r.score is None else r.score))
        for region in ranked:
            overlaps = [
                (iou(region.box, true_objects[i].box), i)
                for i in unmatched
                if true_objects[i].text == region.text
            ]
            best = max(overlaps, default=(0.0, -1))
            if best[0] >= GROUNDING_IOU:
                unmatched.remove(best[1])
                matched += 1
    return Matching(matched, predicted_count, true_count)


def _objects(record: ImageRecord | None, masks: bool) -> list[Region]:
    if record is None:
        return []
    objects = [r for r in record.regions if r.kind == "object"]
    return [r for r in objects if _valid_polygons(r)] if masks else objects


def _valid_polygons(region: Region) -> list[list[float]]:
    return [p for p in region.polygons or [] if is_valid_polygon(p)]


def _annotation(ann_id: int, image_id: int, category: int, region: Region, masks: bool) -> dict:
    x0, y0, x1, y1 = region.box
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category,
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        # Used by COCO only to sort into area ranges; the "all" range reported takes any.
        "area": (x1 - x0) * (y1 - y0),
        "iscrowd": 0,
        "score": 1.0 if region.score is None else float(region.score),
    }
    if masks:
        ann["segmentation"] = _valid_polygons(region)
    return ann


def _mean(values: np.ndarray) -> float | None:
    # COCO marks "no ground truth for this category" with -1.
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


# ---------------------------------------------------------------- captions


def _caption_scores(pairs: Pairs, nlp: Language) -> dict[str, CaptionScores]:
    scores = {}
    for kind in CAPTION_KINDS:
        compared = [(t.captions.get(kind), p.captions.get(kind) if p else None) for t, p in pairs]
        compared = [(t, p) for t, p in compared if t is not None]
        if not compared:
            continue
        captions = [c for c, _ in compared] + [c for _, c in compared if c is not None]
        # Statistics the filter stage stored beside a caption are the same function's
        # output (filters.text.text_stats); only captions without them are parsed here.
        unparsed = [c.text for c in captions if c.stats is None]
        parsed = iter(text_stats(nlp, unparsed))
        stats = iter([c.stats if c.stats is not None else next(parsed) for c in captions])
        true_stats = [next(stats) for _ in compared]
        predicted_stats = [next(stats) if c is not None else None for _, c in compared]
        counts = {name: Counter() for name in ("objects", "attributes")}
        for true, predicted in zip(true_stats, predicted_stats, strict=True):
            for name, count in counts.items():
                true_words = set(getattr(true, name))
                predicted_words = set(getattr(predicted, name)) if predicted else set()
                count["matched"] += len(true_words & predicted_words)
                count["true"] += len(true_words)
                count["predicted"] += len(predicted_words)
        o, a = counts["objects"], counts["attributes"]
        scores[kind] = CaptionScores(
            images=len(compared),
            object_precision=_ratio(o["matched"], o["predicted"]),
            object_recall=_ratio(o["matched"], o["true"]),
            attribute_precision=_ratio(a["matched"], a["predicted"]),
            attribute_recall=_ratio(a["matched"], a["true"]),
        )
    return scores


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


# ---------------------------------------------------------------- grounding and OCR


def _grounding(pairs: Pairs) -> Accuracy:
    correct = total = 0
    for truth, predicted in pairs:
        for phrase in truth.phrases:
            total += 1
            match = _best_phrase(phrase, predicted.phrases) if predicted else None
            if match is None:
                continue
            boxes = [
                predicted.regions[i].box for i in match.regions if 0 <= i < len(predicted.regions)
            ]
            wanted = [truth.regions[i].box for i in phrase.regions]
            if wanted and all(any(iou(w, b) >= GROUNDING_IOU for b in boxes) for w in wanted):
                correct += 1
    return Accuracy(correct, total)


def _grounding_precision(pairs: Pairs) -> Accuracy:
    correct = total = 0
    for truth, predicted in pairs:
        if predicted is None:
            continue
        for phrase in predicted.phrases:
            boxes = [
                predicted.regions[i].box for i in phrase.regions if 0 <= i < len(predicted.regions)
            ]
            if not boxes:
                continue
            total += 1
            match = _best_phrase(phrase, truth.phrases)
            if match is None:
                continue
            wanted = [truth.regions[i].box for i in match.regions]
            if all(any(iou(b, w) >= GROUNDING_IOU for w in wanted) for b in boxes):
                correct += 1
    return Accuracy(correct, total)


def _best_phrase(phrase: Phrase, candidates: list[Phrase]) -> Phrase | None:
    best, best_rank = None, None
    for candidate in candidates:
        if candidate.caption != phrase.caption:
            continue
        same_text = candidate.text.strip().casefold() == phrase.text.strip().casefold()
        overlap = min(candidate.end, phrase.end) - max(candidate.start, phrase.start)
        if not same_text and overlap <= 0:
            continue
        rank = (same_text, max(overlap, 0), -abs(candidate.start - phrase.start))
        if best_rank is None or rank > best_rank:
            best, best_rank = candidate, rank
    return best


def _ocr(pairs: Pairs) -> Accuracy:
    correct = total = 0
    for truth, predicted in pairs:
        read = [r for r in predicted.regions if r.kind == "ocr"] if predicted else []
        for line in (r for r in truth.regions if r.kind == "ocr"):
            wanted = Counter(line.text.split())
            found = Counter()
            for r in read:
                if _overlap_of_smaller(line.box, r.box) >= OCR_MIN_OVERLAP:
                    found.update(r.text.split())
            total += sum(wanted.values())
            correct += sum((wanted & found).values())
    return Accuracy(correct, total)


def _overlap_of_smaller(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    smaller = min(box_area(a), box_area(b))
    return intersection(a, b) / smaller if smaller > 0 else 0.0
