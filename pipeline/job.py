"""The whole job: list → read, decode, featurize and stage → fit the PCA → project and write.

`run()` is what `python -m pipeline run` and the notebook call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import platform
import time
from datetime import datetime, timezone
from typing import Callable

import pyarrow as pa
from distributed import as_completed, performance_report
from tqdm.auto import tqdm

import cluster

from . import featurize, reduce, sink, source
from .config import Settings, UsageError

log = logging.getLogger("pipeline")
PACKAGES = ["dask", "distributed", "dask-ml", "scikit-learn", "keras", "tensorflow", "jax", "jaxlib", "torch", "numpy",
            "pillow", "pyarrow", "fsspec", "s3fs"]
SECRET_OPTIONS = ("key", "secret", "token", "password")


RESUME_KEYS = ("input", "extensions", "images_per_partition", "max_image_pixels", "model", "image_size",
               "batch_size", "weights", "seed")  # what decides the rows and features of a run


def run(
    settings: Settings, *, resume: bool = False, overwrite: bool = False,
    say: Callable[[str], None] = print, progress: bool = True, client=None,
) -> dict:
    """Run the job with `settings`; returns the manifest (also written next to the output).

    An output folder that already holds a run is refused unless `resume` (finish an interrupted
    run, featurizing only the partitions it had not staged) or `overwrite` (replace it: the old
    output stays until the new one is committed). `client`: a Dask client to run on (a notebook's);
    by default one for `settings.cluster` is started and closed here.
    """
    s = settings
    cluster.check_reachable(s.cluster)
    spec = featurize.model_spec(s.model)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other: resume an interrupted run, or replace the output")
    if isinstance(s.n_components, int) and s.n_components > spec.n_features:
        raise UsageError(f"`n-components` {s.n_components} is more than the {spec.n_features} features of {s.model}")
    timings: dict[str, float] = {}
    started = datetime.now(timezone.utc)
    out_fs, out = source.open_url(s.output, s.storage_options)
    output = source.full_url(out_fs, out)

    with output_errors(output):
        state = existing_output(out_fs, out, output, resume, overwrite)
    if state == "complete":
        say(f"{output} is complete: nothing to resume")
        return sink.read_json(out_fs, f"{out}/{sink.MANIFEST}")
    if s.report:
        check_report_writable(s.report, s.storage_options)
    if state == "resume":
        listing, weights = resume_plan(out_fs, out, output, s)
        say(f"resuming the interrupted run in {output}")
    else:
        with stopwatch(timings, "list"):
            listing = source.list_images(s.input, s.storage_options, s.extensions)
        weights = featurize.resolve_weights(s.model, s.weights, s.seed, s.storage_options)
        check_writable(out_fs, out, output)
        save_plan(out_fs, out, s, listing, weights, command="run")
    if weights.warning:
        log.warning(weights.warning)
    if not cluster.on_this_machine(s.cluster) and (source.is_local(listing.fs) or source.is_local(out_fs)):
        log.warning("input or output is a local path and the cluster is not local: its workers must see that path too")
    say(f"{len(listing.rows)} images under {s.input}; non-image files skipped: {listing.skipped}")

    with contextlib.ExitStack() as stack:
        with stopwatch(timings, "cluster start"):
            if client is None:
                client = stack.enter_context(cluster.connect(s.cluster, s.local_cluster, say))
        say(f"dashboard: {client.dashboard_link}")
        resources = cluster.featurize_resources(client, s.gpu)
        if s.report:
            stack.enter_context(performance_report(filename=s.report, storage_options=s.storage_options))
        key = featurize.ModelKey(s.model, s.image_size, weights.used, s.seed, s.backend)
        moments = reduce.MomentsSum(client, out_fs, spec.n_features, s.images_per_partition)
        with stopwatch(timings, "featurize"):
            staged = stage_features(client, listing, key, s, out_fs, out, progress, resources, moments.add)
        workers = cluster.size(client)  # who featurized: `cluster plan --from` divides the rate by them
        n_rows = sum(part["rows"] for part in staged)
        errors = [error for part in staged for error in part["errors"]]
        sink.write_parquet(out_fs, f"{out}/{sink.STAGING}/{sink.ERRORS}", sink.errors_table(errors))
        if n_rows < 2:
            raise UsageError(
                f"only {n_rows} of {len(listing.rows)} images could be used (see the errors in "
                f"{output}/{sink.STAGING}/{sink.ERRORS}): the PCA needs at least 2"
            )
        with stopwatch(timings, "pca fit"):
            with progress_bar("pca fit", n_rows, progress) as bar:
                pca = moments.pca(s.n_components)
                bar.update(n_rows)
            pca.save(out_fs, f"{out}/{sink.STAGING}/{sink.PCA}")
        with stopwatch(timings, "project + write"):
            parts = [sink.OutputPart(sink.part_name(index), staged=(p["staged"],)) for index, p in enumerate(staged) if p["rows"]]
            write_output(client, parts, n_rows, out_fs, out, progress)
        dashboard = client.dashboard_link
    if isinstance(s.n_components, int) and pca.n_components < s.n_components:
        log.warning(f"{s.n_components} components asked, the data has {pca.n_components}: kept {pca.n_components}")
    featurized = sum(part["images"] for part in staged if not part["resumed"])
    finished = datetime.now(timezone.utc).isoformat()
    manifest = {
        "input": s.input,
        "output": output,
        "started": started.isoformat(),
        "finished": finished,
        "settings": public_settings(s),
        "versions": versions(),
        "model": {"name": s.model, "n_features": spec.n_features, "image_size": s.image_size,
                  "devices": sorted({part["device"] for part in staged if "device" in part})},
        "weights": {"requested": s.weights, "used": weights.used, "warning": weights.warning},
        "cluster": workers,
        **outcome(listing, n_rows, len(errors), len(staged), staged, pca, timings, featurized),
        "dashboard": dashboard,
        "history": [{"command": "run", "input": s.input, "started": started.isoformat(), "finished": finished,
                     "listed": len(listing.rows), "featurized": len(listing.rows), "failed": len(errors)}],
    }
    sink.commit(out_fs, out, manifest)
    return manifest


def outcome(listing: source.Listing, written: int, failed: int, partitions: int, staged: list[dict],
            pca: reduce.Pca, timings: dict, featurized: int) -> dict:
    """The manifest's figures of one command (a run or an update): counts, PCA, timings and speed."""
    return {
        "counts": {
            "listed": len(listing.rows),
            "written": written,
            "failed": failed,
            "skipped_non_images": listing.skipped,
            "partitions": partitions,
            "partitions_resumed": sum(part["resumed"] for part in staged),
        },
        "pca": {"n_components": pca.n_components, "variance_kept": pca.variance_kept, "n_samples": pca.n_samples},
        "timings_s": timings,
        "worker_seconds": worker_seconds(staged),
        "images_per_s": {
            "featurize": featurized / timings["featurize"] if featurized else 0.0,
            "list_to_output": featurized / sum(v for k, v in timings.items() if k != "cluster start"),
        },
    }


def existing_output(fs, out: str, url: str, resume: bool, overwrite: bool) -> str:
    """What to do with what the output already holds: "new", "resume" or "complete"; never a silent mix."""
    interrupted = sink.exists(fs, out, sink.RUN)
    complete = sink.exists(fs, out, sink.MANIFEST)
    if resume and interrupted:
        return "resume"
    if resume and complete:
        return "complete"
    if not overwrite and (interrupted or complete or any(sink.exists(fs, out, name) for name in sink.FINAL)):
        if interrupted:
            raise UsageError(f"{url} already holds an interrupted run: pass --resume to finish it, "
                             "--overwrite to replace it, or choose another --output")
        raise UsageError(f"{url} already holds a finished output: pass --overwrite to replace it, use "
                         f"`python -m pipeline update --output {url}` to bring it up to date, or choose another --output")
    sink.remove(fs, out, sink.STAGING)  # an earlier output stays until this run commits
    return "new"


def save_plan(fs, out: str, s: Settings, listing: source.Listing, weights: featurize.Weights, **about) -> None:
    """Record what --resume needs to finish this run the same way: settings, weights and listing.

    `about`: the command ("run" or "update") and, for an update, the output version it started from.
    """
    sink.write_parquet(fs, f"{out}/{sink.LISTING}", pa.Table.from_pandas(listing.rows, preserve_index=False))
    plan = {"settings": resume_settings(s), "weights": dataclasses.asdict(weights), "skipped": listing.skipped} | about
    sink.write_json(fs, f"{out}/{sink.RUN}", plan)


def resume_plan(fs, out: str, url: str, s: Settings, command: str = "run") -> tuple[source.Listing, featurize.Weights]:
    """The listing and weights of the interrupted `command` in `out`, if it had the same settings as `s`."""
    plan = sink.read_json(fs, f"{out}/{sink.RUN}")
    if plan.get("command", "run") != command:
        raise UsageError(
            f"{url} holds an interrupted {plan['command']}: finish it with `python -m pipeline {plan['command']}"
            f"{' --resume' if plan['command'] == 'run' else ''} --output {url}`, or delete {url}/{sink.STAGING} to give it up"
        )
    now = resume_settings(s)
    changed = [f"{key} {plan['settings'][key]!r} there, {now[key]!r} now" for key in now if plan["settings"].get(key) != now[key]]
    if changed:
        again = "pass --overwrite to start again" if command == "run" else f"delete {url}/{sink.STAGING} to give it up"
        raise UsageError(
            f"the interrupted {command} in {url} had other settings ({'; '.join(changed)}): finish it with "
            f"the same settings, or {again}"
        )
    listing_fs, root = source.open_url(s.input, s.storage_options)
    rows = sink.read_parquet(fs, f"{out}/{sink.LISTING}").to_pandas()
    return source.Listing(listing_fs, root, rows, plan["skipped"]), featurize.Weights(**plan["weights"])


def resume_settings(s: Settings) -> dict:
    """The settings that decide a run's rows and features, as JSON data."""
    return json.loads(json.dumps({key: getattr(s, key) for key in RESUME_KEYS}))


def stage_features(client, listing, key, s: Settings, out_fs, out: str, progress: bool, resources=None,
                   staged_one: Callable[[int, str], None] = lambda index, path: None) -> list[dict]:
    """Featurize every partition on the workers (those with `resources`) and stage its features, in order.

    Partitions an interrupted run already staged are not featurized again: their summary is read back.
    `staged_one(index, path)` is called as each partition with rows is staged (or found staged).
    """
    sink.make_folder(out_fs, f"{out}/{sink.STAGED}")
    done = set(out_fs.find(f"{out}/{sink.STAGED}"))
    size = s.images_per_partition
    parts = [listing.rows.iloc[start : start + size] for start in range(0, len(listing.rows), size)]
    futures = {}
    for index, rows in enumerate(parts):
        staged = f"{out}/{sink.STAGED}/{sink.part_name(index)}"
        if staged in done:
            future = client.submit(sink.staged_summary, out_fs, staged, key=f"resume-{index}-{client.id}")
        else:
            future = client.submit(
                featurize.featurize_partition, rows, listing.fs, listing.root, key, s.batch_size,
                s.max_image_pixels, s.storage_options, out_fs, staged, key=f"featurize-{index}-{client.id}",
                resources=resources,
            )
        futures[future] = (index, staged, len(rows))
    results: list[dict] = [{}] * len(parts)
    with progress_bar("featurize", len(listing.rows), progress) as bar:
        for future, result in as_completed(futures, with_results=True):
            index, staged, n_images = futures[future]
            results[index] = result | {"staged": staged, "images": n_images, "resumed": staged in done}
            if result["rows"]:
                staged_one(index, staged)
            bar.update(n_images)
    return results


def write_output(client, parts: list[sink.OutputPart], n_rows: int, out_fs, out: str, progress: bool) -> int:
    """Project each part on the kept components and write it to the new images.parquet/; returns the rows.

    The projection is loaded by a task rather than scattered, so that Dask can recompute it on
    another worker if the one holding it is lost.
    """
    final = f"{out}/{sink.STAGING}/{sink.IMAGES}"
    sink.make_folder(out_fs, final)
    projection = client.submit(reduce.projection, out_fs, f"{out}/{sink.STAGING}/{sink.PCA}", key=f"projection-{client.id}")
    futures = [
        client.submit(sink.finish_partition, out_fs, part, final, projection, key=f"write-{part.name}-{client.id}")
        for part in parts
    ]
    written = 0
    with progress_bar("write", n_rows, progress) as bar:
        for _, rows in as_completed(futures, with_results=True):
            bar.update(rows)
            written += rows
    return written


def check_writable(fs, path: str, url: str) -> None:
    """Fail before any work if the output cannot be written."""
    probe = f"{path}/{sink.STAGING}/.write-test"
    with output_errors(url):
        sink.make_folder(fs, f"{path}/{sink.STAGING}")
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)


@contextlib.contextmanager
def output_errors(url: str):
    """Turn any failure to use the output into one usage error that says what to do."""
    try:
        yield
    except UsageError:
        raise
    except Exception as error:  # each storage backend fails its own way (no credentials, read-only...)
        raise UsageError(
            f"cannot write to output {url}: {type(error).__name__}: {error}; choose a writable folder or bucket"
        ) from None


def progress_bar(stage: str, images: int, show: bool) -> tqdm:
    """A stage's bar: images done / total and images/s averaged over the stage (not the last update)."""
    return tqdm(total=images, unit="img", desc=f"{stage:<9}", smoothing=0, disable=not show)


def check_report_writable(url: str, storage_options: dict) -> None:
    """Fail before any work if the performance report could not be saved at the end."""
    fs, path = source.open_url(url, storage_options)
    probe = f"{path}.write-test"  # beside it: an earlier report stays until this one replaces it
    try:
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as error:  # each storage backend fails its own way
        raise UsageError(f"cannot write the report {url}: {type(error).__name__}: {error}; choose a file in an existing folder") from None


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
