"""Decoding: image bytes of any common format and mode → an RGB uint8 array no larger than the model input."""
from __future__ import annotations

import io

import numpy as np
from PIL import ExifTags, Image, ImageOps

WHITE = (255, 255, 255, 255)  # Fruits-360 photos are on white: transparent pixels become white too
# The pixel limit is checked here, after JPEG's reduced-scale decoding is chosen, so that a huge
# JPEG is decoded small instead of refused; Pillow's own check would count its full size.
Image.MAX_IMAGE_PIXELS = None
JPEG_END = b"\xff\xd9"  # a JPEG's last marker: a stream without it is decoded by Pillow, which says it is truncated


def decode(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """The image as an H×W×3 uint8 array, EXIF rotation applied, first frame of an animation.

    Images larger than `size` on a side are reduced to size × size here (JPEG decodes at reduced
    scale), which bounds memory; smaller ones keep their size and are resized with their whole
    batch inside the model's graph, which is cheaper than resizing them one by one. An image that
    would still decode to more than `max_pixels` raises Image.DecompressionBombError.
    """
    try:
        opened = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:  # Pillow's message names a memory address: say what was read
        raise Image.UnidentifiedImageError(f"not an image Pillow can read: {len(data):,} bytes, starting {data[:8]!r}") from None
    with opened as image:
        image.draft(image.mode, (size, size))
        if image.width * image.height > max_pixels:
            raise Image.DecompressionBombError(
                f"{image.width} × {image.height} pixels to decode, more than the limit of {max_pixels:,} "
                "(setting max-image-pixels); raise it if this image is expected"
            )
        array = plain_jpeg(data, image)
        if array is None:
            image = to_rgb(ImageOps.exif_transpose(image))
        elif array.shape[0] > size or array.shape[1] > size:
            image = Image.fromarray(array)
        else:
            return array
        if image.width > size or image.height > size:
            image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(image)


def plain_jpeg(data: bytes, image: Image.Image) -> np.ndarray | None:
    """A complete RGB or grayscale JPEG with no EXIF rotation, decoded by OpenCV at `image`'s draft scale; else None.

    Both bundle libjpeg-turbo and give the same pixels (tests/test_images.py), but OpenCV decodes
    straight into an RGB array, where Pillow decodes into 4 bytes a pixel and copies out: half
    the CPU of a 100 × 100 thumbnail. Anything else (CMYK, a rotation, a truncated stream, a
    stream OpenCV refuses) is left to Pillow, which decodes it or raises as it always has.
    """
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or not data.endswith(JPEG_END):
        return None
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        return None
    if not image.decoderconfig:  # Pillow's draft did not apply: left to Pillow
        return None
    import cv2

    reduced = {1: 0, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
    flags = reduced[image.decoderconfig[0]] | cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION  # the scale Pillow's draft chose
    array = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if array is None or array.shape[:2] != (image.height, image.width):
        return None
    return array


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: 16-bit and float scaled to 0–255, transparency onto white."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        peak = max(float(values.max(initial=0)), 1.0)
        scale = 65535.0 if image.mode.startswith("I;16") or 255 < peak <= 65535 else max(peak, 255.0)
        image = Image.fromarray((values / scale * 255).clip(0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return image.convert("RGB")
