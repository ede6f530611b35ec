"""Captions of a generated scene, written from a grammar with every phrase grounded.

``engine.world.generate`` lays out a scene and knows exactly what is visible; this module turns
that knowledge into the three FLD caption kinds. Each caption is built piece by piece,
so every noun phrase that names objects is recorded with its character span and the
region indices it names at the moment it is written: the grounding is exact by
construction, never recovered by parsing.

Lengths follow FLD-5B's means (FLD_REFERENCE.md §1: about 8, 30 and 70 tokens for
brief, detailed and more detailed captions). The detailed and more detailed captions
spend a word budget: objects are described one sentence each, largest or first in
reading order, until the budget is near, and the rest are summed up in one phrase.
What a caption says comes from the scene: counts, colours, sizes, positions on a 3x3
grid ("in the top left"), and one relation per described object, chosen by priority:
occlusion ("partly hidden behind"), contact ("touching"), then the direction of the
nearest neighbour ("above", "next to", "to the left of").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Box = tuple[float, float, float, float]

NUMBER_WORDS = (
    "no", "one", "two", "three", "four", "five", "six",
    "seven", "eight", "nine", "ten", "eleven", "twelve",
)  # fmt: skip
# Grid cell (column, row) -> where the object is, as a caption says it.
POSITIONS = {
    (0, 0): "in the top left",
    (1, 0): "at the top",
    (2, 0): "in the top right",
    (0, 1): "on the left",
    (1, 1): "in the center",
    (2, 1): "on the right",
    (0, 2): "in the bottom left",
    (1, 2): "at the bottom",
    (2, 2): "in the bottom right",
}
BACKGROUND_DETAILS = {
    "gradient": "that fades gently from light to dark",
    "striped": "covered in thin diagonal stripes",
    "checkered": "with a faint checkered pattern",
    "speckled": "sprinkled with fine grainy speckles",
    "mottled": "with soft and blotchy patches",
}
_GROUP_ADJECTIVES = ("colorful", "bright", "flat", "simple")
# Word budgets: stop describing single objects once a caption has this many words.
_DETAILED_BUDGET = 19
_MORE_DETAILED_BUDGET = 56


@dataclass(frozen=True, slots=True)
class SceneObject:
    """A visible object as the captions see it.

    ``region``: its index in the image record's regions. ``noun``: a shape name or
    ``"sign"``. ``box``: the box of its visible pixels. ``hidden_by`` / ``touching``:
    region indices of the objects that cover part of it / whose visible pixels touch
    its own. ``words``: the text lines of a sign.
    """

    region: int
    noun: str
    colour: str
    size: str
    box: Box
    hidden_by: tuple[int, ...] = ()
    touching: tuple[int, ...] = ()
    words: tuple[str, ...] = ()

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclass(frozen=True, slots=True)
class Scene:
    width: int
    height: int
    background_style: str
    background_colour: str
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True, slots=True)
class GroundedSpan:
    """``caption_text[start:end]`` names the regions ``regions``."""

    caption: str
    start: int
    end: int
    text: str
    regions: tuple[int, ...]


def describe(scene: Scene, rng: np.random.Generator) -> tuple[dict[str, str], list[GroundedSpan]]:
    """The brief, detailed and more detailed captions of ``scene`` and their grounded
    phrases. ``rng`` picks among equivalent wordings, so a seed fixes the text."""
    writers = [
        _brief(scene, rng),
        _detailed(scene, rng),
        _more_detailed(scene, rng),
    ]
    captions = {w.kind: w.text() for w in writers}
    spans = [span for w in writers for span in w.spans]
    return captions, spans


class _Writer:
    """Appends text and records the span of every grounded mention as it is written."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.parts: list[str] = []
        self.length = 0
        self.spans: list[GroundedSpan] = []
        self.related: set[tuple[int, int]] = set()

    def add(self, text: str) -> None:
        if self.length == 0 or self.parts[-1].endswith(". "):
            text = text[:1].upper() + text[1:]
        self.parts.append(text)
        self.length += len(text)

    def mention(self, text: str, regions: list[int]) -> None:
        start = self.length
        self.add(text)
        written = self.parts[-1]
        self.spans.append(GroundedSpan(self.kind, start, self.length, written, tuple(regions)))

    def refer(self, article: str, obj: SceneObject, *, size: bool = False) -> None:
        """``a red circle`` / ``the large red circle``: the article is not part of the
        grounded phrase, as in FLD's phrases ("articles alone" are not grounded)."""
        phrase = _name(obj, size=size)
        if article == "a":
            article = _indefinite(phrase)
        self.add(f"{article} ")
        self.mention(phrase, [obj.region])

    def end_sentence(self) -> None:
        self.add(". ")

    def words(self) -> int:
        return len(self.text().split())

    def text(self) -> str:
        return "".join(self.parts).strip()


