"""A larger image set made from the shared Fruits-360 apples: flips, rotations and crops of each photo.

Image i of the new set is photo i mod n of the source, changed by variant i // n (variant 0 is the
photo as it is, the others flip, rotate by a multiple of 90° and crop 70–95% of it at a seeded
place, then bring it back to the photo's size). The set is the same on every machine and keeps
the source's layout (Training/<label>/<name>.jpg), so labels and splits come out the same.
With --colour the variants also get seeded changes of saturation, brightness and contrast (the
flips, rotations and crops stay those of the same variant without it). With --start S the images
are numbers S to S + count - 1 of the set: more images that no earlier set of S holds.

    .venv/bin/python benchmarks/make_images.py /tmp/apples-20000 --count 20000
    .venv/bin/python benchmarks/make_images.py /tmp/more --count 200 --start 20000   # 200 more, other names
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import sys

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "fruits-360-apples"
ROTATIONS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)


def source_images(folder: pathlib.Path) -> list[pathlib.Path]:
    """The .jpg photos under `folder`, sorted by path so that every machine makes the same set."""
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg"))
    if not found:
        sys.exit(f"error: no .jpg images under {folder} (give --source PATH)")
    return found


def variant(image: Image.Image, number: int, seed: int) -> Image.Image:
    """Variant `number` of a photo: 0 is the photo; others mirror, rotate and crop it (seeded)."""
    if number == 0:
        return image
    rng = np.random.default_rng([seed, number])
    if number % 2:
        image = ImageOps.mirror(image)
    rotation = ROTATIONS[(number // 2) % 4]
    if rotation is not None:
        image = image.transpose(rotation)
    width, height = image.size
    side = rng.uniform(0.70, 0.95)
    crop_w, crop_h = max(1, round(width * side)), max(1, round(height * side))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    return image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.BILINEAR)


def recolour(image: Image.Image, number: int, seed: int) -> Image.Image:
    """Variant `number`'s colours: seeded saturation, brightness and contrast changes (0 is left as it is)."""
    if number == 0:
        return image
    saturation, brightness, contrast = np.random.default_rng([seed, number, 1]).uniform((0.6, 0.8, 0.8), (1.4, 1.2, 1.2))
    image = ImageEnhance.Color(image).enhance(saturation)
    image = ImageEnhance.Brightness(image).enhance(brightness)
    return ImageEnhance.Contrast(image).enhance(contrast)


def make_images(source: pathlib.Path, target: pathlib.Path, count: int, workers: int | None = None, *,
                start: int = 0, colour: bool = False) -> int:
    """Write `count` images under `target` (made from the photos under `source`), on every core; returns bytes written.

    `start`: the number of the first image (images start to start + count - 1 of the set, named
    apart from those of any other range); `colour`: change the variants' colours too.
    """
    photos = source_images(source)
    workers = workers or len(os.sched_getaffinity(0))
    end = start + count
    chunks = [range(first, min(first + 1000, end)) for first in range(start, end, 1000)]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(write_images, [(source, target, photos, chunk, colour) for chunk in chunks]))


def write_images(job: tuple) -> int:
    """Write images number `indexes` of the set; returns bytes written (one task of make_images).

    `job`: (source, target, photos, indexes), and optionally whether to change colours.
    """
    source, target, photos, indexes, *more = job
    colour = bool(more and more[0])
    written = 0
    for index in indexes:
        photo = photos[index % len(photos)]
        number = index // len(photos)
        relative = photo.relative_to(source)
        path = target / relative.parent / (f"{relative.stem}_v{number}.jpg" if number else relative.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(photo) as image:
            made = variant(image.convert("RGB"), number, seed=index % len(photos))
            (recolour(made, number, seed=index % len(photos)) if colour else made).save(path, quality=95)
        written += path.stat().st_size
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=pathlib.Path, help="folder to write the images into (created)")
    parser.add_argument("--count", type=int, default=20_000, help="images to make (default 20000)")
    parser.add_argument("--source", type=pathlib.Path, default=DEFAULT_SOURCE,
                        help=f"folder of photos to start from (default {DEFAULT_SOURCE})")
    parser.add_argument("--start", type=int, default=0, help="number of the first image: more images, named apart (default 0)")
    parser.add_argument("--colour", action="store_true", help="also change the variants' saturation, brightness and contrast")
    args = parser.parse_args(argv)
    if args.target.exists() and any(args.target.iterdir()):
        sys.exit(f"error: {args.target} is not empty: give a new folder")
    written = make_images(args.source.resolve(), args.target, args.count, start=args.start, colour=args.colour)
    print(f"{args.count} images, {written / 2**20:.1f} MiB, under {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
