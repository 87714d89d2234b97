"""Decoding: image bytes of any common format and mode → an RGB uint8 array no larger than the model input."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

WHITE = (255, 255, 255, 255)  # Fruits-360 photos are on white: transparent pixels become white too
# The pixel limit is checked here, after JPEG's reduced-scale decoding is chosen, so that a huge
# JPEG is decoded small instead of refused; Pillow's own check would count its full size.
Image.MAX_IMAGE_PIXELS = None


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
        image = to_rgb(ImageOps.exif_transpose(image))
        if image.width > size or image.height > size:
            image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(image)


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
