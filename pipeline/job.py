"""The whole job: list → read, decode, featurize and stage → fit the PCA → project and write.

`run()` is what `python -m pipeline run` and the notebook call.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import platform
import time
from datetime import datetime, timezone
from typing import Callable

from distributed import as_completed, performance_report
from tqdm.auto import tqdm

import cluster

from . import featurize, reduce, sink, source
from .config import Settings, UsageError

log = logging.getLogger("pipeline")
PACKAGES = ["dask", "distributed", "dask-ml", "scikit-learn", "tensorflow", "keras", "numpy",
            "pillow", "pyarrow", "fsspec", "s3fs"]
SECRET_OPTIONS = ("key", "secret", "token", "password")


def run(settings: Settings, *, say: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run the job with `settings`; returns the manifest (also written next to the output)."""
    s = settings
    spec = featurize.model_spec(s.model)
    cluster.check_address(s.cluster)
    if isinstance(s.n_components, int) and s.n_components > spec.n_features:
        raise UsageError(f"`n-components` {s.n_components} is more than the {spec.n_features} features of {s.model}")
    timings: dict[str, float] = {}
    started = datetime.now(timezone.utc)

    with stopwatch(timings, "list"):
        listing = source.list_images(s.input, s.storage_options, s.extensions)
    out_fs, out = source.open_url(s.output, s.storage_options)
    output = source.full_url(out_fs, out)
    check_writable(out_fs, out, output)
    weights = featurize.resolve_weights(s.model, s.weights, s.seed, s.storage_options)
    if weights.warning:
        log.warning(weights.warning)
    if s.cluster != "local" and (source.is_local(listing.fs) or source.is_local(out_fs)):
        log.warning("input or output is a local path and the cluster is not local: its workers must see that path too")
    say(f"{len(listing.rows)} images under {s.input}; non-image files skipped: {listing.skipped}")

    with contextlib.ExitStack() as stack:
        with stopwatch(timings, "cluster start"):
            client = stack.enter_context(cluster.connect(s.cluster, s.local_cluster))
        say(f"dashboard: {client.dashboard_link}")
        if s.report:
            stack.enter_context(performance_report(filename=s.report))
        sink.remove_outputs(out_fs, out)
        key = featurize.ModelKey(s.model, s.image_size, weights.used, s.seed)
        with stopwatch(timings, "featurize"):
            staged = stage_features(client, listing, key, s, out_fs, out, progress)
        n_rows = sum(part["rows"] for part in staged)
        errors = [error for part in staged for error in part["errors"]]
        sink.write_parquet(out_fs, f"{out}/{sink.ERRORS}", sink.errors_table(errors))
        if n_rows < 2:
            raise UsageError(
                f"only {n_rows} of {len(listing.rows)} images could be used (see {output}/{sink.ERRORS}): "
                "the PCA needs at least 2"
            )
        with stopwatch(timings, "pca fit"):
            features = reduce.staged_matrix(out_fs, [p["staged"] for p in staged], [p["rows"] for p in staged], spec.n_features)
            with tqdm(total=n_rows, unit="img", desc="pca fit", disable=not progress) as bar:
                pca = reduce.fit(features, s.n_components, s.pca_batch_size, bar.update)
            pca.save(out_fs, f"{out}/{sink.PCA}")
        with stopwatch(timings, "project + write"):
            write_output(client, staged, pca, out_fs, out, progress)
        dashboard = client.dashboard_link
    if isinstance(s.n_components, int) and pca.n_components < s.n_components:
        log.warning(f"{s.n_components} components asked, the data has {pca.n_components}: kept {pca.n_components}")
    manifest = {
        "input": s.input,
        "output": output,
        "started": started.isoformat(),
        "finished": datetime.now(timezone.utc).isoformat(),
        "settings": public_settings(s),
        "versions": versions(),
        "model": {"name": s.model, "n_features": spec.n_features, "image_size": s.image_size},
        "weights": {"requested": s.weights, "used": weights.used, "warning": weights.warning},
        "counts": {
            "listed": len(listing.rows),
            "written": n_rows,
            "failed": len(errors),
            "skipped_non_images": listing.skipped,
            "partitions": len(staged),
        },
        "pca": {"n_components": pca.n_components, "variance_kept": pca.variance_kept, "n_samples": pca.n_samples},
        "timings_s": timings,
        "worker_seconds": worker_seconds(staged),
        "images_per_s": {
            "featurize": len(listing.rows) / timings["featurize"],
            "list_to_output": len(listing.rows) / sum(v for k, v in timings.items() if k != "cluster start"),
        },
        "dashboard": dashboard,
    }
    sink.write_json(out_fs, f"{out}/{sink.MANIFEST}", manifest)
    return manifest


