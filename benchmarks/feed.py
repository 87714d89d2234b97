"""What feeding the model costs a worker's CPU: the featurize stage around the model, stage by stage.

A GPU worker decodes its own images on its own cores: at 7,000 images/s a 4-vCPU worker has
0.57 cores per 1,000 images/s for everything but the model. This runs the pipeline's own
functions on a folder of images, partition by partition as a featurize task does, and prints the
CPU seconds of each stage per image, i.e. the cores it needs per 1,000 images/s:

  read      the partition's rows (sink.partition_rows) and the images' bytes (source.read_many)
  decode    featurize.decode_all on the worker's threads (Pillow, or OpenCV for plain JPEGs)
  batch     the fixed-size uint8 batches Featurizer.__call__ hands the model
  stage     sink.stage_partition: the partition's rows and features as parquet
  moments   reduce.staged_moments: the staged features read back and their scatter matrix (PCA)

The model is left out: its features are seeded random numbers of its width. CPU time (of this
process, all its threads) is measured, not wall time, so a busy machine slows it down but
changes its figures little; each stage's figure is the least of --repeat passes.

    .venv/bin/python benchmarks/feed.py                                   # the 2,134 apples at image size 32
    .venv/bin/python benchmarks/feed.py --count 20000 --image-size 224
    .venv/bin/python benchmarks/feed.py --compare /path/to/other/checkout # the same, side by side with other code
    .venv/bin/python benchmarks/feed.py --photos                          # camera photos decoded per core instead

With --photos it measures what a GPU worker fed raw camera photos gets from each core: seeded
photos of 1600 × 1200 (1.9 MP) and 4000 × 3000 (12 MP) made from the apples (a mosaic enlarged,
with sensor noise, JPEG quality 90: some 0.6 and 2.4 MB), each decoded by pipeline.images.decode
at the model's 224 px (JPEG's reduced scale: the floor of any preprocessing), on one thread, as
they are and with an EXIF rotation (which Pillow decodes); photos per second per core.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "fruits-360-apples"
STAGES = ("read", "decode", "batch", "stage", "moments")
GOAL = 0.5  # cores per 1,000 images/s around the model (issue 26): a 4-vCPU worker then feeds 7,000 images/s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=pathlib.Path, default=DEFAULT_IMAGES, help=f"folder of images (default {DEFAULT_IMAGES})")
    parser.add_argument("--count", type=int, default=None, help="make this many images from --images (benchmarks/make_images.py) and use them")
    parser.add_argument("--image-size", type=int, default=32, help="model input side (default 32, as throughput.py's data path)")
    parser.add_argument("--partition", type=int, default=256, help="images per partition (default 256, pipeline.yaml's)")
    parser.add_argument("--width", type=int, default=1280, help="features per image (default 1280, MobileNetV2's)")
    parser.add_argument("--threads", type=int, default=2, help="decoding threads, a worker's (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="passes; each stage's least is kept (default 3)")
    parser.add_argument("--compare", type=pathlib.Path, default=None,
                        help="another checkout of the project: run both in turn, --repeat times each, and print them side by side")
    parser.add_argument("--code", type=pathlib.Path, default=REPO, help=argparse.SUPPRESS)  # the checkout whose pipeline is measured
    parser.add_argument("--workdir", type=pathlib.Path, default=None, help="where to put made images and staged files")
    parser.add_argument("--photos", action="store_true", help="measure camera photos decoded per core instead (see above)")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one pass, its figures as JSON (for --compare)
    return parser.parse_args(argv)


def one_pass(folder: pathlib.Path, work: pathlib.Path, args: argparse.Namespace) -> tuple[dict, int]:
    """CPU seconds of each stage over every partition of `folder`, and the images decoded."""
    import fsspec
    import numpy as np

    from pipeline import source
    from pipeline.making import featurize, reduce, sink

    fs = fsspec.filesystem("file")
    listing = source.list_images(str(folder), {}, ("jpg", "jpeg", "png"))
    partitions = str(work / "partitions.arrow")
    ranges = sink.write_partitions(fs, partitions, listing.rows, args.partition)
    seconds, staged, decoded_images = dict.fromkeys(STAGES, 0.0), [], 0
    rng = np.random.default_rng(0)
    clock = time.process_time
    for index, byte_range in enumerate(ranges):
        started = clock()
        rows = sink.partition_rows(fs, partitions, byte_range)
        blobs = source.read_many(listing.fs, [f"{listing.root}/{path}" for path in rows["path"]])
        seconds["read"] += clock() - started

        started = clock()
        limits = featurize.images.Limits.configured() if hasattr(featurize.images, "Limits") else 89478485  # a checkout before them
        decoded = featurize.decode_all(blobs, args.image_size, limits, args.threads) if hasattr(featurize, "decode_all") \
            else old_decode_all(featurize, blobs, args.image_size, args.threads)
        arrays = [result for stage, result in decoded if not stage]
        seconds["decode"] += clock() - started
        decoded_images += len(arrays)

        started = clock()
        batches(arrays, 256)
        seconds["batch"] += clock() - started

        features = rng.random((len(arrays), args.width), dtype=np.float32) * 6  # in the model's place
        started = clock()
        path = str(work / sink.part_name(index))
        sink.stage_partition(fs, path, rows[: len(arrays)], features, [], {"read": 0.0})
        seconds["stage"] += clock() - started
        staged.append(path)

    group = max(1, 2 * args.width // args.partition)  # as reduce.MomentsSum groups partitions
    started = clock()
    for first in range(0, len(staged), group):
        reduce.staged_moments(fs, staged[first : first + group], args.width)
    seconds["moments"] += clock() - started
    return seconds, decoded_images


def old_decode_all(featurize, blobs: list, size: int, threads: int) -> list:
    """Decoding as featurize_partition did before decode_all: a future per image."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda blob: featurize.decode_one(blob, size, 89478485), blobs))


