import io

import pytest
from PIL import Image

from stages.image_decode import RefusedInput, decode_image
from tests.inputs import bad_files, encode, exif_rotated_jpeg, good_images, jpeg_claiming, photo

LIMITS = {"max_pixels": 4_000_000, "max_bytes": 10_000_000, "jpeg_quality": 95}


@pytest.mark.parametrize("name", sorted(good_images()))
def test_good_images_become_rgb_jpeg(name):
    decoded = decode_image(good_images()[name], **LIMITS)
    image = Image.open(io.BytesIO(decoded.jpeg))
    assert image.format == "JPEG" and image.mode == "RGB"
    assert image.size == (decoded.width, decoded.height)


def test_plain_rgb_jpeg_is_kept_byte_for_byte():
    data = encode(photo())
    assert decode_image(data, **LIMITS).jpeg == data


def test_exif_orientation_is_applied():
    decoded = decode_image(exif_rotated_jpeg(64, 48), **LIMITS)
    assert (decoded.width, decoded.height) == (48, 64)


def test_alpha_is_composited_on_white():
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    decoded = decode_image(encode(transparent, "PNG"), **LIMITS)
    pixel = Image.open(io.BytesIO(decoded.jpeg)).getpixel((4, 4))
    assert min(pixel) > 245


def test_16_bit_range_is_scaled_not_clipped():
    ramp = Image.new("I;16", (4, 1))
    ramp.putdata([0, 1000, 2000, 3000])
    decoded = decode_image(encode(ramp, "PNG"), **LIMITS)
    values = [p[0] for p in Image.open(io.BytesIO(decoded.jpeg)).getdata()]
    assert values[0] < 10 and values[-1] > 245 and values == sorted(values)


@pytest.mark.parametrize("name", sorted(bad_files(LIMITS["max_pixels"])))
def test_bad_inputs_are_refused_with_their_reason(name):
    data, reason = bad_files(LIMITS["max_pixels"])[name]
    with pytest.raises(RefusedInput) as refused:
        decode_image(data, **LIMITS)
    assert refused.value.reason == reason


def test_file_over_the_byte_limit_is_refused():
    with pytest.raises(RefusedInput, match="file too large"):
        decode_image(encode(photo()), **{**LIMITS, "max_bytes": 100})


def test_jpeg_claiming_more_pixels_than_its_bytes_hold_is_refused():
    # 6000x6000 within the pixel limit, in a few hundred bytes: libjpeg would pad it out
    # to 108 MB of grey without an error. Refused from the header, before decoding.
    data = jpeg_claiming(6000, 6000)
    with pytest.raises(RefusedInput, match="header claims 6000x6000") as refused:
        decode_image(data, **{**LIMITS, "max_pixels": 40_000_000})
    assert refused.value.reason == "truncated or corrupt"
