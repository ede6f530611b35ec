"""Input files for tests: good images of every mode, and every kind of bad input."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), "RGB")


def encode(image: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def exif_rotated_jpeg(width: int = 64, height: int = 48) -> bytes:
    """A JPEG stored landscape whose EXIF orientation (6) says: display rotated 90 degrees."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo(width, height, seed=7), "JPEG", exif=exif)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A whole, tiny JPEG whose frame header is rewritten to claim ``width`` x ``height``.

    libjpeg decodes it without an error, filling every block past the first few with
    flat grey: a truncated image that no decoder exception reveals.
    """
    data = bytearray(encode(photo(16, 16, seed=11)))
    sof = data.index(b"\xff\xc0")  # SOF0: marker, length, precision, height, width
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def good_images() -> dict[str, bytes]:
    """Distinct, usable images in the modes ingest must normalise."""
    rgba = photo(40, 30, seed=1).convert("RGBA")
    rgba.putalpha(128)
    palette = photo(40, 30, seed=2).convert("P", palette=Image.Palette.ADAPTIVE)
    gray16 = Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16))
    return {
        "rgb.jpg": encode(photo(64, 48, seed=0)),
        "alpha.png": encode(rgba, "PNG"),
        "palette.png": encode(palette, "PNG"),
        "gray.png": encode(photo(40, 30, seed=3).convert("L"), "PNG"),
        "gray16.png": encode(gray16, "PNG"),
        "cmyk.jpg": encode(photo(40, 30, seed=4).convert("CMYK")),
        "rotated.jpg": exif_rotated_jpeg(),
        "sub/nested.webp": encode(photo(32, 32, seed=5), "WEBP"),
        # The fewest bytes per pixel a Huffman JPEG can have: one bit per flat block.
        "flat.jpg": encode(Image.new("L", (512, 512), 77), progressive=True, optimize=True),
    }


def bad_files(max_pixels: int) -> dict[str, tuple[bytes, str]]:
    """File name -> (content, the quarantine reason ingest must give)."""
    truncated = encode(photo(64, 48, seed=9))[:300]
    side = int(max_pixels**0.5) + 100
    # A decompression bomb: a tiny file that would decode to more pixels than allowed.
    bomb = encode(Image.new("1", (side, side)), "PNG", optimize=True)
    # Under the pixel limit, so only the bytes' count can tell it is not whole.
    claimed = int(max_pixels**0.5) - 100
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\nshowpage\n"
    return {
        "empty.jpg": (b"", "empty file"),
        "notes.txt": (b"these are not pixels\n", "not an image"),
        "fake.png": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "truncated or corrupt"),
        "truncated.jpg": (truncated, "truncated or corrupt"),
        "bomb.png": (bomb, "image too large"),
        "claims-more.jpg": (jpeg_claiming(claimed, claimed), "truncated or corrupt"),
        # PIL can open EPS (through Ghostscript): a format outside the allowlist.
        "drawing.eps": (eps, "not an image"),
    }


def write_tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)


def write_coco(path: Path, images: dict[str, tuple[int, int]], annotations: list[dict]) -> None:
    """A COCO file for ``images`` (file name -> (width, height)) with one category set."""
    coco = {
        "images": [
            {"id": i + 1, "file_name": name, "width": w, "height": h}
            for i, (name, (w, h)) in enumerate(images.items())
        ],
        "annotations": [{"id": i + 1, **a} for i, a in enumerate(annotations)],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    path.write_text(json.dumps(coco))


def messy_input_folder(root: Path, max_pixels: int) -> dict[str, object]:
    """A folder mixing good photos, broken files, a duplicate and a hostile tar.

    Returns what a correct ingest must make of it.
    """
    root.mkdir(parents=True, exist_ok=True)
    expected_reasons: dict[str, str] = {}
    good = good_images()
    for name, data in good.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "copy-of-rgb.jpg").write_bytes(good["rgb.jpg"])
    for name, (data, reason) in bad_files(max_pixels).items():
        (root / name).write_bytes(data)
        expected_reasons[name] = reason
    shard_images = {f"{k:03d}.jpg": encode(photo(24, 24, seed=100 + k)) for k in range(3)}
    write_tar(
        root / "shard-000.tar",
        {
            **shard_images,
            "000.json": b"{}",
            "../escape.jpg": encode(photo(24, 24, seed=200)),
            "/abs.jpg": encode(photo(24, 24, seed=201)),
        },
        links={"link.jpg": "/etc/passwd"},
    )
    for member in ("../escape.jpg", "/abs.jpg", "link.jpg"):
        expected_reasons[f"shard-000.tar#{member}"] = "unsafe tar member"
    return {
        "unique_good": len(good) + len(shard_images),
        "duplicate_pairs": [("rgb.jpg", "copy-of-rgb.jpg")],
        "reasons": expected_reasons,
    }
