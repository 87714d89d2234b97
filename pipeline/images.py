"""Decoding: image bytes of any common format and mode → an RGB uint8 array no larger than the model input."""
from __future__ import annotations

import dataclasses
import functools
import io
import struct

import dask.config
import numpy as np
from PIL import ExifTags, Image, ImageOps

from .config import UsageError

WHITE = (255, 255, 255, 255)  # Fruits-360 photos are on white: transparent pixels become white too
JPEG_END = b"\xff\xd9"  # a JPEG's last marker: a stream without it is decoded by Pillow, which says it is truncated


@dataclasses.dataclass(frozen=True)
class Limits:
    """What an untrusted image may be: its bytes (checked as it is read), its formats, its pixels once drafted."""

    max_bytes: int
    max_pixels: int
    formats: tuple[str, ...]  # Pillow's names: JPEG, PNG...

    @classmethod
    def of(cls, s) -> "Limits":
        """The limits of a run's settings (config.Settings)."""
        return cls(s.max_image_bytes, s.max_image_pixels, formats_for(s.extensions))

    @classmethod
    def configured(cls) -> "Limits":
        """The limits of pipeline.yaml (and DASK_PIPELINE__* variables): for images decoded outside a run."""
        get = dask.config.get
        return cls(get("pipeline.max-image-bytes"), get("pipeline.max-image-pixels"), formats_for(tuple(get("pipeline.extensions"))))


@functools.cache
def formats_for(extensions: tuple[str, ...]) -> tuple[str, ...]:
    """The Pillow formats that files ending in `extensions` are read as (jpg, jpeg → JPEG): no other is ever parsed."""
    known = Image.registered_extensions()  # loads every plugin's registration
    unknown = [e for e in extensions if f".{e.lower().lstrip('.')}" not in known]
    if unknown:
        raise UsageError(f"`extensions` names {', '.join(unknown)}, which Pillow cannot read: remove them or install their plugin")
    return tuple(dict.fromkeys(known[f".{e.lower().lstrip('.')}"] for e in extensions))


def decode(data: bytes, size: int, max_pixels: int, formats: tuple[str, ...] | None = None) -> np.ndarray:
    """The image as an H×W×3 uint8 array, EXIF rotation applied, first frame of an animation.

    Only `formats` are parsed (default: those of the `extensions` setting): a .jpg that is really
    EPS never reaches Ghostscript. Images larger than `size` on a side are reduced to size × size
    here (JPEG decodes at reduced scale), which bounds memory; smaller ones keep their size and are
    resized with their whole batch inside the model's graph, which is cheaper than resizing them
    one by one. An image that would still decode to more than `max_pixels` raises
    Image.DecompressionBombError.
    """
    with opened(data, formats or Limits.configured().formats) as image:
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


def opened(data: bytes, formats: tuple[str, ...]) -> Image.Image:
    """`data` opened by the first of `formats` that accepts it, as Image.open(formats=...) opens it, less its pixel check.

    Image.open checks the full size against the process-wide Image.MAX_IMAGE_PIXELS before
    decode() can choose a JPEG's reduced scale; decode() checks the pixels itself, after. So the
    pipeline needs no global change to Pillow's limit, which stays for every other user of Pillow.
    """
    for name in formats:
        if name not in Image.OPEN:
            Image.init()  # a worker given formats named elsewhere: load the plugins
        factory, accept = Image.OPEN[name]  # the registry Image.open reads (Image.register_open)
        accepted = accept(data[:16]) if accept else True
        if accepted and not isinstance(accepted, str):  # a str: Pillow's reason not to
            try:
                return factory(io.BytesIO(data), "")
            except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open takes for "not this format"
                continue
    raise Image.UnidentifiedImageError(f"not an image Pillow can read: {len(data):,} bytes, starting {data[:8]!r} "
                                       f"(formats read: {', '.join(formats)})")


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
