"""Grounding filters: which phrases of a caption to ground, and which grounded boxes to keep.

Phrase extraction follows Kosmos-2's GRIT pipeline (arXiv 2306.14824) on a spaCy parse:

1. noun chunks (``doc.noun_chunks``) are the candidates;
2. each chunk is expanded to a referring expression through the dependency children of
   its root ("a man" -> "a man riding a horse on a beach"), without crossing a conjunct:
   the subtree of any ``conj``, ``cc`` or ``preconj`` token is left out, at every depth,
   so "a cup of coffee and a plate" gives "a cup of coffee" and "a plate" and every
   conjoined noun keeps an expression of its own. The expression is the contiguous run of
   tokens around the chunk that stays inside the root's subtree, trimmed of edge
   punctuation; the chunk itself is always whole;
3. expressions on the banned-grounding list (``BANNED_GROUNDING_TOKENS``) and expressions
   whose root noun is abstract (``ABSTRACT_NOUNS``) are dropped;
4. of the rest, only expressions not contained in another are kept.

The grounding decision for one record follows GRIT's filtering: a phrase's link to a box
is cut when the box's confidence is under ``min_score`` (GRIT: 0.65; 0.5 here, the best
box F1 of ``tests/bench/bench_filter_sweep.py``: at 0.65 precision 0.903 but recall
0.685, at 0.5 0.849 / 0.791, unfiltered 0.760 / 0.829), NMS runs across
the boxes of all phrases of one caption (GRIT runs it "even if they are not for the same
noun chunk"; its IoU is not published: 0.5, torchvision's detection default), and a
record with no grounded phrase left is dropped (GRIT drops such images).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from engine.records import ImageRecord, Phrase
from filters.regions import SUPPRESSED, RecordDecision, region_nms, remap_phrases

if TYPE_CHECKING:
    from spacy.tokens import Doc, Span, Token

DEFAULT_MIN_GROUNDING_SCORE = 0.5
DEFAULT_GROUNDING_NMS_IOU = 0.5

BANNED_PHRASE = "banned phrase"
LOW_GROUNDING_SCORE = "low grounding score"
NO_GROUNDED_BOX = "no grounded box"

# Florence-2's list, as ``phrase_grounding.banned_grounding_tokens`` in transformers'
# ``convert_florence2_original_pytorch_to_hf.py`` (duplicates removed): pronouns,
# determiners and quantifiers used alone, words for the image itself, lone articles.
BANNED_GROUNDING_TOKENS: frozenset[str] = frozenset(
    {
        "it", "I", "me", "mine", "you", "your", "yours", "he", "him", "his", "she", "her",
        "hers", "they", "them", "their", "theirs", "one", "oneself", "we", "us", "our",
        "ours", "its", "myself", "yourself", "himself", "herself", "itself", "ourselves",
        "yourselves", "themselves", "this", "that", "these", "those", "who", "whom",
        "whose", "which", "what", "all", "another", "any", "anybody", "anyone",
        "anything", "each", "everybody", "everyone", "everything", "few", "many",
        "nobody", "none", "several", "some", "somebody", "someone", "something",
        "each other", "one another", "the image", "image", "images", "the", "a", "an",
        "a group", "other objects", "lots", "a set",
    }
)  # fmt: skip

# Nouns that name no visible thing, so a box for them is noise. GRIT names "time",
# "love" and "freedom" as examples and publishes no list; this one adds feelings and
# ideas, times of day, quantity and kind words whose object is their complement ("a
# variety of fruits" is grounded as "fruits"), words for the whole view, and position
# words that name a part of the view or of another thing ("the top of the table").
ABSTRACT_NOUNS: frozenset[str] = frozenset(
    {
        "time", "love", "freedom",
        "life", "beauty", "peace", "fun", "joy", "happiness", "friendship", "emotion",
        "feeling", "mood", "atmosphere", "idea", "concept", "thought", "memory",
        "memories",
        "day", "night", "moment", "morning", "afternoon", "evening", "season",
        "kind", "type", "sort", "variety", "number", "amount", "lot", "plenty",
        "scene", "view", "background", "foreground", "distance",
        "front", "back", "middle", "center", "centre", "top", "bottom", "side", "left",
        "right", "edge",
    }
)  # fmt: skip

# Determiners that a banned word may follow: "an image" and "this image" are the image.
_DETERMINERS = ("a ", "an ", "the ", "this ", "that ", "these ", "those ")


def _folded(words: Iterable[str]) -> frozenset[str]:
    return frozenset(w.casefold() for w in words)


_BANNED_FOLDED = _folded(BANNED_GROUNDING_TOKENS)
# Dependency labels that start a conjunct: an expression never grows across them.
_CONJUNCT_DEPS = frozenset({"conj", "cc", "preconj"})


@dataclass(frozen=True, slots=True)
class ReferringExpression:
    """A phrase to ground: ``text == caption[start:end]``.

    ``chunk_start``/``chunk_end`` are the character span of the noun chunk it grew from:
    the words a grounding model should box (GRIT grounds the chunk and gives its box to
    the expression). ``root`` is the chunk's head noun as written.
    """

    start: int
    end: int
    text: str
    chunk_start: int
    chunk_end: int
    root: str


def is_banned(text: str, banned: Collection[str] = BANNED_GROUNDING_TOKENS) -> bool:
    """Whether ``text`` is on the banned list, ignoring case and surrounding space, with or
    without one leading article or demonstrative ("this image" is banned as "image" is)."""
    folded = _BANNED_FOLDED if banned is BANNED_GROUNDING_TOKENS else _folded(banned)
    phrase = " ".join(text.split()).casefold()
    if phrase in folded:
        return True
    return any(phrase.startswith(a) and phrase[len(a) :] in folded for a in _DETERMINERS)


def is_abstract(noun: str, abstract: Collection[str] = ABSTRACT_NOUNS) -> bool:
    """Whether ``noun`` (or, for a plural in -s, its singular) is an abstract noun. Written
    forms, not lemmas: the engine's spaCy pipelines run without a lemmatizer."""
    word = noun.casefold()
    return word in abstract or (word.endswith("s") and word[:-1] in abstract)


