"""Decode one input image, refuse what cannot be used, normalise the rest to RGB JPEG.

Every image the engine stores is RGB with its EXIF orientation applied, so boxes and
polygons mean the same thing to every stage, model and exporter.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, UnidentifiedImageError

# A truncated file must fail loudly, never decode into a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Only these are ever parsed: every other PIL plugin is attack surface for formats no
# dataset needs (EPS would even run Ghostscript). The names are PIL's format ids; they
# match the extensions of ``ingest.image_extensions``.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

IMAGE_SIGNATURES = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF8",
    b"RIFF",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
)


class RefusedInput(Exception):
    """An input the engine cannot use; ``reason`` is a short stable label for reports."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class DecodedImage:
    jpeg: bytes
    width: int
    height: int


def decode_image(
    data: bytes, *, max_pixels: int, max_bytes: int, jpeg_quality: int
) -> DecodedImage:
    """Check and normalise one encoded image.

    Raises RefusedInput with one of: ``empty file``, ``file too large``, ``not an image``
    (anything but ``ALLOWED_FORMATS``), ``image too large`` (over ``max_pixels``, which
    also catches decompression bombs before any pixel is decoded), ``truncated or
    corrupt`` (including a JPEG too short for the size its header claims).
    A baseline RGB JPEG that needs no rotation is kept byte for byte; anything else is
    re-encoded once at ``jpeg_quality``.
    """
    if not data:
        raise RefusedInput("empty file")
    if len(data) > max_bytes:
        raise RefusedInput("file too large", f"{len(data)} bytes > {max_bytes}")
    try:
        with warnings.catch_warnings():
            # PIL warns between 1x and 2x its limit; our own check below is the one rule.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as exc:
        # A known signature with a header PIL cannot read is a damaged image, not a stray file.
        if data.startswith(IMAGE_SIGNATURES):
            raise RefusedInput("truncated or corrupt", "no decoder recognises the data") from exc
        # PIL's message names the in-memory buffer's address: not a stable detail.
        raise RefusedInput("not an image", f"not one of {', '.join(ALLOWED_FORMATS)}") from exc
    except Image.DecompressionBombError as exc:
        raise RefusedInput("image too large", str(exc)) from exc
    except Exception as exc:  # PIL raises many types for malformed headers
        raise RefusedInput("truncated or corrupt", f"{type(exc).__name__}: {exc}") from exc

    width, height = image.size
    if width <= 0 or height <= 0:
        raise RefusedInput("truncated or corrupt", f"size {width}x{height}")
    if width * height > max_pixels:
        raise RefusedInput("image too large", f"{width}x{height} > {max_pixels} pixels")
    if isinstance(image, JpegImagePlugin.JpegImageFile):  # MPO (camera JPEGs) included
        _check_jpeg_holds_its_pixels(data, width, height)
    try:
        image.load()
        orientation = image.getexif().get(0x0112, 1)
        keep_bytes = image.format == "JPEG" and image.mode == "RGB" and orientation == 1
        if keep_bytes:
            return DecodedImage(data, width, height)
        rgb = to_rgb(ImageOps.exif_transpose(image))
    except RefusedInput:
        raise
    except Exception as exc:  # truncated data surfaces as OSError, SyntaxError, ValueError...
        raise RefusedInput("truncated or corrupt", f"{type(exc).__name__}: {exc}") from exc
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=jpeg_quality)
    return DecodedImage(out.getvalue(), rgb.width, rgb.height)


# Start-of-frame markers of Huffman-coded JPEGs (baseline, extended, progressive,
# lossless and their hierarchical forms); SOF9-SOF15 are arithmetic-coded.
_HUFFMAN_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7})
_ARITHMETIC_FRAMES = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _check_jpeg_holds_its_pixels(data: bytes, width: int, height: int) -> None:
    """Refuse a JPEG too short to code the pixels its header claims.

    libjpeg does not fail when the scan data ends at an EOI marker before the last block:
    it fills the rest with flat grey, the half-grey image that ``LOAD_TRUNCATED_IMAGES``
    is set to refuse. So a header claiming 6000x6000 over a few hundred bytes decodes
    "successfully" to 108 MB of grey. A Huffman-coded scan spends at least one bit on
    every 8x8 block of a full-resolution component (its DC code, even for a flat block),
    so fewer bits than blocks cannot be a whole image; checking before decoding costs
    nothing. Arithmetic coding has no such floor and is left to the decoder.
    """
    if _frame_marker(data) not in _HUFFMAN_FRAMES:
        return
    blocks = -(-width // 8) * -(-height // 8)
    if len(data) * 8 < blocks:
        at_least = -(-blocks // 8)
        detail = f"header claims {width}x{height}: >= {at_least} bytes, file has {len(data)}"
        raise RefusedInput("truncated or corrupt", detail)


def _frame_marker(data: bytes) -> int | None:
    """The SOF marker code of a JPEG (walking the marker segments), None if none is found."""
    position = 2  # after SOI
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in _HUFFMAN_FRAMES or marker in _ARITHMETIC_FRAMES:
            return marker
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any PIL mode: alpha composited on white, 16-bit scaled, CMYK/palette converted."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale the actual range to 8 bits instead of clipping at 255.
        image = image.convert("I")
        low, high = image.getextrema()
        scale = 255.0 / (high - low) if high > low else 0.0
        image = image.point(lambda v: (v - low) * scale).convert("L")
    if image.mode == "F":
        image = image.convert("L")
    if image.mode == "P":
        has_alpha = "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")
