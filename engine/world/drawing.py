"""Drawing a scene of the generated world, with the visible mask of everything drawn.

``draw_scene`` paints a textured or gradient background, 1 to ``MAX_OBJECTS`` shapes
(``SHAPES`` x ``COLOURS`` x ``SIZES``), sometimes a shape hidden on purpose and
sometimes signs with printed words, and returns the pixels with a ``DrawnObject`` per
thing drawn, in draw order. The rules that make the truth exact:

- Shapes are drawn without anti-aliasing and painted in draw order, so an object's
  visible mask (its own pixels minus those of everything drawn later) is exactly the
  set of pixels that show its colour.
- A new object is placed only where it leaves every earlier one at least
  ``MIN_VISIBLE`` of its pixels, and touches no visible object of its own colour
  (their common outline would vanish). Some objects are placed touching another:
  beside it, then slid until the two outlines are neighbouring pixels.
- With ``HIDDEN_PROBABILITY`` a small shape is drawn entirely behind a large solid
  one: drawn, but with no visible pixel.
- Signs (a plate, a border, one word per line) are drawn last and never overlap each
  other, so their words are never covered. Text is anti-aliased, which OCR reads
  better; ``SignLine.alpha`` is its exact coverage, cropped to the inked pixels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "star", "ring", "diamond", "hexagon", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 38, 38),
    "orange": (242, 133, 20),
    "yellow": (240, 212, 32),
    "green": (34, 160, 64),
    "blue": (36, 84, 214),
    "purple": (130, 52, 186),
    "pink": (240, 120, 186),
    "brown": (120, 70, 30),
    "black": (18, 18, 18),
    "white": (250, 250, 250),
}
# Extent of a shape as a fraction of the image's shorter side.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.10, 0.15),
    "medium": (0.19, 0.26),
    "large": (0.31, 0.40),
}
SIGN_PLATES: dict[str, tuple[int, int, int]] = {"white": (244, 244, 238), "yellow": (246, 216, 84)}
SIGN_INKS = ((20, 20, 24), (16, 30, 90), (112, 14, 18))
SIGN_BORDER = (150, 150, 144)
SIGN_BORDER_WIDTH = 2
# Words RapidOCR reads reliably at the sizes used here; a line holds one word, since
# OCR engines often drop the space between two ("NO ENTRY" -> "NOENTRY").
SIGN_WORDS = (
    "STOP", "EXIT", "OPEN", "SALE", "CAFE", "HOTEL", "PARK", "BOOKS", "BAKERY", "MUSEUM",
    "TAXI", "SCHOOL", "MARKET", "GARAGE", "DINER", "BANK", "PIZZA", "TICKETS", "OFFICE",
    "LIBRARY", "STATION", "GARDEN", "FERRY", "WELCOME", "Cafe", "Books", "Bakery",
    "Museum", "Market", "Garden", "Open", "Hotel", "Pharmacy", "Station", "Welcome",
)  # fmt: skip
SIGN_PAIRS = (("NO", "ENTRY"), ("ONE", "WAY"), ("OPEN", "24H"), ("BUS", "STOP"), ("CITY", "PARK"))
# Muted backgrounds, so that saturated, black and white shapes stand out on every one.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "beige": (190, 176, 146),
    "slate": (102, 116, 136),
    "olive": (124, 130, 96),
    "sand": (176, 160, 122),
    "mauve": (148, 126, 144),
}
BACKGROUND_STYLES = ("gradient", "striped", "checkered", "speckled", "mottled")
MIN_SIDE, MAX_SIDE = 192, 384
MAX_OBJECTS = 10
MIN_VISIBLE = 0.4
SIGN_PROBABILITY = 0.4
HIDDEN_PROBABILITY = 0.2
TOUCH_PROBABILITY = 0.3
# Shapes without gaps, behind which a small one can vanish entirely.
_SOLID = ("circle", "square", "hexagon", "diamond")
_PLACEMENT_TRIES = 25


@dataclass(frozen=True, slots=True)
class SignLine:
    """One printed word: its anti-aliased ink (``alpha``, cropped to the inked pixels)
    at ``(x, y)`` inside the sign."""

    word: str
    x: int
    y: int
    alpha: np.ndarray

    def box(self, sign_x: int, sign_y: int) -> tuple[float, float, float, float]:
        x0, y0 = sign_x + self.x, sign_y + self.y
        return (
            float(x0),
            float(y0),
            float(x0 + self.alpha.shape[1]),
            float(y0 + self.alpha.shape[0]),
        )


@dataclass(slots=True)
class DrawnObject:
    """Something drawn on the image, in draw order, visible or not.

    ``mask`` is its shape on its own canvas, whose top-left pixel is ``(x, y)`` in the
    image; ``visible`` (same canvas) holds the pixels not covered by anything drawn
    later. An object with no visible pixel is not in the truth.
    """

    noun: str
    colour: str
    size: str
    x: int
    y: int
    mask: np.ndarray
    visible: np.ndarray
    rgb: tuple[int, int, int]
    hidden_on_purpose: bool = False
    lines: tuple[SignLine, ...] = ()
    ink: tuple[int, int, int] = (0, 0, 0)

    @property
    def canvas_box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.x + self.mask.shape[1], self.y + self.mask.shape[0]


def draw_scene(
    rng: np.random.Generator, width: int, height: int
) -> tuple[np.ndarray, str, str, list[DrawnObject]]:
    """Pixels (``height x width x 3`` uint8), background style and colour name, and every
    object drawn, in draw order, each with its final visible mask."""
    pixels, style, colour = _background(rng, width, height)
    drawn = _place_shapes(rng, width, height)
    _hide_one(rng, drawn, min(width, height))
    if rng.random() < SIGN_PROBABILITY:
        _place_signs(rng, drawn, width, height)
    _compute_visibility(drawn, width, height)
    for obj in drawn:
        _paint(pixels, obj)
    return pixels, style, colour, drawn


# ---------------------------------------------------------------- shapes


def _regular(n: int, radius: float, centre: float, angle: float, inner: float = 0.0) -> list:
    """Vertices of a regular polygon, or of a star whose inner radius is ``inner``."""
    count = 2 * n if inner else n
    t = angle - np.pi / 2 + np.arange(count) * 2 * np.pi / count
    r = np.full(count, radius)
    if inner:
        r[1::2] *= inner
    return list(
        zip((centre + r * np.cos(t)).tolist(), (centre + r * np.sin(t)).tolist(), strict=True)
    )


def _shape_mask(shape: str, extent: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean ``extent x extent`` mask of ``shape``, drawn without anti-aliasing."""
    canvas = Image.new("L", (extent, extent), 0)
    draw = ImageDraw.Draw(canvas)
    last = extent - 1
    mid = last / 2
    tilt = float(rng.uniform(-0.3, 0.3))
    if shape in ("circle", "ring"):
        draw.ellipse([0, 0, last, last], fill=255)
        if shape == "ring":
            hole = extent * float(rng.uniform(0.2, 0.28))
            draw.ellipse([hole, hole, last - hole, last - hole], fill=0)
    elif shape == "square":
        # A tilted square, as large as fits: its circumradius shrinks with the tilt.
        radius = mid / (abs(np.cos(tilt)) + abs(np.sin(tilt))) * np.sqrt(2)
        draw.polygon(_regular(4, radius, mid, tilt + np.pi / 4), fill=255)
    elif shape == "triangle":
        draw.polygon([(mid, 0), (last, last), (0, last)], fill=255)
    elif shape == "diamond":
        half = extent * 0.34
        draw.polygon([(mid, 0), (mid + half, mid), (mid, last), (mid - half, mid)], fill=255)
    elif shape == "star":
        draw.polygon(_regular(5, mid, mid, tilt, inner=0.45), fill=255)
    elif shape == "hexagon":
        draw.polygon(_regular(6, mid, mid, tilt), fill=255)
    elif shape == "cross":
        arm = extent * 0.17
        draw.rectangle([mid - arm, 0, mid + arm, last], fill=255)
        draw.rectangle([0, mid - arm, last, mid + arm], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(canvas) > 0


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, str, str]:
    style = str(rng.choice(BACKGROUND_STYLES))
    colour = str(rng.choice(list(BACKGROUND_COLOURS)))
    y, x = np.ogrid[0:height, 0:width]
    angle = rng.uniform(0, np.pi)
    along = (x * np.cos(angle) + y * np.sin(angle)).astype(np.float32)
    if style == "gradient":
        span = np.ptp(along) or 1.0
        field = (0.5 - (along - along.min()) / span) * 80
    elif style == "striped":
        period = rng.uniform(8, 18)
        field = 14 * np.sign(np.sin(2 * np.pi * along / period))
    elif style == "checkered":
        cell = int(rng.integers(12, 30))
        field = 12.0 * (((x // cell + y // cell) % 2) * 2 - 1)
    elif style == "speckled":
        field = rng.normal(0, 14, (height, width)).astype(np.float32)
    else:
        blobs = rng.normal(0, 24, (height // 32 + 2, width // 32 + 2)).astype(np.float32)
        field = np.asarray(Image.fromarray(blobs).resize((width, height), Image.Resampling.BICUBIC))
    base = np.asarray(BACKGROUND_COLOURS[colour], np.float32)
    pixels = base + np.broadcast_to(field, (height, width))[..., None]
    return np.clip(pixels, 0, 255).astype(np.uint8), style, colour


# ---------------------------------------------------------------- layout


def overlap(a: DrawnObject, b: DrawnObject, grow: int = 0) -> tuple[tuple, tuple] | None:
    """Slices of ``a``'s and ``b``'s canvases over the same image pixels, with ``b``'s
    canvas grown by ``grow`` pixels on each side (for contact tests); None if apart."""
    ax0, ay0, ax1, ay1 = a.canvas_box
    bx0, by0, bx1, by1 = b.canvas_box
    x0, y0 = max(ax0, bx0 - grow), max(ay0, by0 - grow)
    x1, y1 = min(ax1, bx1 + grow), min(ay1, by1 + grow)
    if x0 >= x1 or y0 >= y1:
        return None
    in_a = (slice(y0 - ay0, y1 - ay0), slice(x0 - ax0, x1 - ax0))
    in_b = (slice(y0 - by0 + grow, y1 - by0 + grow), slice(x0 - bx0 + grow, x1 - bx0 + grow))
    return in_a, in_b


def grown(mask: np.ndarray) -> np.ndarray:
    """``mask`` dilated by one pixel (4-neighbourhood), on a canvas one pixel larger."""
    out = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), bool)
    out[1:-1, 1:-1] = mask
    out[:-2, 1:-1] |= mask
    out[2:, 1:-1] |= mask
    out[1:-1, :-2] |= mask
    out[1:-1, 2:] |= mask
    return out


def _acceptable(new: DrawnObject, objects: list[DrawnObject], width: int, height: int) -> bool:
    """In the image, leaves every earlier object ``MIN_VISIBLE`` of its pixels, and
    touches no visible object of its own colour (their outline would vanish)."""
    x0, y0, x1, y1 = new.canvas_box
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return False
    dilated = grown(new.mask)
    for old in objects:
        common = overlap(old, new)
        if common is not None:
            hidden = np.count_nonzero(old.visible[common[0]] & new.mask[common[1]])
            left = np.count_nonzero(old.visible) - hidden
            if hidden and left < MIN_VISIBLE * np.count_nonzero(old.mask):
                return False
        if old.colour == new.colour and old.noun != "sign" and new.noun != "sign":
            near = overlap(old, new, grow=1)
            if near is not None and (old.visible[near[0]] & dilated[near[1]]).any():
                return False
    return True


def _cover(objects: list[DrawnObject], new: DrawnObject) -> None:
    for old in objects:
        common = overlap(old, new)
        if common is not None:
            old.visible[common[0]] &= ~new.mask[common[1]]


def _gap(a: np.ndarray, ax: int, ay: int, b: np.ndarray, bx: int, by: int) -> int | None:
    """Background columns between mask ``a`` and mask ``b`` lying to its right, over the
    rows where both have pixels (None when they share no row)."""
    top, bottom = max(ay, by), min(ay + a.shape[0], by + b.shape[0])
    if top >= bottom:
        return None
    a_rows, b_rows = a[top - ay : bottom - ay], b[top - by : bottom - by]
    both = a_rows.any(1) & b_rows.any(1)
    if not both.any():
        return None
    a_last = a.shape[1] - 1 - np.argmax(a_rows[:, ::-1], axis=1)
    b_first = np.argmax(b_rows, axis=1)
    return int(((bx + b_first) - (ax + a_last) - 1)[both].min())


def _touching_position(
    rng: np.random.Generator, anchor: DrawnObject, mask: np.ndarray
) -> tuple[int, int] | None:
    """A position where ``mask`` touches ``anchor``'s shape: put beside its canvas on a
    random side, then slid towards it until the two outlines are neighbouring pixels."""
    ax0, ay0, ax1, ay1 = anchor.canvas_box
    h, w = mask.shape
    side = int(rng.integers(4))
    if side < 2:  # right or left
        y = int((ay0 + ay1 - h) / 2 + rng.uniform(-0.3, 0.3) * h)
        if side == 0:
            gap = _gap(anchor.mask, ax0, ay0, mask, ax1, y)
            return None if gap is None else (ax1 - gap, y)
        gap = _gap(mask, ax0 - w, y, anchor.mask, ax0, ay0)
        return None if gap is None else (ax0 - w + gap, y)
    x = int((ax0 + ax1 - w) / 2 + rng.uniform(-0.3, 0.3) * w)
    if side == 2:  # below
        gap = _gap(anchor.mask.T, ay0, ax0, mask.T, ay1, x)
        return None if gap is None else (x, ay1 - gap)
    gap = _gap(mask.T, ay0 - h, x, anchor.mask.T, ay0, ax0)
    return None if gap is None else (x, ay0 - h + gap)


def _place_shapes(rng: np.random.Generator, width: int, height: int) -> list[DrawnObject]:
    short = min(width, height)
    objects: list[DrawnObject] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        shape = str(rng.choice(SHAPES))
        colour = str(rng.choice(list(COLOURS)))
        size = str(rng.choice(list(SIZES)))
        extent = int(short * rng.uniform(*SIZES[size]))
        mask = _shape_mask(shape, extent, rng)
        new = DrawnObject(shape, colour, size, 0, 0, mask, mask.copy(), COLOURS[colour])
        for _ in range(_PLACEMENT_TRIES):
            position = None
            if objects and rng.random() < TOUCH_PROBABILITY:
                anchor = objects[int(rng.integers(len(objects)))]
                position = _touching_position(rng, anchor, mask)
            if position is None:
                position = (
                    int(rng.integers(width - extent + 1)),
                    int(rng.integers(height - extent + 1)),
                )
            new.x, new.y = position
            if _acceptable(new, objects, width, height):
                _cover(objects, new)
                objects.append(new)
                break
    return objects


def _hide_one(rng: np.random.Generator, objects: list[DrawnObject], short: int) -> None:
    """Sometimes draw a small shape entirely behind a large solid one: it is in the
    picture's making but not in its truth."""
    solid = [i for i, o in enumerate(objects) if o.size == "large" and o.noun in _SOLID]
    if not solid or rng.random() >= HIDDEN_PROBABILITY:
        return
    cover = objects[solid[int(rng.integers(len(solid)))]]
    extent = max(8, int(short * 0.08))
    shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
    mask = _shape_mask(shape, extent, rng)
    for _ in range(_PLACEMENT_TRIES):
        dx, dy = (int(v) for v in rng.integers(0, cover.mask.shape[0] - extent + 1, size=2))
        window = cover.mask[dy : dy + extent, dx : dx + extent]
        if not (mask & ~window).any():
            hidden = DrawnObject(
                shape, colour, "small", cover.x + dx, cover.y + dy, mask,
                np.zeros_like(mask), COLOURS[colour], hidden_on_purpose=True,
            )  # fmt: skip
            objects.insert(objects.index(cover), hidden)
            return


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=1024)
def _ink(word: str, size: int) -> np.ndarray:
    """The anti-aliased coverage of ``word`` at ``size`` px, cropped to its inked pixels."""
    font = _font(size)
    right, bottom = font.getbbox(word)[2:]
    canvas = Image.new("L", (right + 2, bottom + 2), 0)
    ImageDraw.Draw(canvas).text((0, 0), word, font=font, fill=255)
    alpha = np.asarray(canvas)
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    return alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _make_sign(rng: np.random.Generator, short: int) -> DrawnObject:
    if rng.random() < 0.25:
        words = SIGN_PAIRS[int(rng.integers(len(SIGN_PAIRS)))]
    else:
        words = (str(rng.choice(SIGN_WORDS)),)
    # Under 12 px RapidOCR starts to misread; signs scale with the image.
    size = int(np.clip(short * rng.uniform(0.055, 0.075), 12, 24))
    inks = [_ink(word, size) for word in words]
    inner = max(a.shape[1] for a in inks)
    pad, gap = max(4, size // 2), max(3, size // 3)
    lines, y = [], SIGN_BORDER_WIDTH + pad
    for word, alpha in zip(words, inks, strict=True):
        x = SIGN_BORDER_WIDTH + pad + (inner - alpha.shape[1]) // 2
        lines.append(SignLine(word, x, y, alpha))
        y += alpha.shape[0] + gap
    shape = (y - gap + pad + SIGN_BORDER_WIDTH, inner + 2 * (pad + SIGN_BORDER_WIDTH))
    plate = str(rng.choice(list(SIGN_PLATES)))
    ink = SIGN_INKS[int(rng.integers(len(SIGN_INKS)))]
    mask = np.ones(shape, bool)
    return DrawnObject(
        "sign", plate, "", 0, 0, mask, mask.copy(), SIGN_PLATES[plate], lines=tuple(lines), ink=ink
    )


def _place_signs(
    rng: np.random.Generator, objects: list[DrawnObject], width: int, height: int
) -> None:
    """One or two signs, drawn last so that their words are never covered."""
    for _ in range(1 if rng.random() < 0.75 else 2):
        sign = _make_sign(rng, min(width, height))
        h, w = sign.mask.shape
        if w > width or h > height:
            continue
        signs = [o for o in objects if o.noun == "sign"]
        for _ in range(_PLACEMENT_TRIES):
            sign.x, sign.y = int(rng.integers(width - w + 1)), int(rng.integers(height - h + 1))
            apart = all(overlap(other, sign, grow=2) is None for other in signs)
            if apart and _acceptable(sign, objects, width, height):
                _cover(objects, sign)
                objects.append(sign)
                break


def _compute_visibility(objects: list[DrawnObject], width: int, height: int) -> None:
    """Visible = own pixels minus those of everything drawn later, from the top down."""
    covered = np.zeros((height, width), bool)
    for obj in reversed(objects):
        x0, y0, x1, y1 = obj.canvas_box
        obj.visible = obj.mask & ~covered[y0:y1, x0:x1]
        covered[y0:y1, x0:x1] |= obj.mask


def _paint(pixels: np.ndarray, obj: DrawnObject) -> None:
    x0, y0, x1, y1 = obj.canvas_box
    window = pixels[y0:y1, x0:x1]
    if obj.noun != "sign":
        window[obj.mask] = obj.rgb
        return
    b = SIGN_BORDER_WIDTH
    window[:] = SIGN_BORDER
    window[b:-b, b:-b] = obj.rgb
    plate, ink = np.asarray(obj.rgb, np.float32), np.asarray(obj.ink, np.float32)
    for line in obj.lines:
        h, w = line.alpha.shape
        coverage = line.alpha[..., None].astype(np.float32) / 255
        blended = plate * (1 - coverage) + ink * coverage
        window[line.y : line.y + h, line.x : line.x + w] = np.rint(blended).astype(np.uint8)
