"""CPU specialists for the generated world (``engine.world``): classic vision, no weights.

They give the engine a full annotate round on any machine, with errors that come from
their methods rather than from injected noise:

- ``ShapeDetector``: pixels quantised to the world's named palette, connected
  components per colour, a nearest-prototype shape classifier on contour features.
  Touching objects of one colour become one component (one box, a wrong shape);
  an object on a background that quantises to its own colour merges into the
  background and is lost; gradient and textured backgrounds that reach a palette
  colour give false positives.
- ``BoxPolygonMaker``: the outline of the box's colour component, holes filled.

Both know only the world, so both first measure how much of an image the world's
model explains (``world_fit``: shape-sized palette components plus a world background)
and scale their scores by it (``fit_factor``). A photo is mostly pixels of neither, so
on one they report nothing rather than palette-coloured patches as confident shapes;
on the world's own images the factor is 1 and their output is unchanged.

Shape and colour words come from the world modules, so region texts use the words
the truth uses. Captions and grounding over the detections are in
``specialists.world_text``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.measure import approximate_polygon, find_contours

from engine.config import SpecialistConfig
from engine.geometry import box_in_image, clip_points, is_valid_polygon
from engine.records import Region
from engine.world.drawing import BACKGROUND_COLOURS, COLOURS, SIGN_PLATES
from specialists.base import Annotations, Specialist, SpecialistInput

SIGN = "sign"
# Palette entries: (colour word, noun or None for any shape, RGB). Sign plates are
# entries of their own: a white plate is close to, but not, the white of the shapes.
_PALETTE: tuple[tuple[str, str | None, tuple[int, int, int]], ...] = (
    *((name, None, rgb) for name, rgb in COLOURS.items()),
    *((name, SIGN, rgb) for name, rgb in SIGN_PLATES.items()),
)
# Shape features (solidity, extent, radial spread, hole fraction, aspect) of the
# world's shapes as drawn, averaged over tilts and sizes: the classifier's prototypes.
_PROTOTYPES: dict[str, tuple[float, float, float, float, float]] = {
    "circle": (0.98, 0.78, 0.01, 0.0, 1.0),
    "ring": (0.98, 0.78, 0.01, 0.28, 1.0),
    "square": (0.96, 0.77, 0.11, 0.0, 1.0),
    "triangle": (0.96, 0.51, 0.23, 0.0, 1.0),
    "diamond": (0.95, 0.50, 0.18, 0.0, 0.69),
    "star": (0.57, 0.39, 0.23, 0.0, 0.97),
    "hexagon": (0.96, 0.70, 0.05, 0.0, 0.96),
    "cross": (0.75, 0.59, 0.21, 0.0, 1.0),
}
# How much each feature counts: radial spread separates circle / hexagon / square.
_FEATURE_SCALE = np.array([0.08, 0.08, 0.03, 0.08, 0.12])
# Defaults shared by the specialists that quantise pixels, so that each measures the
# same world fit (see the ShapeDetector docstring for what they trade).
COLOUR_TOLERANCE = 30.0
MIN_AREA = 40
MAX_AREA_FRACTION = 0.25
# The world paints its background as one named colour plus a grey field (the same
# offset on R, G and B: a gradient of +-40, stripes, checks, speckle, mottling), so its
# pixels lie on a short segment of the grey axis through that colour. Off the segment by
# more than the tolerance, or shaded farther than MAX_SHADE, a pixel is not background.
CHROMA_TOLERANCE = 12.0
MAX_SHADE = 80.0
# World fit at or below MIN_FIT: not a world image, nothing is reported; at FULL_FIT and
# above scores are the classifier's own. Measured with world_fit: 600 world images (seeds
# 0 and 7) all have 0.973 or more (0.909 after JPEG at quality 85); skimage's photos 0.07
# (colorwheel) to 0.55 (rocket; astronaut 0.31, coffee 0.16, chelsea 0.14).
MIN_FIT = 0.7
FULL_FIT = 0.9


@dataclass(frozen=True, slots=True)
class _Component:
    colour: str
    noun: str
    score: float
    box: tuple[float, float, float, float]


def quantise(pixels: np.ndarray, tolerance: float) -> np.ndarray:
    """Per pixel the index into ``_PALETTE`` of its nearest colour, or -1 when that is
    farther than ``tolerance`` (Euclidean RGB distance)."""
    rgb = pixels[..., :3].astype(np.float32)
    palette = np.array([entry[2] for entry in _PALETTE], np.float32)
    distance = np.linalg.norm(rgb[..., None, :] - palette, axis=-1)
    nearest = distance.argmin(-1)
    nearest[distance.min(-1) > tolerance] = -1
    return nearest


def world_fit(
    pixels: np.ndarray,
    labels: np.ndarray,
    min_area: int = MIN_AREA,
    max_area_fraction: float = MAX_AREA_FRACTION,
) -> float:
    """The share of an image's pixels that the world's model explains: those of a
    shape-sized component of one palette colour (``labels`` from ``quantise``; areas
    as ``ShapeDetector`` takes them) or on the background of the best-fitting named
    background colour. 1 on a plain world background; a photo's sky, skin or fur is
    neither, so its share is low even where some patches take palette colours."""
    height, width = labels.shape
    explained = np.zeros(labels.shape, bool)
    max_area = max_area_fraction * height * width
    for index in range(len(_PALETTE)):
        components, count = ndimage.label(labels == index)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        shaped = (sizes >= min_area) & (sizes <= max_area)
        shaped[0] = False  # label 0 is everything not of this colour
        explained |= shaped[components]
    rgb = pixels[..., :3].astype(np.float32)
    background = np.zeros(labels.shape, bool)
    for base in BACKGROUND_COLOURS.values():
        offset = rgb - np.asarray(base, np.float32)
        shade = offset.mean(-1)
        chroma = np.linalg.norm(offset - shade[..., None], axis=-1)
        on_it = (chroma <= CHROMA_TOLERANCE) & (np.abs(shade) <= MAX_SHADE)
        # One background per image: the colour that explains the most of what is left.
        if np.count_nonzero(on_it & ~explained) > np.count_nonzero(background & ~explained):
            background = on_it
    return float(np.mean(explained | background))


def fit_factor(fit: float, min_fit: float = MIN_FIT, full_fit: float = FULL_FIT) -> float:
    """What a world specialist multiplies its scores by: 0 at or below ``min_fit``, 1 at
    or above ``full_fit``, linear in between."""
    return float(np.clip((fit - min_fit) / max(full_fit - min_fit, 1e-9), 0.0, 1.0))


def shape_features(mask: np.ndarray) -> np.ndarray:
    """Solidity, extent, radial spread, hole fraction and aspect of one component.

    Solidity (area / convex hull) picks out stars and crosses; extent (area / box)
    triangles and diamonds; the spread of boundary distances from the centroid
    (std / mean) separates circles, hexagons and squares whatever their tilt.
    """
    from skimage.morphology import convex_hull_image

    filled = ndimage.binary_fill_holes(mask)
    area = float(filled.sum())
    rows, cols = np.nonzero(filled)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    hull = convex_hull_image(filled)
    boundary = filled & ~ndimage.binary_erosion(filled)
    by, bx = np.nonzero(boundary)
    radii = np.hypot(by - rows.mean(), bx - cols.mean())
    return np.array(
        [
            area / max(float(hull.sum()), 1.0),
            area / float(height * width),
            float(radii.std() / max(radii.mean(), 1e-6)),
            1.0 - float(mask.sum()) / area,
            min(height, width) / max(height, width),
        ]
    )


def classify(features: np.ndarray, temperature: float) -> tuple[str, float]:
    """The nearest prototype shape and a confidence: its softmax weight over all shapes
    of the negative scaled distances (``temperature`` < 1 sharpens it)."""
    names = list(_PROTOTYPES)
    prototypes = np.array([_PROTOTYPES[n] for n in names])
    distance = np.linalg.norm((prototypes - features) / _FEATURE_SCALE, axis=1)
    weights = np.exp(-(distance - distance.min()) / temperature)
    best = int(distance.argmin())
    return names[best], float(weights[best] / weights.sum())


def _components(
    pixels: np.ndarray, labels: np.ndarray, detector: ShapeDetector
) -> list[_Component]:
    height, width = pixels.shape[:2]
    max_area = detector.max_area_fraction * height * width
    found = []
    for index, (colour, plate_noun, _) in enumerate(_PALETTE):
        components, _ = ndimage.label(labels == index)
        for number, window in enumerate(ndimage.find_objects(components), start=1):
            mask = components[window] == number
            area = int(mask.sum())
            # Tiny specks are texture; a component this large is background, not a shape.
            if area < detector.min_area or area > max_area:
                continue
            features = shape_features(mask)
            if plate_noun is not None:
                # A plate is a filled rectangle: its extent is how sure the call is.
                noun, score = plate_noun, float(min(features[1], 1.0))
            else:
                noun, score = classify(features, detector.temperature)
            box = (window[1].start, window[0].start, window[1].stop, window[0].stop)
            found.append(_Component(colour, noun, score, tuple(float(v) for v in box)))
    return found


class ShapeDetector(Specialist):
    """Boxes of the world's shapes and signs, with "<colour> <shape>" texts."""

    produces = frozenset({"objects"})

    def __init__(
        self,
        config: SpecialistConfig,
        colour_tolerance: float = COLOUR_TOLERANCE,
        min_area: int = MIN_AREA,
        max_area_fraction: float = MAX_AREA_FRACTION,
        temperature: float = 1.0,
        min_score: float = 0.0,
        min_fit: float = MIN_FIT,
        full_fit: float = FULL_FIT,
    ) -> None:
        """``colour_tolerance``: RGB distance within which a pixel takes a palette colour;
        higher keeps more of a shape's pixels on noisy images but lets more background
        in. ``min_area``: smallest component in pixels (below it is texture; the world's
        smallest shapes on the smallest images have about 150). ``max_area_fraction``:
        larger components are background (the world's largest shape covers about 16%
        of an image). ``temperature``: softness of the shape confidence. ``min_score``:
        drop detections below it (0 keeps all; thresholds belong to the filter stage).
        ``min_fit`` / ``full_fit``: the world fit (``world_fit``) at or below which the
        image is not taken for a world image and nothing is reported, and from which
        scores are the classifier's own; in between they are scaled down linearly.
        Raising ``min_fit`` refuses more images, at the risk of noisy world images."""
        super().__init__(config)
        self.colour_tolerance = colour_tolerance
        self.min_area = min_area
        self.max_area_fraction = max_area_fraction
        self.temperature = temperature
        self.min_score = min_score
        self.min_fit = min_fit
        self.full_fit = full_fit

    @property
    def model_revision(self) -> str:
        return "world-shapes@2"

    def setup(self) -> None:
        """Nothing to load."""

    def annotate(self, batch: list[SpecialistInput]) -> list[Annotations]:
        return [self.detect(np.asarray(item.image.convert("RGB"))) for item in batch]

    def detect(self, pixels: np.ndarray) -> Annotations:
        """The detections of one ``height x width x 3`` image, their scores scaled by how
        well the world explains it (none when it does not)."""
        labels = quantise(pixels, self.colour_tolerance)
        fit = world_fit(pixels, labels, self.min_area, self.max_area_fraction)
        factor = fit_factor(fit, self.min_fit, self.full_fit)
        if factor == 0.0:
            return Annotations()
        regions = []
        for c in _components(pixels, labels, self):
            score = c.score * factor
            # min_score judges the scaled score: the one the filter will see.
            if score >= self.min_score:
                text = f"{c.colour} {c.noun}"
                regions.append(Region(c.box, text, "object", source="", score=score))
        return Annotations(regions=regions)


