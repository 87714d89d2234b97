"""The PCA fit alone, before and after: IncrementalPCA batch by batch against moments added up on the cluster.

Stages synthetic CNN-like features (float32, non-negative: a ReLU of 40 latent factors plus
noise) as the pipeline stages real ones, one parquet file per 256 rows in a temporary folder,
then fits a PCA on them on a fresh LocalCluster for each number of worker processes:

- before: what `reduce.fit` did until the moments (kept here as `incremental_fit`): dask-ml's
  IncrementalPCA, one exact SVD per batch of 5 × features rows, one batch after the other;
- after: what `pipeline run` does (`reduce.MomentsSum`): each partition's count, mean and scatter
  matrix, added up pairwise on the workers, then one eigendecomposition. Timed here from the
  staged files, all at once; in a run they are computed while featurizing goes on.

    .venv/bin/python benchmarks/pca.py                          # 20,000 and 200,000 rows, 1 and 2 workers (~7 min)
    .venv/bin/python benchmarks/pca.py --workers 1 --threads 2  # the pipeline's LocalCluster on 2 cores
    .venv/bin/python benchmarks/pca.py --rows 20000 --workers 1 # a quick try

Prints one table: seconds, rows/s, and the workers' peak RSS (the largest of them, and its rise
over the worker's RSS before the fit). Checks that every fit agrees with the first on the top-50
explained variance ratios. Run it on a quiet machine. Exit code 0 if every check passes.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
import warnings

import fsspec
import numpy as np
import pyarrow as pa
from distributed import Client, LocalCluster

from pipeline.making import reduce, sink

ROWS_PER_PARTITION = 256  # the pipeline's images-per-partition


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000], help="rows of each data set (default 20000 200000)")
    parser.add_argument("--features", type=int, default=1280, help="features per row (default 1280, MobileNetV2's)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker processes to compare (default 1 2)")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker process (default 1: a process per core)")
    return parser.parse_args(argv)


def stage(folder: str, rows: int, width: int) -> list[str]:
    """Write `rows` synthetic CNN-like rows as staged partitions of 256 (the last one shorter) under `folder`; their paths."""
    loadings = np.random.default_rng(0).standard_normal((40, width)) * np.geomspace(1.0, 0.05, 40)[:, None]
    fs, paths = fsspec.filesystem("file"), []
    os.makedirs(folder)
    for index, start in enumerate(range(0, rows, ROWS_PER_PARTITION)):
        rng = np.random.default_rng(index + 1)
        n = min(ROWS_PER_PARTITION, rows - start)
        features = np.maximum(rng.standard_normal((n, 40)) @ loadings + 0.3 * rng.standard_normal((n, width)), 0)
        paths.append(f"{folder}/{sink.part_name(index)}")
        sink.write_parquet(fs, paths[-1], pa.table({"features": sink.list_array(features.astype(np.float32))}))
    return paths


def incremental_fit(features, n_components: int | float) -> reduce.Pca:
    """reduce.fit before the moments: IncrementalPCA from scratch, one batch of 5 × features rows (one block) at a time."""
    from dask_ml.decomposition import IncrementalPCA
    from sklearn.utils import gen_batches

    n_rows, width = features.shape
    rank = min(n_rows, width)
    batch_size = max(5 * width, rank)
    model = IncrementalPCA(n_components=rank, svd_solver="full", batch_size=batch_size)
    with reduce.large_graphs_allowed():
        for batch in gen_batches(n_rows, batch_size, min_batch_size=rank):
            model.partial_fit(reduce.one_block(features[batch]))
    return reduce.Pca.of(model, n_components)


def moments_fit(client, paths: list[str], width: int, n_components: int | float) -> reduce.Pca:
    """What a run does, from the staged files: each partition's moments, added up on the workers, one eigh."""
    total = reduce.MomentsSum(client, fsspec.filesystem("file"), width, ROWS_PER_PARTITION)
    for index, path in enumerate(paths):
        total.add(index, path)
    return total.pca(n_components)


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes: Linux's VmHWM (ru_maxrss would count the
    parent's peak too in a process started by fork and exec, as a nanny starts a worker)."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure(method: str, paths: list[str], rows: int, width: int, workers: int, threads: int) -> dict:
    """Fit with `method` on a fresh LocalCluster of `workers` processes; seconds and the workers' memory."""
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        for module in ("pipeline.making.reduce", "dask_ml.decomposition"):  # imports are not the fit
            client.run(importlib.import_module, module)
        # IncrementalPCA's first step divides by the previous count, 0, and overwrites the result
        client.run(warnings.filterwarnings, "ignore", message="invalid value encountered in divide")
        before = client.run(rss)
        started = time.perf_counter()
        if method == "before":
            sizes = [min(ROWS_PER_PARTITION, rows - start) for start in range(0, rows, ROWS_PER_PARTITION)]
            pca = incremental_fit(reduce.staged_matrix(fsspec.filesystem("file"), paths, sizes, width), 0.95)
        else:
            pca = moments_fit(client, paths, width, 0.95)
        seconds = time.perf_counter() - started
        peaks = client.run(peak_rss)
    worst = max(peaks, key=peaks.get)
    return {"method": method, "rows": rows, "workers": f"{workers} × {threads}", "seconds": seconds,
            "peak": peaks[worst], "rise": max(peaks[worst] - before[worst], 0), "pca": pca}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {cores} cores, load average {os.getloadavg()[0]:.2f} at start; "
          f"{args.features} features, {ROWS_PER_PARTITION} rows per partition", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="pca-bench-") as tmp:
        for rows in args.rows:
            started = time.perf_counter()
            paths = stage(f"{tmp}/{rows}", rows, args.features)
            print(f"staged {rows:,} rows in {len(paths)} partitions: {time.perf_counter() - started:.1f} s", flush=True)
            for workers in args.workers:
                for method in ("before", "after"):
                    results.append(measure(method, paths, rows, args.features, workers, args.threads))
                    r = results[-1]
                    print(f"  {method:<6} {r['workers']}: {r['seconds']:.1f} s", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end\n")
    print("| rows × features | worker processes × threads | fit | seconds | rows/s | worker peak RSS | its rise in the fit |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        fit = "IncrementalPCA, batch by batch" if r["method"] == "before" else "moments, added up on the workers"
        print(f"| {r['rows']:,} × {args.features:,} | {r['workers']} | {fit} | {r['seconds']:.1f} | "
              f"{r['rows'] / r['seconds']:,.0f} | {r['peak'] / 2**20:,.0f} MiB | +{r['rise'] / 2**20:,.0f} MiB |")
    ok = True
    for rows in args.rows:
        fits = [r["pca"] for r in results if r["rows"] == rows]
        first = fits[0].explained_variance_ratio[:50]
        worst = max(float(np.max(np.abs(p.explained_variance_ratio[:50] - first) / first)) for p in fits)
        ok &= worst < 1e-6
        print(f"{rows:,} rows: top-50 explained variance ratios of every fit within {worst:.1e} relative of the first "
              f"({'ok' if worst < 1e-6 else 'FAILED'}); {fits[0].n_components} components keep 95%")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
