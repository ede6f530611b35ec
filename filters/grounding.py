"""The grounding filter: which phrase-to-box links of a record to keep.

It follows Kosmos-2's GRIT filtering (arXiv 2306.14824): a phrase on the banned list is
dropped, a phrase's link to a box is cut when the box's confidence is under a threshold,
NMS runs across the boxes of all phrases of one caption (GRIT runs it "even if they are
not for the same noun chunk"), and a record with no grounded phrase left is dropped (GRIT
drops such images). The thresholds are arguments; their defaults, against GRIT's
published 0.65, are measured in ``engine/config.py`` (``GroundingFilterConfig``).
"""

from __future__ import annotations

from dataclasses import replace

from engine.records import ImageRecord, Phrase
from filters.regions import SUPPRESSED, RecordDecision, region_nms, remap_phrases

# Drop reasons: fixed strings, so that a report counts drops by cause.
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

_BANNED_FOLDED = frozenset(w.casefold() for w in BANNED_GROUNDING_TOKENS)
# Determiners that a banned word may follow: "an image" and "this image" are the image.
_DETERMINERS = ("a ", "an ", "the ", "this ", "that ", "these ", "those ")


def is_banned(text: str) -> bool:
    """Whether ``text`` is on the banned list, ignoring case and surrounding space, with or
    without one leading article or demonstrative ("this image" is banned as "image" is)."""
    phrase = " ".join(text.split()).casefold()
    if phrase in _BANNED_FOLDED:
        return True
    return any(phrase.startswith(a) and phrase[len(a) :] in _BANNED_FOLDED for a in _DETERMINERS)


def decide_grounding(
    record: ImageRecord,
    *,
    min_score: float,
    nms_iou: float | None,
    drop_image_without_grounding: bool,
) -> RecordDecision:
    """Which phrase-to-box links of ``record`` survive, and whether the record does.

    1. a phrase on the banned list (``is_banned``) is dropped ("banned phrase");
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
        if is_banned(phrase.text):
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