def _name(obj: SceneObject, *, size: bool) -> str:
    words = [obj.size] if size and obj.noun != "sign" else []
    return " ".join([*words, obj.colour, obj.noun])


def _indefinite(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _count(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def _plural(noun: str, n: int) -> str:
    return noun if n == 1 else noun + "s"


def _position(scene: Scene, obj: SceneObject) -> str:
    cx, cy = obj.centre
    column = min(int(3 * cx / scene.width), 2)
    row = min(int(3 * cy / scene.height), 2)
    return POSITIONS[(column, row)]


def _by_region(scene: Scene) -> dict[int, SceneObject]:
    return {o.region: o for o in scene.objects}


def _relation(scene: Scene, obj: SceneObject) -> tuple[str, SceneObject] | None:
    """One relation of ``obj`` to another object, in order of what a viewer notices."""
    others = _by_region(scene)
    if obj.hidden_by:
        return "partly hidden behind", others[obj.hidden_by[0]]
    if obj.touching:
        return "touching", others[obj.touching[0]]
    rest = [o for o in scene.objects if o.region != obj.region]
    if not rest:
        return None
    cx, cy = obj.centre
    nearest = min(rest, key=lambda o: (o.centre[0] - cx) ** 2 + (o.centre[1] - cy) ** 2)
    dx, dy = nearest.centre[0] - cx, nearest.centre[1] - cy
    if abs(dy) > abs(dx):
        return ("above" if dy > 0 else "below"), nearest
    gap = max(nearest.box[0] - obj.box[2], obj.box[0] - nearest.box[2])
    if gap < 0.12 * scene.width:
        return "next to", nearest
    return ("to the left of" if dx > 0 else "to the right of"), nearest


def _shapes_and_signs(scene: Scene) -> tuple[list[SceneObject], list[SceneObject]]:
    shapes = [o for o in scene.objects if o.noun != "sign"]
    signs = [o for o in scene.objects if o.noun == "sign"]
    return shapes, signs


def _group(w: _Writer, objects: list[SceneObject], noun: str, adjective: str = "") -> None:
    """``five colorful shapes`` grounded to all of them; one object is ``a`` + phrase."""
    n = len(objects)
    phrase = " ".join(x for x in (adjective, _plural(noun, n)) if x)
    if n == 1:
        w.add(f"{_indefinite(phrase)} ")
    else:
        phrase = f"{_count(n)} {phrase}"
    w.mention(phrase, [o.region for o in objects])


def _contents(w: _Writer, scene: Scene, adjective: str = "") -> None:
    """``five colorful shapes and a sign``."""
    shapes, signs = _shapes_and_signs(scene)
    if shapes:
        _group(w, shapes, "shape", adjective)
    if shapes and signs:
        w.add(" and ")
    if signs:
        _group(w, signs, "sign")


def _background(w: _Writer, scene: Scene, *, detail: bool = False) -> None:
    w.add(f"a {scene.background_style} {scene.background_colour} background")
    if detail:
        w.add(f" {BACKGROUND_DETAILS[scene.background_style]}")


# ---------------------------------------------------------------- the three kinds


def _brief(scene: Scene, rng: np.random.Generator) -> _Writer:
    w = _Writer("brief")
    if len(scene.objects) == 1:
        w.refer("a", scene.objects[0], size=True)
        w.add(" on ")
        _background(w, scene)
    elif len(scene.objects) == 2:
        first, second = sorted(scene.objects, key=lambda o: -o.area)
        relation = _relation(scene, first)
        w.refer("a", first)
        if relation is not None and relation[1] is second:
            w.add(f" {relation[0]} ")
        else:
            w.add(" and ")
        w.refer("a", second)
    else:
        _contents(w, scene, str(rng.choice(_GROUP_ADJECTIVES)))
        w.add(f" on a {scene.background_style} background")
    w.add(".")
    return w


def _signs_sentence(w: _Writer, scene: Scene, sign: SceneObject, *, where: bool) -> None:
    w.refer("a", sign)
    if where:
        w.add(f" {_position(scene, sign)}")
    quoted = " and ".join(f'"{word}"' for word in sign.words)
    noun = "word" if len(sign.words) == 1 else "words"
    w.add(f" carries the {noun} {quoted} in dark letters" if where else f" reads {quoted}")
    w.end_sentence()


def _object_sentence(
    w: _Writer, scene: Scene, obj: SceneObject, variant: int, *, detailed: bool
) -> None:
    relation = _relation(scene, obj)
    position = _position(scene, obj)
    if variant % 3 == 0 or not detailed:
        w.refer("a", obj, size=True)
        w.add(f" is {position}" if not detailed else f" sits {position}")
    elif variant % 3 == 1:
        w.add(f"{position}, there is ")
        w.refer("a", obj, size=True)
    else:
        w.refer("the", obj)
        w.add(f" {position} is {obj.size}")
    # A pair already related in this caption is not related again the other way round,
    # unless to say which of the two hides the other.
    if relation is not None and (
        relation[0] == "partly hidden behind" or (relation[1].region, obj.region) not in w.related
    ):
        w.related.add((obj.region, relation[1].region))
        w.add(f", {relation[0]} ")
        w.refer("the" if detailed else "a", relation[1])
    w.end_sentence()


def _remaining(w: _Writer, rest: list[SceneObject], *, detailed: bool) -> None:
    """Objects the budget left out: listed by name when few, else counted."""
    if detailed and len(rest) <= 3:
        w.add("There is also " if len(rest) == 1 else "There are also ")
        for i, obj in enumerate(rest):
            if i:
                w.add(" and " if i == len(rest) - 1 else ", ")
            w.refer("a", obj)
    else:
        _group(w, rest, "other shape" if len(rest) > 1 else "shape")
        w.add(" are scattered around" if len(rest) > 1 else " is also there")
    w.end_sentence()


def _detailed(scene: Scene, rng: np.random.Generator) -> _Writer:
    w = _Writer("detailed")
    w.add("The image shows ")
    _contents(w, scene)
    w.add(" on ")
    _background(w, scene)
    w.end_sentence()
    shapes, signs = _shapes_and_signs(scene)
    for sign in signs:
        _signs_sentence(w, scene, sign, where=False)
    rest = sorted(shapes, key=lambda o: -o.area)
    # At least one shape is described, and a last one is described rather than counted.
    while rest and (w.words() < _DETAILED_BUDGET or len(rest) in (1, len(shapes))):
        _object_sentence(w, scene, rest.pop(0), 0, detailed=False)
    if rest:
        _remaining(w, rest, detailed=False)
    if len(scene.objects) == 1:
        w.add("Nothing else is in the picture.")
    return w


def _more_detailed(scene: Scene, rng: np.random.Generator) -> _Writer:
    w = _Writer("more_detailed")
    w.add("This image shows ")
    _contents(w, scene, str(rng.choice(_GROUP_ADJECTIVES)))
    w.add(" arranged on ")
    _background(w, scene, detail=True)
    w.end_sentence()
    shapes, signs = _shapes_and_signs(scene)
    # Reading order: top to bottom by grid row, then left to right.
    rest = sorted(shapes, key=lambda o: (int(3 * o.centre[1] / scene.height), o.centre[0]))
    variant = int(rng.integers(3))
    while rest and (w.words() < _MORE_DETAILED_BUDGET or len(rest) in (1, len(shapes))):
        _object_sentence(w, scene, rest.pop(0), variant, detailed=True)
        variant += 1
    if rest:
        _remaining(w, rest, detailed=True)
    for sign in signs:
        _signs_sentence(w, scene, sign, where=True)
    if len(shapes) >= 2 and w.words() < _MORE_DETAILED_BUDGET:
        largest, smallest = max(shapes, key=lambda o: o.area), min(shapes, key=lambda o: o.area)
        w.refer("the", largest)
        w.add(" is the largest shape, and ")
        w.refer("the", smallest)
        w.add(" is the smallest")
        w.end_sentence()
    if w.words() < _MORE_DETAILED_BUDGET:
        w.add("Every shape is filled with one flat color and has crisp, sharp edges")
        w.end_sentence()
    if len(scene.objects) == 1:
        w.add("Nothing else appears in the picture, so the single object draws the eye.")
    return w
