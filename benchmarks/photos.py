"""Real-condition photos: how well and how fast `preprocess` finds the fruit, and what it does to recognition.

Three measurements, each printing a table (docs/photos.md holds the last ones):

    iou       composites of benchmarks/make_photos.py (held-out apples on scikit-image's photographs):
              the IoU of preprocess's fruit box with the box the generator kept, as a distribution,
              and a picture of the worst cases (--pictures FOLDER)
    rates     one core, per photo: the reduced-scale decode alone, then the whole preprocess (decode,
              find the fruit, crop, whiten, resize, encode), at 1600 × 1200 (1.9 MP) and 4000 × 3000 (12 MP)
    accuracy  an output fitted on the apples less every 10th photo of each variety (seeded random
              weights, or --weights FILE of `finetune`); the held-out photos recognized as thumbnails, thumbnails preprocessed,
              composites on plain white preprocessed (the ceiling of any segmentation), composites
              on backgrounds preprocessed, and composites raw

    .venv/bin/python benchmarks/photos.py iou rates accuracy --work /tmp/photos-bench

Everything is made under --work (composites are made once and kept there). Seeded: the same photos
on every machine. Rates are CPU time of one thread, which a busy machine inflates less than wall time.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import os
import pathlib
import shutil
import statistics
import sys
import time

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import images  # noqa: E402
from pipeline.making import preprocess

APPLES = pathlib.Path("/work/shared/data/fruits-360-apples")
HOLD_OUT = 10  # every 10th photo of each variety is held out of the output


def make_photos():
    spec = importlib.util.spec_from_file_location("make_photos", REPO / "benchmarks" / "make_photos.py")
    module = sys.modules["make_photos"] = importlib.util.module_from_spec(spec)  # its process pool pickles its functions
    spec.loader.exec_module(module)
    return module


def composites(work: pathlib.Path, size: str, count: int | None, source: pathlib.Path, seed: int = 0,
               backgrounds: str | None = None) -> pathlib.Path:
    """The held-out apples' composites at `size` (made once under work/), their folder: make_photos's
    seed and backgrounds unless others are given (then the folder's name says so)."""
    folder = work / "-".join(["composites", size, str(count or "all")] + ([f"seed{seed}"] if seed else [])
                             + ([backgrounds.replace(".", "_").replace(",", "+")] if backgrounds else []))
    if not (folder / "truth.csv").exists():
        argv = [str(folder), "--source", str(source), "--every", str(HOLD_OUT), "--size", size, "--seed", str(seed)]
        make_photos().main(argv + ([] if count is None else ["--count", str(count)])
                           + ([] if backgrounds is None else ["--backgrounds", backgrounds]))
    return folder


def truths(folder: pathlib.Path) -> list[dict]:
    with open(folder / "truth.csv") as f:
        return list(csv.DictReader(f))


def iou(a, b) -> float:
    inside = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    return inside / (area(a) + area(b) - inside)


def measure_iou(folder: pathlib.Path, recipe: preprocess.Recipe, pictures: pathlib.Path | None) -> list[str]:
    """The IoU distribution of the fruit boxes found in a folder's composites; the worst drawn if asked."""
    found = []
    for row in truths(folder):
        data = (folder / "photos" / row["path"]).read_bytes()
        truth = tuple(int(row[k]) for k in ("left", "top", "right", "bottom"))
        try:
            box = preprocess.prepare(data, recipe).fruit
            value = iou(box, truth)
        except preprocess.NoFruitFound:
            box, value = None, 0.0
        found.append((value, row, box))
    values = np.array([value for value, _, _ in found])
    sizes = np.array([float(row["across"]) for _, row, _ in found])
    small = sizes < 0.2
    lines = [
        f"| {folder.name} | {recipe.method} | {len(values)} | {(values >= 0.85).mean():.1%} | {np.median(values):.3f} | "
        f"{np.percentile(values, 10):.3f} | {np.percentile(values, 5):.3f} | {values.min():.3f} | "
        f"{sum(box is None for _, _, box in found)} | {(values[small] >= 0.85).mean() if small.any() else float('nan'):.1%} |"
    ]
    by_background: dict[str, list[float]] = {}
    for value, row, _ in found:
        by_background.setdefault(row["background"], []).append(value)
    lines.append("  by background (≥ 0.85): " + ", ".join(
        f"{name.split('.')[0]} {np.mean(np.array(v) >= 0.85):.0%} of {len(v)}" for name, v in sorted(by_background.items())))
    if pictures:
        draw_worst(folder, sorted(found, key=lambda item: item[0])[:8], pictures / f"photos-worst-{folder.name}-{recipe.method}.png")
        draw_before_after(folder, [row for _, row, _ in found[:4]], recipe, pictures / "photos-before-after.png")
    return lines


def draw_before_after(folder: pathlib.Path, rows: list[dict], recipe: preprocess.Recipe, path: pathlib.Path) -> None:
    """The first composites (not chosen) as taken, and as preprocess writes them (100 × 100, shown at 240 × 240)."""
    sheet = Image.new("RGB", (2 * 560, ((len(rows) + 1) // 2) * 250), "white")
    for i, row in enumerate(rows):
        data = (folder / "photos" / row["path"]).read_bytes()
        with Image.open(io.BytesIO(data)) as photo:
            photo.draft("RGB", (320, 240))
            before = photo.convert("RGB").resize((320, 240))
        try:
            after = Image.open(io.BytesIO(preprocess.encode(preprocess.prepare(data, recipe).pixels, recipe.quality)))
        except preprocess.NoFruitFound:
            after = Image.new("RGB", (100, 100), "gray")
        x, y = (i % 2) * 560, (i // 2) * 250
        sheet.paste(before, (x, y))
        sheet.paste(after.resize((240, 240), Image.Resampling.NEAREST), (x + 320 + 5, y))
    sheet.save(path)
    print(f"before and after drawn in {path}")


def draw_worst(folder: pathlib.Path, worst: list, path: pathlib.Path) -> None:
    """The worst composites side by side: the true box in green, the box found in red."""
    from PIL import ImageDraw

    tiles = []
    for value, row, box in worst:
        with Image.open(folder / "photos" / row["path"]) as photo:
            scale = 320 / photo.width
            height = round(photo.height * scale)
            photo.draft("RGB", (320, 240))
            tile = photo.convert("RGB").resize((320, height))
        draw = ImageDraw.Draw(tile)
        draw.rectangle([int(row[k]) * scale for k in ("left", "top", "right", "bottom")], outline=(0, 255, 0), width=3)
        if box:
            draw.rectangle([v * scale for v in box], outline=(255, 0, 0), width=3)
        draw.text((6, 6), f"IoU {value:.2f}  {row['background'].split('.')[0]}", fill=(255, 255, 0))
        tiles.append(tile)
    sheet = Image.new("RGB", (4 * 320, ((len(tiles) + 3) // 4) * 240), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % 4) * 320, (i // 4) * 240))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    print(f"worst cases drawn in {path}")


def measure_rates(folder: pathlib.Path, recipe: preprocess.Recipe, repeat: int = 1) -> str:
    """CPU seconds per photo on one thread (OpenCV's own threads off): the reduced-scale decode alone, the
    featurize stage's decode to 224 px, and the whole preprocess; means (an ambiguous photo costs preprocess
    a second look: the mean is what throughput sees). CPU time, not wall time: the figures hold on a busy machine."""
    import cv2

    cv2.setNumThreads(1)
    photos = [(folder / "photos" / row["path"]).read_bytes() for row in truths(folder)]
    preprocess.colour_prior(recipe.colours)
    decode, whole, pipeline_decode = [], [], []
    for _ in range(repeat):
        for data in photos:  # interleaved: each sees the same load on the machine; CPU time of this thread alone
            started = time.thread_time()
            preprocess.open_photo(data, recipe.decode_size, 10**9)
            decode.append(time.thread_time() - started)
            started = time.thread_time()
            images.decode(data, 224, 10**9)
            pipeline_decode.append(time.thread_time() - started)
            started = time.thread_time()
            try:
                preprocess.encode(preprocess.prepare(data, recipe, 10**9).pixels, recipe.quality)
            except preprocess.NoFruitFound:
                pass
            whole.append(time.thread_time() - started)
    with Image.open(io.BytesIO(photos[0])) as image:
        width, height = image.size
        image.draft("RGB", (recipe.decode_size, recipe.decode_size))
        reduced = image.size
    d, w, p = (statistics.mean(v) * 1000 for v in (decode, whole, pipeline_decode))
    mb = statistics.mean(len(data) for data in photos) / 1e6
    return (f"| {width} × {height} ({width * height / 1e6:.1f} MP, {mb:.1f} MB) | {reduced[0]} × {reduced[1]} | {recipe.method} | "
            f"{len(photos) * repeat} | {d:.1f} | {p:.1f} | {w:.1f} | {w / d:.2f} | {1000 / w:.1f} |")


def held_out(source: pathlib.Path) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    """(training, held out): every HOLD_OUT-th photo of each variety held out, as make_photos --every picks them."""
    train, test = [], []
    for folder in sorted(p for p in source.rglob("*") if p.is_dir()):
        photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        test += photos[::HOLD_OUT]
        train += [p for i, p in enumerate(photos) if i % HOLD_OUT]
    return train, test


def training_copy(work: pathlib.Path, source: pathlib.Path) -> pathlib.Path:
    """The training apples (held_out's first list) copied afresh into work/train, in their label folders."""
    copy = work / "train"
    shutil.rmtree(copy, ignore_errors=True)
    for path in held_out(source)[0]:
        target = copy / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return copy


def measure_accuracy(work: pathlib.Path, folder: pathlib.Path, source: pathlib.Path, recipe: preprocess.Recipe,
                     weights: str = "random") -> list[str]:
    """Accuracy of an output fitted on the training apples, on the held-out ones in five conditions: with seeded random
    weights, or a weights file `finetune` wrote (its model and image size)."""
    import pipeline
    from pipeline.making import finetune
    from pipeline.reading.recognize import Recognizer

    _, test = held_out(source)
    made = finetune.about(weights, {})  # None for random weights or a file finetune did not write
    output = work / ("output-train" if weights == "random" else f"output-train-{pathlib.Path(weights).name.removesuffix(finetune.SUFFIX)}")
    if not (output / "manifest.json").exists():
        model = {} if made is None else {"model": made["model"], "image_size": made["image_size"]}
        settings = pipeline.settings(input=str(training_copy(work, source)), output=str(output), weights=weights, **model)
        pipeline.run(settings, overwrite=True, progress=False)
    recognizer = Recognizer.load(str(output))
    rows = {row["path"]: row for row in truths(folder)}
    names = [path.relative_to(source).as_posix() for path in test if path.relative_to(source).as_posix() in rows]
    labels = [name.split("/")[-2] for name in names]

    def prepared(data: bytes) -> bytes | None:
        try:
            return preprocess.encode(preprocess.prepare(data, recipe).pixels, recipe.quality)
        except preprocess.NoFruitFound:
            return None  # counted wrong

    def accuracy(blobs: list[bytes | None]) -> float:
        given = [blob for blob in blobs if blob is not None]
        answers = iter(recognizer.recognize(given))
        said = [next(answers).label if blob is not None else None for blob in blobs]
        return float(np.mean([a == b for a, b in zip(said, labels)]))

    thumbnails = [(source / name).read_bytes() for name in names]
    on_white = [(folder / "white" / name).read_bytes() for name in names]
    on_backgrounds = [(folder / "photos" / name).read_bytes() for name in names]
    results = {
        "thumbnails": accuracy(thumbnails),
        "thumbnails, preprocessed": accuracy([prepared(b) for b in thumbnails]),
        "composites on white, preprocessed (ceiling)": accuracy([prepared(b) for b in on_white]),
        "composites on backgrounds, preprocessed": accuracy([prepared(b) for b in on_backgrounds]),
        "composites on backgrounds, raw": accuracy(on_backgrounds),
    }
    ceiling = results["composites on white, preprocessed (ceiling)"]
    lines = [f"| {name} | {len(names)} | {value:.3f} | " + (
        f"{value / results['thumbnails']:.3f} of thumbnails |" if name.startswith("thumbnails,") else
        f"{value / ceiling:.3f} of the ceiling |" if "backgrounds" in name else " |") for name, value in results.items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="+", choices=["iou", "rates", "accuracy"])
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/photos-bench"))
    parser.add_argument("--source", type=pathlib.Path, default=APPLES, help="Fruits-360 apples (label folders)")
    parser.add_argument("--count", type=int, help="composites at most (default: every held-out apple, 214)")
    parser.add_argument("--rate-count", type=int, default=60, help="photos timed at each size (default 60)")
    parser.add_argument("--method", default=None, help="grabcut or colour (default: pipeline.yaml's)")
    parser.add_argument("--pictures", type=pathlib.Path, help="draw the worst segmentations into this folder")
    parser.add_argument("--weights", default="random", help="accuracy: the output's weights, random (seeded) or a file "
                        "`finetune` wrote (its model and image size are used)")
    parser.add_argument("--seed", type=int, default=0, help="make_photos's seed of the composites of iou (default 0)")
    parser.add_argument("--backgrounds", help="make_photos --backgrounds of the composites of iou (default: its 12)")
    args = parser.parse_args(argv)
    recipe = preprocess.recipe(method=args.method)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; recipe {recipe.as_dict()}")
    small = composites(args.work, "1600x1200", args.count, args.source)
    if "iou" in args.what:
        shown = composites(args.work, "1600x1200", args.count, args.source, args.seed, args.backgrounds)
        print("| composites | method | photos | IoU ≥ 0.85 | median | 10th pct | 5th pct | worst | no fruit found | IoU ≥ 0.85, fruit < 20% across |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(measure_iou(shown, recipe, args.pictures)))
    if "rates" in args.what:
        large = composites(args.work, "4000x3000", args.rate_count, args.source)
        print("| photo | decoded at | method | photos | decode alone, ms | pipeline's decode to 224, ms | preprocess, ms | "
              "× decode | photos/s per core |")
        print("|---|---|---|---|---|---|---|---|---|")
        sized = composites(args.work, "1600x1200", args.rate_count, args.source)
        print(measure_rates(sized, recipe))
        print(measure_rates(large, recipe))
    if "accuracy" in args.what:
        print("| held-out apples as | photos | accuracy | ratio |")
        print("|---|---|---|---|")
        print("\n".join(measure_accuracy(args.work, small, args.source, recipe, args.weights)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