class BoxPolygonMaker(Specialist):
    """A polygon for each object box: the outline of its colour's largest component
    inside the box, holes filled (a ring's mask is its disc)."""

    needs = frozenset({"objects"})
    produces = frozenset({"polygons"})

    def __init__(
        self,
        config: SpecialistConfig,
        colour_tolerance: float = COLOUR_TOLERANCE,
        tolerance: float = 1.0,
        min_fit: float = MIN_FIT,
        full_fit: float = FULL_FIT,
    ) -> None:
        """``colour_tolerance``, ``min_fit``, ``full_fit``: as ``ShapeDetector``'s (the
        boxes may come from another detector, so the polygons' own claim, that a box
        holds a palette-coloured shape, is scaled by the world fit too).
        ``tolerance``: Douglas-Peucker distance in pixels when simplifying outlines
        (more gives fewer vertices)."""
        super().__init__(config)
        self.colour_tolerance = colour_tolerance
        self.tolerance = tolerance
        self.min_fit = min_fit
        self.full_fit = full_fit

    @property
    def model_revision(self) -> str:
        return "world-polygons@2"

    def setup(self) -> None:
        """Nothing to load."""

    def annotate(self, batch: list[SpecialistInput]) -> list[Annotations]:
        out = []
        for item in batch:
            pixels = np.asarray(item.image.convert("RGB"))
            fit = world_fit(pixels, quantise(pixels, self.colour_tolerance))
            factor = fit_factor(fit, self.min_fit, self.full_fit)
            regions = []
            for region in item.record.regions if factor > 0.0 else ():
                if region.kind != "object":
                    continue
                polygon = self._polygon(pixels, region)
                if polygon is not None:
                    score = None if region.score is None else region.score * factor
                    regions.append(
                        Region(
                            region.box,
                            region.text,
                            "object",
                            source="",
                            score=score,
                            polygons=[polygon],
                        )
                    )
            out.append(Annotations(regions=regions))
        return out

    def _polygon(self, pixels: np.ndarray, region: Region) -> list[float] | None:
        height, width = pixels.shape[:2]
        box = box_in_image(region.box, width, height)
        if box is None:
            return None
        x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
        x1, y1 = int(np.ceil(box[2])), int(np.ceil(box[3]))
        labels = quantise(pixels[y0:y1, x0:x1], self.colour_tolerance)
        wanted = _palette_index(region.text)
        if wanted is None:
            # Unknown text: the crop's most common palette colour stands for the object.
            counts = np.bincount(labels[labels >= 0].ravel(), minlength=len(_PALETTE))
            wanted = int(counts.argmax()) if counts.any() else None
        if wanted is None:
            return None
        components, count = ndimage.label(labels == wanted)
        if count == 0:
            return None
        sizes = ndimage.sum_labels(np.ones_like(components), components, range(1, count + 1))
        mask = ndimage.binary_fill_holes(components == 1 + int(np.argmax(sizes)))
        outline = max(find_contours(np.pad(mask, 1).astype(np.float32), 0.5), key=len)
        outline = approximate_polygon(outline, self.tolerance)
        # find_contours gives (row, col) on the padded crop's pixel centres.
        xs = outline[:, 1] - 0.5 + x0
        ys = outline[:, 0] - 0.5 + y0
        flat = [float(v) for point in zip(xs, ys, strict=True) for v in point]
        return clip_points(flat, width, height) if is_valid_polygon(flat) else None


def _palette_index(text: str) -> int | None:
    words = text.split()
    if len(words) < 2:
        return None
    colour, noun = words[-2], words[-1]
    for index, (name, plate_noun, _) in enumerate(_PALETTE):
        if name == colour and (plate_noun == SIGN) == (noun == SIGN):
            return index
    return None
