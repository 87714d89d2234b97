"""A 10% increment: `python -m pipeline update` against a full `python -m pipeline run` on everything.

Copies the 2,134 Fruits-360 apples of ../shared/data into a temporary folder, less a seeded 10%
of them; runs the pipeline on that; adds the 10% back and runs `update`; then runs the pipeline
from scratch on all the images into another output. Prints the time of each whole command and
its stages, and checks that the updated output equals the full run's: the same rows, the same
features (within featurize.FEATURE_TOLERANCE of the largest: images share batches with other
neighbours), the same PCA (explained variance ratios and subspace).

    .venv/bin/python benchmarks/update.py                    # 2,134 apples, 10% increment (some 2 minutes)
    .venv/bin/python benchmarks/update.py --increment 0.05   # another increment

Run it on a quiet machine: other processes on the same cores change the figures.
Exit code 0 if every check passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd
from scipy.linalg import subspace_angles

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.making import featurize  # noqa: E402

DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "fruits-360-apples"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=pathlib.Path, default=DEFAULT_SOURCE, help=f"folder of images (default {DEFAULT_SOURCE})")
    parser.add_argument("--increment", type=float, default=0.1, help="fraction of the images that arrive later (default 0.1)")
    return parser.parse_args(argv)


def pipeline(*args: str) -> tuple[dict, float]:
    """Run `python -m pipeline ARGS --json` with random weights; its manifest and wall seconds."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline", *args, "--json"], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"error: `pipeline {' '.join(args)}` failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout), wall


def read(output: pathlib.Path) -> tuple[pd.DataFrame, dict]:
    rows = pd.read_parquet(output / "images.parquet").sort_values("path", ignore_index=True)
    with np.load(output / "pca.npz") as saved:
        return rows, {name: saved[name] for name in saved.files}


def checks(updated: pathlib.Path, full: pathlib.Path) -> list[tuple[str, str, bool]]:
    """(what, value, ok) rows comparing the updated output with the full run's."""
    (rows, pca), (expected, exact) = read(updated), read(full)
    same_rows = rows[["path", "label", "split", "identity"]].equals(expected[["path", "label", "split", "identity"]])
    features, expected_features = np.stack(rows.features), np.stack(expected.features)
    same_features = same_rows and featurize.features_agree(features, expected_features)
    difference = float(np.abs(features - expected_features).max() / np.abs(expected_features).max()) if same_rows else float("nan")
    k = int(exact["n_components"])
    ratios, truth = pca["explained_variance_ratio"][:k], exact["explained_variance_ratio"][:k]
    ratio_error = float(np.max(np.abs(ratios - truth) / truth))
    angle = float(np.degrees(subspace_angles(pca["components"][:k].T, exact["components"][:k].T).max()))
    return [
        ("same rows (path, label, split, identity)", f"{len(rows)} and {len(expected)}", same_rows),
        ("same features", f"largest difference {difference:.1e} of the largest feature", same_features),
        ("same number of components kept", f"{int(pca['n_components'])} and {k}", int(pca["n_components"]) == k),
        (f"explained variance ratios, first {k}", f"max relative difference {ratio_error:.1e}", ratio_error < 0.01),
        (f"subspace of the first {k} components", f"largest angle {angle:.2e}°", angle < 0.1),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    images = sorted(p.relative_to(args.source) for p in args.source.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    later = set(pd.Series(images).sample(frac=args.increment, random_state=0))
    print(f"machine: {len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.2f} at start; "
          f"{len(images)} images, {len(later)} of them ({args.increment:.0%}) arriving later", flush=True)
    with tempfile.TemporaryDirectory(prefix="update-") as tmp:
        work = pathlib.Path(tmp)
        for relative in images:
            if relative not in later:
                (work / "images" / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(args.source / relative, work / "images" / relative)
        common = ["--weights", "random", "--cluster", "local"]
        print("run on the first images...", flush=True)
        first, first_wall = pipeline("run", "--input", str(work / "images"), "--output", str(work / "updated"), *common)
        for relative in later:
            (work / "images" / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(args.source / relative, work / "images" / relative)
        print("update with the increment...", flush=True)
        updated, update_wall = pipeline("update", "--output", str(work / "updated"))
        print("full run on everything...", flush=True)
        full, full_wall = pipeline("run", "--input", str(work / "images"), "--output", str(work / "full"), *common)
        results = checks(work / "updated", work / "full")

    print()
    print("| command | images featurized | whole command s | list | cluster start | featurize | PCA | project + write |")
    print("|---|---|---|---|---|---|---|---|")
    for name, manifest, wall in (("run (first images)", first, first_wall), ("update (+increment)", updated, update_wall),
                                 ("run (everything)", full, full_wall)):
        t = manifest["timings_s"]
        print(f"| {name} | {manifest['history'][-1]['featurized']} | {wall:.1f} | {t.get('list', 0):.1f} | "
              f"{t.get('cluster start', 0):.1f} | {t['featurize']:.1f} | {t.get('pca fit', t.get('pca update', 0)):.1f} | "
              f"{t['project + write']:.1f} |")
    print(f"\nupdate / full run: {update_wall / full_wall:.2f} of the time (whole commands)\n")
    for what, value, ok in results:
        print(f"{'OK  ' if ok else 'FAIL'} {what}: {value}")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    return 0 if all(ok for *_, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
