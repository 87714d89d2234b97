"""Scaling on one machine: the same images with 1 and 2 Dask worker processes, and the speed-up.

Makes 4,000 images from the 2,134 Fruits-360 apples of ../shared/data and left-right flipped
copies of them (in a temporary folder), then runs `python -m pipeline run` on them through a
cluster file of kind local: 1 worker process with every core, then 2 processes sharing them.
Checks that every run wrote every image with the same features, and prints a table.

    .venv/bin/python benchmarks/scaling.py                 # 4,000 images, 1 and 2 workers (several minutes)
    .venv/bin/python benchmarks/scaling.py --images 300    # a quick try
    .venv/bin/python benchmarks/scaling.py --images 2000 --workers 1 2 1 2 --backend onnxruntime   # interleaved, on ONNX Runtime

Run it on a quiet machine: other processes on the same cores change the figures.
Exit code 0 if every check passes, 1 otherwise.
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

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "fruits-360-apples"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4000, help="images per run (default 4000)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker processes to compare (default 1 2)")
    parser.add_argument("--backend", default=None, help="engine of every run (default: pipeline.yaml's)")
    parser.add_argument("--source", type=pathlib.Path, default=DEFAULT_SOURCE, help=f"folder of .jpg images (default {DEFAULT_SOURCE})")
    return parser.parse_args(argv)


def make_images(source: pathlib.Path, count: int, folder: pathlib.Path) -> None:
    """`count` images under folder/Training/<label>/: the source's, then flipped copies of them."""
    originals = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not originals:
        sys.exit(f"error: no .jpg images under {source} (give --source FOLDER)")
    for index in range(count):
        original = originals[index % len(originals)]
        copy = index // len(originals)  # 0: as it is, 1: flipped left-right, 2: flipped upside down...
        target = folder / "Training" / original.parent.name / (original.name if copy == 0 else f"flip{copy}_{original.name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(original) as image:
            (image if copy == 0 else ImageOps.mirror(image) if copy == 1 else ImageOps.flip(image)).save(target, quality=95)


def run(images: pathlib.Path, workers: int, cores: int, work: pathlib.Path, backend: str | None) -> dict:
    """One `pipeline run` through a local cluster file of `workers` processes; its manifest and wall time."""
    cluster_file = work / f"local-{workers}.yaml"
    cluster_file.write_text(f"kind: local\nn-workers: {workers}\nthreads-per-worker: {max(1, cores // workers)}\n"
                            "dashboard-address: ':0'\n")
    output = work / f"out-{workers}"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--input", str(images), "--output", str(output), "--cluster",
         str(cluster_file), "--weights", "random", "--json", *(["--backend", backend] if backend else [])],
        capture_output=True, text=True, cwd=REPO,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"error: the pipeline failed with {workers} worker(s):\n{result.stderr[-3000:]}")
    manifest = json.loads(result.stdout)
    rows = pd.read_parquet(output / "images.parquet").sort_values("path", ignore_index=True)
    return {"workers": workers, "threads": max(1, cores // workers), "wall": wall, "manifest": manifest, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {cores} cores, load average {os.getloadavg()[0]:.2f} at start; {args.images} images", flush=True)
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        work = pathlib.Path(tmp)
        make_images(args.source, args.images, work / "images")
        runs = []
        for workers in args.workers:
            print(f"running with {workers} worker process(es)...", flush=True)
            runs.append(run(work / "images", workers, cores, work, args.backend))
    ok = True
    first = runs[0]
    for r in runs:
        written = r["manifest"]["counts"]["written"]
        same = np.allclose(np.stack(r["rows"].features), np.stack(first["rows"].features), rtol=1e-4, atol=1e-5)
        if written != args.images or not same or not r["rows"].path.equals(first["rows"].path):
            print(f"CHECK FAILED: {r['workers']} worker(s) wrote {written} rows (expected {args.images}), same features: {same}")
            ok = False
    print()
    print("| worker processes × threads | whole command s | featurize s | featurize images/s | speed-up (featurize) | speed-up (whole) |")
    print("|---|---|---|---|---|---|")
    base = first["manifest"]["timings_s"]["featurize"], first["wall"]
    for r in runs:
        featurize = r["manifest"]["timings_s"]["featurize"]
        print(f"| {r['workers']} × {r['threads']} | {r['wall']:.1f} | {featurize:.1f} | {args.images / featurize:.1f} | "
              f"{base[0] / featurize:.2f} | {base[1] / r['wall']:.2f} |")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; checks {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
