"""Recognize apples kept out of an output: accuracy against the folders they came from, and timings.

Splits the 2,134 Fruits-360 apples of ../shared/data, makes an output of one side with
`python -m pipeline run --weights random`, and recognizes the other side, a folder, with
`python -m pipeline recognize` (on the cluster, as a folder of many is):

- names: the photos whose names start with `r_` against the others, both ways (photos taken apart);
- random: a seeded 25% of each variety held out (frames next to training frames: near-copies).

The label answered is compared with the folder each photo came from; the votes of its nearest
images (k = 1, 5, 10, 20) are scored beside it, as the other way to choose a label. Then the
timings: one image from a cold process (the whole command, with the classifier already saved and
without), and images/s once warm through the Python API, in batches of 32 and one at a time.

    .venv/bin/python benchmarks/recognize.py        # some 5 minutes on 2 cores

Run it on a quiet machine: other processes on the same cores change the timings.
"""
from __future__ import annotations

import argparse
import collections
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "fruits-360-apples"
VOTES = (1, 5, 10, 20)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=pathlib.Path, default=DEFAULT_SOURCE, help=f"folder of images (default {DEFAULT_SOURCE})")
    return parser.parse_args(argv)


def pipeline(*args: str) -> tuple[str, float]:
    """Run `python -m pipeline ARGS`; its stdout and wall seconds."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"error: `pipeline {' '.join(args)}` failed:\n{result.stderr[-3000:]}")
    return result.stdout, wall


def splits(images: list[pathlib.Path]) -> dict[str, np.ndarray]:
    """Held-out masks by split name."""
    r = np.array([path.name.startswith("r_") for path in images])
    labels = np.array([path.parent.name for path in images])
    rng, random = np.random.default_rng(0), np.zeros(len(images), bool)
    for label in sorted(set(labels)):
        mine = rng.permutation(np.flatnonzero(labels == label))
        random[mine[: int(0.25 * len(mine) + 0.5)]] = True
    return {"r_ held out": r, "r_ kept, the others held out": ~r, "random 25% held out": random}


def copy(images: list[pathlib.Path], source: pathlib.Path, target: pathlib.Path) -> None:
    for path in images:
        (target / path.parent.relative_to(source)).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / path.relative_to(source))


def scores(folder: pathlib.Path) -> dict:
    """Accuracy of the label answered, and of the neighbours' votes, against each photo's folder."""
    rows = pd.read_parquet(folder / "predictions.parquet")
    truth = rows.path.str.split("/").str[-2]
    votes = {}
    for k in VOTES:
        voted = [collections.Counter(n["label"] for n in neighbours[:k]).most_common(1)[0][0] for neighbours in rows.neighbours]
        votes[k] = float(np.mean(np.array(voted) == truth))
    return {"images": len(rows), "accuracy": float(np.mean(rows.label == truth)), "votes": votes,
            "confidence right": float(rows.confidence[rows.label == truth].mean()),
            "confidence wrong": float(rows.confidence[rows.label != truth].mean())}


def warm(output: pathlib.Path, photos: list[pathlib.Path]) -> dict:
    """Images/s through the API once the model is built: batches of 32, then one image per call."""
    code = f"""
import json, pathlib, time
from pipeline.reading import recognize
photos = [pathlib.Path(p).read_bytes() for p in {[str(p) for p in photos]!r}]
started = time.perf_counter(); recognizer = recognize.Recognizer.load({str(output)!r}); loaded = time.perf_counter() - started
started = time.perf_counter(); recognizer.recognize(photos[:1]); first = time.perf_counter() - started
recognizer.recognize(photos[:32])
started = time.perf_counter()
for i in range(0, len(photos), 32):
    recognizer.recognize(photos[i:i + 32])
batched = len(photos) / (time.perf_counter() - started)
started = time.perf_counter()
for photo in photos[:64]:
    recognizer.recognize([photo])
single = 64 / (time.perf_counter() - started)
print(json.dumps({{"load s": loaded, "first call s": first, "images/s, batches of 32": batched, "images/s, one per call": single}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"error: the warm measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    images = sorted(p for p in args.source.rglob("*.jpg"))
    with tempfile.TemporaryDirectory(prefix="recognize-") as work:
        work = pathlib.Path(work)
        for name, held in splits(images).items():
            kept, out, photos = work / "kept", work / "out", work / "held"
            copy([p for p, h in zip(images, held) if not h], args.source, kept)
            copy([p for p, h in zip(images, held) if h], args.source / "Training", photos)
            _, run_s = pipeline("run", "--input", str(kept), "--output", str(out), "--weights", "random", "--quiet")
            _, recognize_s = pipeline("recognize", str(out), str(photos), "--neighbours", str(max(VOTES)), "--to", str(work / "predictions"))
            result = scores(work / "predictions")
            labels = len({p.parent.name for p in images})
            print(f"{name}: output of {len(images) - int(held.sum()):,} images (run {run_s:.1f} s), {result['images']:,} recognized "
                  f"in {recognize_s:.1f} s: accuracy {result['accuracy']:.3f} (chance {1 / labels:.3f}); neighbours' votes "
                  + ", ".join(f"k = {k}: {v:.3f}" for k, v in result["votes"].items())
                  + f"; mean confidence {result['confidence right']:.2f} when right, {result['confidence wrong']:.2f} when wrong",
                  flush=True)
            if name == "r_ held out":
                one = sorted(photos.rglob("*.jpg"))[0]
                (out / "recognizer.npz").unlink()
                _, untrained = pipeline("recognize", str(out), str(one))
                _, trained = pipeline("recognize", str(out), str(one))
                print(f"one image, cold process, whole command: {trained:.2f} s ({untrained:.2f} s when it trains the classifier first)")
                print("warm, through the API:", json.dumps(warm(out, sorted(photos.rglob("*.jpg"))[:320])), flush=True)
            for folder in (kept, out, photos, work / "predictions"):
                shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