def referring_expressions(
    doc: Doc,
    *,
    expand: bool = True,
    banned: Collection[str] = BANNED_GROUNDING_TOKENS,
    abstract: Collection[str] = ABSTRACT_NOUNS,
) -> list[ReferringExpression]:
    """The phrases of a parsed caption to ground, in caption order (rules: module docstring).

    ``doc`` must be the parse of the caption text itself, so that spans index into it.
    ``expand=False`` keeps the bare noun chunks (still filtered), which ground more,
    shorter phrases.
    """
    candidates = []
    for chunk in doc.noun_chunks:
        if is_abstract(chunk.root.text, abstract):
            continue
        core = _core(chunk)
        first, last = _expansion(core) if expand else (core.start, core.end - 1)
        start, end = doc[first].idx, doc[last].idx + len(doc[last].text)
        text = doc.text[start:end]
        if is_banned(text, banned):
            continue
        candidates.append(
            ReferringExpression(
                start=start,
                end=end,
                text=text,
                chunk_start=core.start_char,
                chunk_end=core.end_char,
                root=chunk.root.text,
            )
        )
    return _outermost(candidates)


def _core(chunk: Span) -> Span:
    """The chunk without leading conjunction words or punctuation ("Either a bus" -> "a
    bus"): they belong to the coordination, not to the thing named."""
    doc, start = chunk.doc, chunk.start
    while start < chunk.end - 1 and (
        doc[start].dep_ in _CONJUNCT_DEPS or _is_edge_noise(doc[start])
    ):
        start += 1
    return doc[start : chunk.end]


def _expansion(chunk: Span) -> tuple[int, int]:
    """First and last token index of the chunk grown through its root's subtree."""
    doc = chunk.doc
    excluded = {
        t.i
        for token in chunk.root.subtree
        if token.dep_ in _CONJUNCT_DEPS and token.i not in range(chunk.start, chunk.end)
        for t in token.subtree
    }
    allowed = {t.i for t in chunk.root.subtree} - excluded
    first, last = chunk.start, chunk.end - 1
    while first - 1 in allowed:
        first -= 1
    while last + 1 in allowed:
        last += 1
    while first < chunk.start and _is_edge_noise(doc[first]):
        first += 1
    while last >= chunk.end and _is_edge_noise(doc[last]):
        last -= 1
    return first, last


def _is_edge_noise(token: Token) -> bool:
    return token.is_punct or token.is_space