def batches(arrays: list, batch_size: int) -> None:
    """The model's fixed-size uint8 batches, as Featurizer.__call__ builds them."""
    import numpy as np

    by_shape: dict[tuple, list[int]] = {}
    for i, array in enumerate(arrays):
        by_shape.setdefault(array.shape, []).append(i)
    for shape, indexes in by_shape.items():
        for start in range(0, len(indexes), batch_size):
            chunk = indexes[start : start + batch_size]
            batch = np.zeros((batch_size, *shape), dtype=np.uint8)
            batch[: len(chunk)] = [arrays[i] for i in chunk]


def measure(code: pathlib.Path, folder: pathlib.Path, work: pathlib.Path, args: argparse.Namespace) -> dict:
    """One pass in a fresh process importing `code`'s pipeline: cores per 1,000 images/s by stage."""
    command = [sys.executable, __file__, "--images", str(folder), "--image-size", str(args.image_size),
               "--partition", str(args.partition), "--width", str(args.width), "--threads", str(args.threads),
               "--code", str(code), "--workdir", str(work), "--json"]
    env = dict(os.environ, PYTHONPATH=str(code), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"error: the pass with {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


CAMERA = ((1600, 1200, 9.0), (4000, 3000, 6.0))  # width, height, noise: about 0.6 and 2.4 MB at quality 90


def camera_photo(source: list[pathlib.Path], width: int, height: int, noise: float, seed: int, rotated: bool) -> bytes:
    """A seeded camera-size JPEG: 12 apples in a 4 × 3 mosaic, enlarged, with sensor noise; EXIF rotation 6 if `rotated`."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    sheet = Image.new("RGB", (400, 300))
    for i, pick in enumerate(rng.choice(len(source), 12, replace=False)):
        with Image.open(source[pick]) as apple:
            sheet.paste(apple.convert("RGB").resize((100, 100)), ((i % 4) * 100, (i // 4) * 100))
    pixels = np.asarray(sheet.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    pixels = np.clip(pixels + rng.normal(0, noise, pixels.shape), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    if rotated:
        exif[0x0112] = 6
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90, exif=exif)
    return out.getvalue()


def photo_rates(args: argparse.Namespace) -> int:
    """Camera photos decoded at 224 px on one thread: photos/s per core, as they are and with an EXIF rotation."""
    sys.path.insert(0, str(REPO))
    from pipeline import images

    source = sorted(p for p in args.images.resolve().rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    print(f"camera photos decoded by pipeline.images.decode at 224 px, one thread, CPU time, least of {args.repeat} passes "
          f"over 4 photos each (load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the start)")
    print("| photo | MB | as taken: ms | photos/s per core | EXIF-rotated (Pillow): ms | photos/s per core |")
    print("|---|---|---|---|---|---|")
    for width, height, noise in CAMERA:
        row = []
        for rotated in (False, True):
            photos = [camera_photo(source, width, height, noise, seed, rotated) for seed in range(4)]
            best = min(cpu_seconds(images.decode, photos) for _ in range(args.repeat)) / len(photos)
            row += [best * 1e3, 1 / best]
            size = sum(map(len, photos)) / len(photos) / 1e6
        print(f"| {width} × {height} ({width * height / 1e6:.1f} MP) | {size:.2f} | {row[0]:.1f} | {row[1]:.1f} | {row[2]:.1f} | {row[3]:.1f} |")
    return 0


def cpu_seconds(decode, photos: list[bytes]) -> float:
    """This thread's CPU seconds to decode every photo once."""
    started = time.thread_time()
    for data in photos:
        decode(data, 224, 10**9)
    return time.thread_time() - started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.photos:
        return photo_rates(args)
    if args.json:  # a single pass inside a fresh process (`measure`)
        sys.path.insert(0, str(args.code))
        args.workdir.mkdir(parents=True, exist_ok=True)
        seconds, n = one_pass(args.images, args.workdir, args)
        print(json.dumps({"images": n} | {stage: s / n * 1e3 for stage, s in seconds.items()}))
        return 0
    work = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="pipeline-feed-"))
    folder = args.images.resolve()
    if args.count:
        sys.path.insert(0, str(REPO))
        from benchmarks import make_images

        folder = work / "images"
        if not folder.exists():
            make_images.make_images(args.images.resolve(), folder, args.count)
    codes = {"this code": REPO} | ({f"{args.compare}": args.compare.resolve()} if args.compare else {})
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for name, code in codes.items():  # in turn: a busy machine's changes fall on both
            figures = measure(code, folder, work / "staged" / name.replace("/", "_"), args)
            best[name] = {key: min(value, best.get(name, {}).get(key, value)) for key, value in figures.items()}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"featurize stage around the model, CPU ms per image = cores per 1,000 images/s "
          f"({best['this code']['images']:.0f} images of {folder}, image size {args.image_size}, partitions of {args.partition}, "
          f"{args.threads} decoding threads, {args.width} features; least of {args.repeat} passes; load average {load} at the end)")
    names = list(codes)
    print(f"  {'stage':10}" + "".join(f"{name[-28:]:>30}" for name in names) + (f"{'ratio':>8}" if len(names) == 2 else ""))
    for stage in (*STAGES, "total"):
        values = [sum(best[name][s] for s in STAGES) if stage == "total" else best[name][stage] for name in names]
        print(f"  {stage:10}" + "".join(f"{value:>30.3f}" for value in values)
              + (f"{values[0] / values[1]:>8.2f}" if len(names) == 2 and values[1] else ""))
    total = sum(best["this code"][s] for s in STAGES)
    print(f"{'GOAL' if total <= GOAL else 'MISS'}  this code: {total:.3f} cores per 1,000 images/s around the model (goal ≤ {GOAL}): "
          f"a 4-core worker feeds at most {4 / total * 1e3:,.0f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