def stage_features(client, listing, key, s: Settings, out_fs, out: str, progress: bool) -> list[dict]:
    """Featurize every partition on the workers and stage its features; results in partition order."""
    sink.make_folder(out_fs, f"{out}/{sink.STAGING}")
    size = s.images_per_partition
    parts = [listing.rows.iloc[start : start + size] for start in range(0, len(listing.rows), size)]
    futures = {}
    for index, rows in enumerate(parts):
        staged = f"{out}/{sink.STAGING}/{sink.part_name(index)}"
        future = client.submit(
            featurize.featurize_partition, rows, listing.fs, listing.root, key, s.batch_size,
            s.storage_options, out_fs, staged, key=f"featurize-{index}-{client.id}",
        )
        futures[future] = (index, staged, len(rows))
    results: list[dict] = [{}] * len(parts)
    with tqdm(total=len(listing.rows), unit="img", desc="featurize", disable=not progress) as bar:
        for future, result in as_completed(futures, with_results=True):
            index, staged, n_images = futures[future]
            results[index] = result | {"staged": staged}
            bar.update(n_images)
    return results


def write_output(client, staged: list[dict], pca: reduce.Pca, out_fs, out: str, progress: bool) -> None:
    """Project each staged partition on the kept components and write it to images.parquet/."""
    sink.make_folder(out_fs, f"{out}/{sink.IMAGES}")
    mean, components = client.scatter([pca.mean, pca.components], broadcast=True)
    futures = [
        client.submit(
            sink.finish_partition, out_fs, part["staged"], f"{out}/{sink.IMAGES}/{sink.part_name(index)}",
            mean, components, key=f"write-{index}-{client.id}",
        )
        for index, part in enumerate(staged)
        if part["rows"]
    ]
    with tqdm(total=sum(p["rows"] for p in staged), unit="img", desc="write", disable=not progress) as bar:
        for _, rows in as_completed(futures, with_results=True):
            bar.update(rows)
    out_fs.rm(f"{out}/{sink.STAGING}", recursive=True)


def check_writable(fs, path: str, url: str) -> None:
    """Fail before any work if the output cannot be written."""
    probe = f"{path}/{sink.STAGING}/.write-test"
    try:
        sink.make_folder(fs, f"{path}/{sink.STAGING}")
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as error:  # each storage backend fails its own way (no credentials, read-only...)
        raise UsageError(
            f"cannot write to output {url}: {type(error).__name__}: {error}; choose a writable folder or bucket"
        ) from None


@contextlib.contextmanager
def stopwatch(timings: dict, name: str):
    """Add the wall seconds of the block to timings[name]."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - started


def worker_seconds(staged: list[dict]) -> dict[str, float]:
    """Seconds the workers spent in each step of featurizing, summed over partitions."""
    total: dict[str, float] = {}
    for part in staged:
        for step, seconds in part["seconds"].items():
            total[step] = total.get(step, 0.0) + seconds
    return total


def public_settings(s: Settings) -> dict:
    """The settings for the manifest, with any credential in the storage options masked."""
    data = s.as_dict()
    data["storage_options"] = {
        k: ("***" if any(word in k.lower() for word in SECRET_OPTIONS) else v)
        for k, v in s.storage_options.items()
    }
    return data


def versions() -> dict[str, str]:
    """Python's and the main packages' versions, for the manifest."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found
