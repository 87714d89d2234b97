"""Camera-like photos made from Fruits-360 fruits: each fruit, its white background cut away, pasted on a
real photograph (scikit-image's bundled ones) at a seeded place, size, rotation and lighting, with sensor
noise, saved as a JPEG with EXIF time taken, GPS position and camera; and the very same composite on
plain white (the ceiling of any segmentation). The generator knows where it put each fruit: truth.csv.

    .venv/bin/python benchmarks/make_photos.py /tmp/photos --count 20
    .venv/bin/python benchmarks/make_photos.py /tmp/photos --source /work/shared/data/fruits-360-apples \
        --every 10 --size 4000x3000

Written under OUT: photos/<the fruit's own path>.jpg (on a background), white/<same>.jpg (on white) and
truth.csv: path, the fruit's box in the photo (left, top, right, bottom: pixels, right and bottom
excluded), the photo's size, its background, the fruit's size across as a fraction of the photo's
shorter side (10–60%), its rotation and gain. Photo i is made from seed [seed, i]: the same set on
every machine. JPEG quality as a phone saves its photos, chroma subsampled 4:2:0: 95 below 4 MP (a
1600 × 1200 composite is 0.5–0.8 MB), 90 from 4 MP (a 4000 × 3000 one 1.9–2.3 MB, 3.3–4.0 at 95).
`--every N` takes every Nth fruit of each folder (the 1st, the (N+1)th...), the hold-out of the
recognition benchmark; `--backgrounds` pastes on other photographs of scikit-image than the 12 below.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import os
import pathlib
import sys

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO / "pipeline" / "sample" / "fruits-360"
# scikit-image's bundled photographs (files in its package, nothing downloaded); grey ones made RGB
BACKGROUNDS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png", "coins.png",
               "grass.png", "gravel.png", "brick.png", "hubble_deep_field.jpg", "moon.png")
WHITE_LEVEL = 235  # a Fruits-360 pixel this close to white on every channel is background
FIRST_TAKEN = datetime.datetime(2026, 9, 1, 8, 0, 0)


def fruit_rgba(path: pathlib.Path) -> Image.Image:
    """A Fruits-360 photo with its white background made transparent (the largest non-white blob, holes filled)."""
    import cv2

    rgb = np.asarray(Image.open(path).convert("RGB"))
    solid = (rgb.min(axis=2) < WHITE_LEVEL).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(solid, connectivity=8)
    if count < 2:
        raise ValueError(f"{path}: no fruit on its white background")
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    blob = (labels == biggest).astype(np.uint8)
    contours, _ = cv2.findContours(blob, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    alpha = np.zeros_like(blob)
    cv2.drawContours(alpha, contours, -1, 255, thickness=cv2.FILLED)  # holes (white glints) filled
    alpha = cv2.GaussianBlur(cv2.erode(alpha, np.ones((3, 3), np.uint8)), (3, 3), 0)  # no white fringe, a soft edge
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def background(name: str) -> np.ndarray:
    """One of scikit-image's bundled photographs (a file of its package) as RGB uint8."""
    import skimage.data

    with Image.open(pathlib.Path(skimage.data.__file__).with_name(name)) as image:
        return np.asarray(image.convert("RGB"))