def _outermost(expressions: Iterable[ReferringExpression]) -> list[ReferringExpression]:
    """Expressions whose span no other expression contains; one of identical spans."""
    unique = {(e.start, e.end): e for e in sorted(expressions, key=lambda e: e.start)}
    spans = list(unique)
    return [
        unique[(s, e)]
        for s, e in spans
        if not any(o_s <= s and e <= o_e and (o_s, o_e) != (s, e) for o_s, o_e in spans)
    ]


def decide_grounding(
    record: ImageRecord,
    *,
    min_score: float = DEFAULT_MIN_GROUNDING_SCORE,
    nms_iou: float | None = DEFAULT_GROUNDING_NMS_IOU,
    drop_image_without_grounding: bool = True,
    banned: Collection[str] = BANNED_GROUNDING_TOKENS,
) -> RecordDecision:
    """Which phrase-to-box links of ``record`` survive, and whether the record does.

    1. a phrase on the banned list is dropped ("banned phrase"); phrases from a grounding
       specialist did not pass through ``referring_expressions``;
    2. a link to a box scoring under ``min_score`` is cut (unscored human boxes stay);
    3. per caption, class-agnostic NMS at ``nms_iou`` (``None``: none) over the boxes its
       phrases still link to; links to suppressed boxes are cut for that caption only;
    4. a phrase with no link left is dropped: "suppressed by nms" if NMS cut one of its
       links, else "low grounding score" (or "no grounded box" if it had none);
    5. a region that phrases linked to and that lost every link is dropped with the same
       reasons; regions no phrase ever linked to are not judged here;
    6. with ``drop_image_without_grounding``, a record with no phrase left (or none to
       begin with) is dropped with "no grounded box".
    """
    regions = record.regions
    linked_before = {i for p in record.phrases for i in p.regions if 0 <= i < len(regions)}
    cut_reason: dict[int, str] = {}
    dropped_phrases: list[tuple[Phrase, str]] = []
    # (phrase, its links to existing regions, the links still standing)
    links_of: list[tuple[Phrase, list[int], list[int]]] = []
    for phrase in record.phrases:
        valid = [i for i in phrase.regions if 0 <= i < len(regions)]
        if is_banned(phrase.text, banned):
            dropped_phrases.append((phrase, BANNED_PHRASE))
            for i in valid:
                cut_reason.setdefault(i, BANNED_PHRASE)
            continue
        links = []
        for i in valid:
            score = regions[i].score
            if score is not None and not score >= min_score:  # NaN fails too
                cut_reason.setdefault(i, LOW_GROUNDING_SCORE)
            else:
                links.append(i)
        links_of.append((phrase, valid, links))

    suppressed_in: dict[str, set[int]] = {}
    if nms_iou is not None:
        for caption in {p.caption for p, _, _ in links_of}:
            boxes = sorted({i for p, _, links in links_of if p.caption == caption for i in links})
            kept = {
                boxes[k]
                for k in region_nms([regions[i] for i in boxes], nms_iou, class_aware=False)
            }
            suppressed_in[caption] = set(boxes) - kept
            for i in suppressed_in[caption]:
                cut_reason[i] = SUPPRESSED

    surviving: list[Phrase] = []
    for phrase, valid, links in links_of:
        cut = suppressed_in.get(phrase.caption, set())
        remaining = [i for i in links if i not in cut]
        if remaining:
            surviving.append(replace(phrase, regions=remaining))
        elif not valid:
            dropped_phrases.append((phrase, NO_GROUNDED_BOX))
        elif any(i in cut for i in links):
            dropped_phrases.append((phrase, SUPPRESSED))
        else:
            dropped_phrases.append((phrase, LOW_GROUNDING_SCORE))

    still_linked = {i for p in surviving for i in p.regions}
    kept_regions = [i for i in range(len(regions)) if i not in linked_before or i in still_linked]
    dropped_regions = [
        (regions[i], cut_reason.get(i, NO_GROUNDED_BOX))
        for i in sorted(linked_before - still_linked)
    ]
    # Every surviving link points at a kept region, so no phrase is dropped here.
    phrases, _ = remap_phrases(surviving, kept_regions, NO_GROUNDED_BOX)
    no_grounding = drop_image_without_grounding and not phrases
    return RecordDecision(
        regions=[regions[i] for i in kept_regions],
        phrases=phrases,
        dropped_regions=dropped_regions,
        dropped_phrases=dropped_phrases,
        image_reason=NO_GROUNDED_BOX if no_grounding else None,
    )
