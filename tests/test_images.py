"""Decoding: any common mode becomes 8-bit RGB; large images are reduced, small ones keep their size."""
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.config import SAMPLE_DIR
import pipeline
from pipeline import images
from pipeline.config import UsageError
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
    with pytest.raises(Image.UnidentifiedImageError, match="not an image Pillow can read: 12 bytes, starting b'not an i'"):
        decode(b"not an image", 224, LIMIT)
    with pytest.raises(OSError):
        decode(photo[: len(photo) // 3], 224, LIMIT)


def pillow_decode(data: bytes, size: int) -> np.ndarray:
    """What decode gave before plain JPEGs were decoded by OpenCV: Pillow all the way."""
    from PIL import ImageOps

    from pipeline.images import to_rgb

    with Image.open(io.BytesIO(data)) as image:
        image.draft(image.mode, (size, size))
        image = to_rgb(ImageOps.exif_transpose(image))
        if image.width > size or image.height > size:
            image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(image)


def noisy_photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A seeded photo-like image: smooth colours with noise, so every DCT coefficient matters."""
    rng = np.random.default_rng(width * height)
    y, x = np.mgrid[:height, :width]
    smooth = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(smooth + rng.normal(0, 25, smooth.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.mark.parametrize("size", [32, 100, 224])
@pytest.mark.parametrize(
    "image, options",
    [
        (noisy_photo(100, 100), {"quality": 90}),
        (noisy_photo(100, 100), {"quality": 75, "subsampling": 0}),
        (noisy_photo(333, 251), {"quality": 95, "progressive": True}),
        (noisy_photo(1000, 700), {"quality": 85, "subsampling": 1}),
        (noisy_photo(97, 61, "L"), {"quality": 80}),
    ],
    ids=["thumbnail-4:2:0", "thumbnail-4:4:4", "progressive", "large-4:2:2", "grayscale"],
)
def test_plain_jpegs_decode_to_exactly_pillows_pixels(image, options, size):
    """OpenCV decodes plain JPEGs (half the CPU), at the scale Pillow's draft chooses: the pixels are Pillow's, to the bit."""
    data = encode(image, "JPEG", **options)
    with Image.open(io.BytesIO(data)) as opened:
        opened.draft(opened.mode, (size, size))
        from pipeline.images import plain_jpeg

        assert plain_jpeg(data, opened) is not None  # the fast path is the one compared
    np.testing.assert_array_equal(decode(data, size, LIMIT), pillow_decode(data, size))


def test_real_fruits_360_photos_decode_to_exactly_pillows_pixels():
    photos = sorted((SAMPLE_DIR / "Training").rglob("*.jpg"))[:40]
    for photo in photos:
        data = photo.read_bytes()
        for size in (32, 224):
            np.testing.assert_array_equal(decode(data, size, LIMIT), pillow_decode(data, size))


def test_jpegs_opencv_is_not_given_are_still_decoded_by_pillow():
    """A rotation, CMYK, a stream cut short: Pillow's result, or Pillow's error, as before."""
    from pipeline.images import plain_jpeg

    image = noisy_photo(60, 40)
    exif = image.getexif()
    exif[0x0112] = 6
    rotated, cmyk = encode(image, "JPEG", exif=exif), encode(image.convert("CMYK"), "JPEG")
    for data in (rotated, cmyk):
        with Image.open(io.BytesIO(data)) as opened:
            opened.draft(opened.mode, (224, 224))
            assert plain_jpeg(data, opened) is None
        np.testing.assert_array_equal(decode(data, 224, LIMIT), pillow_decode(data, 224))
    cut = encode(noisy_photo(300, 200), "JPEG")[:-700]
    with pytest.raises(OSError, match="truncated"):
        decode(cut, 224, LIMIT)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_partition_decodes_in_order_on_its_threads_with_each_failure_in_its_place(threads):
    from pipeline.making.featurize import decode_all

    photo = encode(noisy_photo(100, 100), "JPEG")
    blobs = [photo, b"not an image", FileNotFoundError("gone"), photo[:500], encode(noisy_photo(40, 30), "PNG")]
    decoded = decode_all(blobs, 224, images.Limits.configured(), threads)
    assert [stage for stage, _ in decoded] == [None, "decode", "read", "decode", None]
    assert decoded[0][1].shape == (100, 100, 3) and decoded[4][1].shape == (30, 40, 3)
    assert decode_all([], 224, images.Limits.configured(), threads) == []


def test_only_the_formats_the_extensions_name_are_parsed_whatever_the_bytes_say():
    eps = encode(Image.new("RGB", (50, 40)), "EPS")  # what Ghostscript would be started for
    assert images.opened(eps, ("EPS",)).format == "EPS"  # Pillow would take it for EPS from its bytes
    with pytest.raises(Image.UnidentifiedImageError, match=r"\(formats read: JPEG, PNG, GIF, BMP, WEBP, TIFF\)$"):
        decode(eps, 224, LIMIT)  # the default extensions: jpg, jpeg, png, gif, bmp, webp, tif, tiff
    png = encode(Image.new("RGB", (40, 30)), "PNG")
    with pytest.raises(Image.UnidentifiedImageError, match=r"\(formats read: JPEG\)$"):
        decode(png, 224, LIMIT, images.formats_for(("jpg", "jpeg")))


def test_extensions_map_to_pillow_formats_and_an_unknown_one_is_a_usage_error():
    assert images.formats_for(("jpg", "JPEG", ".png", "tif", "tiff")) == ("JPEG", "PNG", "TIFF")
    with pytest.raises(UsageError, match="`extensions` names heic, which Pillow cannot read"):
        images.formats_for(("jpg", "heic"))


def test_pillows_own_pixel_limit_is_left_to_other_users_and_a_jpeg_over_it_is_still_read_small():
    code = "import pipeline, pipeline.making.job, pipeline.reading.recognize; from PIL import Image; print(Image.MAX_IMAGE_PIXELS)"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(shown) == Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's default, for every importer of the package
    photo = encode(Image.new("L", (20_000, 10_000), 90), "JPEG")  # over twice Pillow's limit: Image.open refuses it
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(photo))
    assert decode(photo, 224, LIMIT).shape == (224, 224, 3)  # drafted at 1/8 scale: 2,500 × 1,250 pixels
