"""Decoding: any common mode becomes 8-bit RGB; large images are reduced, small ones keep their size."""
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import SAMPLE_DIR
import pipeline
from pipeline.images import decode

LIMIT = pipeline.settings().max_image_pixels


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_a_real_fruits_360_photo_keeps_its_100_by_100_pixels():
    photo = next((SAMPLE_DIR / "Training" / "Apple Golden 1").glob("*.jpg")).read_bytes()
    array = decode(photo, 224, LIMIT)
    assert array.shape == (100, 100, 3) and array.dtype == np.uint8


@pytest.mark.parametrize(
    "image, fmt",
    [
        (Image.new("L", (40, 30), 128), "PNG"),
        (Image.new("P", (40, 30), 3), "GIF"),
        (Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),
        (Image.new("RGB", (40, 30), (10, 200, 30)), "WEBP"),
        (Image.new("RGB", (40, 30), (10, 200, 30)), "BMP"),
        (Image.new("RGB", (40, 30), (10, 200, 30)), "TIFF"),
    ],
    ids=["grayscale", "palette", "cmyk", "webp", "bmp", "tiff"],
)
def test_every_mode_becomes_rgb(image, fmt):
    array = decode(encode(image, fmt), 224, LIMIT)
    assert array.shape == (30, 40, 3) and array.dtype == np.uint8


def test_transparent_pixels_become_white_like_the_fruits_360_background():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert (decode(encode(rgba, "PNG"), 224, LIMIT) == 255).all()


def test_16_bit_images_are_scaled_not_clipped():
    values = np.full((10, 10), 65535 // 2, dtype=np.uint16)
    array = decode(encode(Image.fromarray(values), "PNG"), 224, LIMIT)
    assert 120 <= array.mean() <= 135


def test_images_larger_than_the_model_input_are_reduced_to_it():
    assert decode(encode(Image.new("RGB", (1000, 600)), "JPEG"), 224, LIMIT).shape == (224, 224, 3)


def test_a_huge_jpeg_is_decoded_at_reduced_scale_within_the_pixel_limit():
    photo = encode(Image.new("RGB", (10_000, 10_000), (200, 30, 30)), "JPEG")
    assert decode(photo, 224, LIMIT).shape == (224, 224, 3)


def test_an_image_over_the_pixel_limit_is_refused_before_decoding():
    with pytest.raises(Image.DecompressionBombError, match="raise it if this image is expected"):
        decode(encode(Image.new("RGB", (300, 200)), "PNG"), 224, max_pixels=300 * 200 - 1)


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (40, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    assert decode(encode(image, "JPEG", exif=exif), 224, LIMIT).shape == (40, 20, 3)


def test_broken_bytes_raise_for_the_caller_to_record():
    photo = next((SAMPLE_DIR / "Training" / "Apple Golden 1").glob("*.jpg")).read_bytes()
    with pytest.raises(Exception):
        decode(b"not an image", 224, LIMIT)
    with pytest.raises(OSError):
        decode(photo[: len(photo) // 3], 224, LIMIT)