def compose(fruit: Image.Image, backdrop: np.ndarray | None, size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """The fruit pasted on a seeded part of `backdrop` (None: plain white) at size × size pixels; and where it went.

    The draws are the same whatever `backdrop` is, so a photo and its white twin hold the same fruit, same place.
    """
    width, height = size
    across = rng.uniform(0.10, 0.60)  # the fruit's box side, of the photo's shorter side
    angle = float(rng.uniform(0, 360))
    gain = rng.uniform(0.75, 1.25) * rng.uniform(0.92, 1.08, 3)  # exposure, and a colour cast
    crop = rng.uniform(0.5, 1.0)  # how much of the backdrop's shorter side the photo shows
    where = rng.uniform(0, 1, 4)
    noise_seed = int(rng.integers(2**31))

    turned = fruit.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    box = turned.getchannel("A").getbbox()
    turned = turned.crop(box)
    scale = across * min(width, height) / max(turned.size)
    turned = turned.resize((max(1, round(turned.width * scale)), max(1, round(turned.height * scale))), Image.Resampling.BICUBIC)
    left = int(where[0] * (width - turned.width))
    top = int(where[1] * (height - turned.height))

    if backdrop is None:
        canvas = np.full((height, width, 3), 255, np.float32)
    else:
        bh, bw = backdrop.shape[:2]
        ch = crop * min(bh, bw * height / width)
        cw = ch * width / height
        x, y = where[2] * (bw - cw), where[3] * (bh - ch)
        part = Image.fromarray(backdrop).crop((round(x), round(y), round(x + cw), round(y + ch)))
        canvas = np.asarray(part.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    rgba = np.asarray(turned, np.float32)
    alpha = rgba[..., 3:] / 255
    lit = np.clip(rgba[..., :3] * gain, 0, 255)
    region = canvas[top : top + turned.height, left : left + turned.width]
    region[:] = lit * alpha + region * (1 - alpha)
    noise = np.random.default_rng(noise_seed).standard_normal((height, width, 3), dtype=np.float32)
    canvas += noise * 4.0  # sensor noise, σ = 4 levels
    solid = np.argwhere(alpha[..., 0] >= 0.5)
    (y0, x0), (y1, x1) = solid.min(axis=0), solid.max(axis=0) + 1
    truth = {"left": left + int(x0), "top": top + int(y0), "right": left + int(x1), "bottom": top + int(y1),
             "across": round(float(across), 4), "angle": round(angle, 1), "gain": round(float(gain.mean()), 3)}
    return np.clip(canvas, 0, 255).astype(np.uint8), truth


def exif_for(number: int, rng: np.random.Generator) -> Image.Exif:
    """EXIF of photo `number`: camera, time taken (an hour apart) and a GPS position in an orchard region."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "PipelineCam", "Composite 1"  # Make, Model
    taken = FIRST_TAKEN + datetime.timedelta(hours=number)
    exif.get_ifd(0x8769)[0x9003] = taken.strftime("%Y:%m:%d %H:%M:%S")  # DateTimeOriginal
    latitude, longitude = 44.0 + rng.uniform(0, 1), -(0.5 + rng.uniform(0, 1))  # the south-west of France
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", dms(latitude)
    gps[3], gps[4] = ("E" if longitude >= 0 else "W"), dms(abs(longitude))
    return exif


def dms(degrees: float) -> tuple[float, float, float]:
    """Decimal degrees as EXIF's degrees, minutes, seconds."""
    whole = int(degrees)
    minutes = int((degrees - whole) * 60)
    return (float(whole), float(minutes), round(((degrees - whole) * 60 - minutes) * 60, 4))


def camera_quality(size: tuple[int, int]) -> int:
    """The JPEG quality a phone would save a photo of this size at: 95 below 4 MP, 90 from there, so that
    both sizes are 0.5–3 MB (the sensor noise costs a 12 MP photo 3.3–4.0 MB at 95)."""
    return 95 if size[0] * size[1] < 4_000_000 else 90


def make_one(job: tuple) -> dict:
    number, fruit_path, relative, out, size, seed, quality, backgrounds = job
    fruit = fruit_rgba(fruit_path)
    rng = np.random.default_rng([seed, number])
    name = backgrounds[int(rng.integers(len(backgrounds)))]
    state = rng.bit_generator.state
    row = {"path": relative}
    for folder, backdrop in (("photos", background(name)), ("white", None)):
        rng.bit_generator.state = state  # the same draws for both
        pixels, truth = compose(fruit, backdrop, size, rng)
        exif = exif_for(number, np.random.default_rng([seed, number, 1]))
        target = out / folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target, quality=quality, subsampling="4:2:0", exif=exif.tobytes())
        row |= truth
    return row | {"width": size[0], "height": size[1], "background": name, "fruit": str(fruit_path)}


def fruits(source: pathlib.Path, every: int) -> list[tuple[pathlib.Path, str]]:
    """(path, path relative to source) of every `every`th .jpg of each folder under source, in path order."""
    found = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg"))
    if not found:
        sys.exit(f"error: no .jpg images under {source} (give --source PATH)")
    by_folder: dict[pathlib.Path, list[pathlib.Path]] = {}
    for path in found:
        by_folder.setdefault(path.parent, []).append(path)
    return [(path, path.relative_to(source).as_posix()) for folder in sorted(by_folder) for path in by_folder[folder][::every]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=pathlib.Path, help="folder to write photos/, white/ and truth.csv into")
    parser.add_argument("--source", type=pathlib.Path, default=DEFAULT_SOURCE, help="Fruits-360 photos (label folders)")
    parser.add_argument("--every", type=int, default=1, help="take every Nth photo of each folder (default 1: all)")
    parser.add_argument("--count", type=int, help="at most this many photos")
    parser.add_argument("--size", default="1600x1200", help="photo size WIDTHxHEIGHT (default 1600x1200; 4000x3000: 12 MP)")
    parser.add_argument("--quality", type=int, help="JPEG quality, chroma subsampled 4:2:0 (default 95 below 4 MP, 90 above)")
    parser.add_argument("--backgrounds", default=",".join(BACKGROUNDS),
                        help="scikit-image's photographs to paste on, comma-separated file names (default: the 12 above)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    chosen = fruits(args.source, args.every)[: args.count]
    quality = args.quality or camera_quality(size)
    backgrounds = tuple(name.strip() for name in args.backgrounds.split(",") if name.strip())
    jobs = [(i, path, relative, args.out, size, args.seed, quality, backgrounds) for i, (path, relative) in enumerate(chosen)]
    with concurrent.futures.ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(make_one, jobs, chunksize=4))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "truth.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} photos of {size[0]} × {size[1]} in {args.out}/photos, their twins on white in {args.out}/white, "
          f"boxes in {args.out}/truth.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
