"""The nearest-images index at 10^5 and 10^6 rows, k = 128 and 420: build, bytes, load, memory, query time, recall.

Rows: the PCA coordinates of a real output (`--output`, made with --n-components 420 or more; its
first 128 columns are the k = 128 projection, the same components in the same order). 10^5 rows
are its rows; 10^6 are its rows and 9 noisy copies of each: copy c of row i is row i plus
Gaussian noise of standard deviation α·σ_j in component j (σ_j: the component's spread over the
rows), α chosen so that the noise's mean length equals the median distance of a real row to its
nearest other row (measured on 1,000 rows). Queries: 1,000 rows drawn at random plus noise of the
same law, so new points, none in the index.

Each case writes its rows as parquet parts of --rows-per-part rows, builds the index as `run` does
(index.build: sample, train, add part after part, held-out recall, nprobe), then a fresh process
loads it (memory-mapped, page cache warm) and answers the 1,000 queries one at a time on one thread
(wall time, and the thread's CPU time, which other processes on a shared machine disturb less).
Recall@k: the share of the exact k nearest (a brute-force search of every row) that the index finds.

    .venv/bin/python -m pipeline run --input /tmp/images --output /tmp/out100k --image-size 32 --n-components 420 --weights random
    .venv/bin/python benchmarks/index.py --output /tmp/out100k
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import faiss
import fsspec
import numpy as np
import pyarrow as pa

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.making import sink  # noqa: E402
from pipeline.reading import index

FS = fsspec.filesystem("file")
QUERIES = 1000

CHILD = """
import json, sys, time, numpy as np, faiss, fsspec
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096
from pipeline.reading import index
queries = np.load(sys.argv[2])
before = rss()
started = time.perf_counter()
found = index.SearchIndex(sys.argv[1], json.load(open(sys.argv[1] + '/index.json')))
load_s = time.perf_counter() - started
after_load = rss()
faiss.omp_set_num_threads(1)
found.search(queries[:10], 10)
times, cpu, rows = [], [], []
for q in queries:
    started, started_cpu = time.perf_counter(), time.thread_time()
    nearest = found.search(q[None], 10)
    times.append(time.perf_counter() - started)
    cpu.append(time.thread_time() - started_cpu)
    rows.append(nearest.rows[0].tolist())
np.save(sys.argv[3], np.array(rows))
print(json.dumps({"load_s": load_s, "rss_before": before, "rss_after_load": after_load, "rss_after_queries": rss(),
                  "p50_ms": 1000 * float(np.percentile(times, 50)), "p99_ms": 1000 * float(np.percentile(times, 99)),
                  "cpu_p50_ms": 1000 * float(np.percentile(cpu, 50)), "cpu_p99_ms": 1000 * float(np.percentile(cpu, 99))}))
"""


def real_rows(output: str) -> tuple[np.ndarray, int]:
    parts = sorted(FS.glob(f"{output}/{sink.IMAGES}/*.parquet"))
    tables = [sink.read_parquet(FS, part, ["pca"]) for part in parts]
    width = len(tables[0]["pca"][0])
    return np.concatenate([sink.matrix(t["pca"], width) for t in tables]).astype(np.float32), len(parts)


def noise_scale(rows: np.ndarray, rng) -> np.ndarray:
    """Per component: α·σ_j, with α making the noise's mean length the median nearest-neighbour distance."""
    sample = rows[rng.choice(len(rows), 1000, replace=False)]
    distances, _ = faiss.knn(sample, rows, 2)
    median_nn = float(np.median(np.sqrt(distances[:, 1])))
    sigma = rows.std(axis=0)
    alpha = median_nn / float(np.sqrt((sigma**2).sum()))
    return (alpha * sigma).astype(np.float32), median_nn


def write(folder: pathlib.Path, vectors: np.ndarray, per_part: int) -> list[str]:
    shutil.rmtree(folder, ignore_errors=True)
    FS.makedirs(str(folder / sink.IMAGES))
    parts = []
    for number, first in enumerate(range(0, len(vectors), per_part)):
        block = vectors[first : first + per_part]
        ids = range(first, first + len(block))
        table = pa.table({"path": [f"row/{i}.jpg" for i in ids], "label": [f"label {i % 13}" for i in ids],
                          "pca": sink.list_array(block)})
        parts.append(str(folder / sink.IMAGES / sink.part_name(number)))
        sink.write_parquet(FS, parts[-1], table)
    return parts


def recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(e[:k])) / k for f, e in zip(found, exact)]))


def case(scratch: pathlib.Path, vectors: np.ndarray, queries: np.ndarray, per_part: int) -> dict:
    folder = scratch / f"case-{len(vectors)}-{vectors.shape[1]}"
    parts = write(folder, vectors, per_part)
    started = time.perf_counter()
    about = index.build(FS, str(folder / sink.INDEX), parts, vectors.shape[1], len(vectors))
    build_s = time.perf_counter() - started
    _, exact = faiss.knn(queries, vectors, 10)
    np.save(scratch / "queries.npy", queries)
    child = subprocess.run([sys.executable, "-c", CHILD, str(folder / sink.INDEX), str(scratch / "queries.npy"), str(scratch / "found.npy")],
                           capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(REPO)}, check=True)
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    found = np.load(scratch / "found.npy")
    result = {"rows": len(vectors), "k": vectors.shape[1], "kind": about["factory"], "nprobe": about["parameters"]["nprobe"],
              "build_s": build_s, "bytes": about["bytes"], "faiss_bytes": (folder / sink.INDEX / index.FILE).stat().st_size,
              **measured, "recall5": recall(found, exact, 5), "recall10": recall(found, exact, 10),
              "held_out": about["recall"]}
    shutil.rmtree(folder)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="a finished output with at least 420 PCA components")
    parser.add_argument("--scratch", default="/tmp/index-benchmark", help="where the cases' parts and indexes are written (removed after each)")
    parser.add_argument("--rows-per-part", type=int, default=4096, help="rows per parquet part of each case (default 4096)")
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--widths", default="128,420")
    args = parser.parse_args()
    scratch = pathlib.Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    rows, n_parts = real_rows(args.output)
    rng = np.random.default_rng(0)
    print(f"{len(rows):,} real rows × {rows.shape[1]} from {args.output} ({n_parts} parts); {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for width in map(int, args.widths.split(",")):
        real = np.ascontiguousarray(rows[:, :width])
        scale, median_nn = noise_scale(real, rng)
        print(f"k = {width}: median nearest-neighbour distance {median_nn:.3f}; noise σ from {scale.min():.4f} to {scale.max():.4f}", flush=True)
        picked = rng.choice(len(real), QUERIES, replace=False)
        queries = (real[picked] + rng.normal(size=(QUERIES, width)).astype(np.float32) * scale).astype(np.float32)
        for size in map(int, args.sizes.split(",")):
            copies = -(-size // len(real))
            vectors = np.concatenate([real] + [real + rng.normal(size=real.shape).astype(np.float32) * scale for _ in range(copies - 1)])[:size]
            results.append(case(scratch, np.ascontiguousarray(vectors), queries, args.rows_per_part))
            print(json.dumps(results[-1]), flush=True)
            del vectors
    print()
    print("| rows | k | index (nprobe) | build s | bytes (index.faiss) | load s | RSS after load (+ at load) | query p50 / p99 ms, wall (CPU) | recall@5 / @10 | held-out recall@5 / @10 (manifest) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        held, nprobe = r["held_out"] or {}, f" ({r['nprobe']})" if r["nprobe"] else ""
        print(f"| {r['rows']:,} | {r['k']} | {r['kind']}{nprobe} | {r['build_s']:.1f} | "
              f"{r['bytes'] / 2**20:,.0f} MiB ({r['faiss_bytes'] / 2**20:,.0f}) | {r['load_s']:.3f} | "
              f"{r['rss_after_load'] / 2**20:,.0f} MiB (+{(r['rss_after_load'] - r['rss_before']) / 2**20:,.0f}) | "
              f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ({r['cpu_p50_ms']:.2f} / {r['cpu_p99_ms']:.2f}) | {r['recall5']:.3f} / {r['recall10']:.3f} | "
              f"{held.get('@5', 0):.3f} / {held.get('@10', 0):.3f} |")


if __name__ == "__main__":
    main()
