"""Decode one input image, refuse what cannot be used, normalise the rest to RGB JPEG.

Every image the engine stores is RGB with its EXIF orientation applied, so boxes and
polygons mean the same thing to every stage, model and exporter.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must fail loudly, never decode into a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

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

    Raises RefusedInput with one of: ``empty file``, ``file too large``, ``not an image``,
    ``image too large`` (over ``max_pixels``, which also catches decompression bombs
    before any pixel is decoded), ``truncated or corrupt``.
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
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        # A known signature with a header PIL cannot read is a damaged image, not a stray file.
        reason = "truncated or corrupt" if data.startswith(IMAGE_SIGNATURES) else "not an image"
        # PIL's message names the in-memory buffer's address: not a stable detail.
        raise RefusedInput(reason, "no decoder recognises the data") from exc
    except Image.DecompressionBombError as exc:
        raise RefusedInput("image too large", str(exc)) from exc
    except Exception as exc:  # PIL raises many types for malformed headers
        raise RefusedInput("truncated or corrupt", f"{type(exc).__name__}: {exc}") from exc

    width, height = image.size
    if width <= 0 or height <= 0:
        raise RefusedInput("truncated or corrupt", f"size {width}x{height}")
    if width * height > max_pixels:
        raise RefusedInput("image too large", f"{width}x{height} > {max_pixels} pixels")
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
