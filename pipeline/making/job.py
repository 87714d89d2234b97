"""The whole job: list → read, decode, featurize and stage → fit the PCA → project and write → index.

`run()` is what `python -m pipeline run` and the notebook call. `update()` (incremental.py) goes
through the same flow, `featurize_fit_write()`, with its own listing, PCA and parts; `recognize`
uses its cluster and staging. The output's life cycle (new, interrupted, finished) is output.py's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import platform
import time
from datetime import datetime, timezone
from typing import Callable, Iterator, Protocol

from distributed import as_completed, performance_report
from tqdm.auto import tqdm

import cluster

from . import featurize, finetune, listings, preprocess, reduce, sink
from .. import config, images, source
from ..reading import index
from ..config import Settings, UsageError, masked
from ..output import Output

log = logging.getLogger("pipeline")
PACKAGES = ["dask", "distributed", "dask-ml", "scikit-learn", "keras", "tensorflow", "jax", "jaxlib", "torch", "numpy",
            "pillow", "pyarrow", "fsspec", "s3fs"]
WINDOW = 256  # featurize tasks submitted at a time, at least 8 a thread (see stage_features): 2,000 held ~18 MiB more on the client


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
    out = Output.at(s.output, s.storage_options)
    state = out.state(resume, overwrite)
    if state == "complete":
        say(f"{out.url} is complete: nothing to resume")
        return out.manifest()
    if s.report:
        check_report_writable(s.report, s.storage_options)
    if state == "resume":
        listing, weights = out.resume_plan(s)
        say(f"resuming the interrupted run in {out.url}")
    else:
        with stopwatch(timings, "list"):
            listing = listings.open_input(s)
        weights = featurize.resolve_weights(s.model, s.weights, s.seed, s.storage_options)
        finetune.check_fits(finetune.about(weights.used, s.storage_options), s.model, s.image_size)
        out.check_writable()
        out.save_plan(s, listing, weights, command="run")
    if weights.warning:
        log.warning(weights.warning)
    if not cluster.on_this_machine(s.cluster) and (source.is_local(listing.fs) or source.is_local(out.fs)):
        log.warning("input or output is a local path and the cluster is not local: its workers must see that path too")
    if isinstance(listing, listings.Spread):
        units = "folders or key ranges" if listing.kind == "prefix" else "data files"
        say(f"{listing.kind} {s.input}: {len(listing.files)} {units}, listed by the workers")
    else:
        say(f"{len(listing.rows)} images under {s.input}; non-image files skipped: {listing.skipped}")
    s = dataclasses.replace(s, images_per_partition=config.partition_size(s.images_per_partition, listing.estimate))

    done = featurize_fit_write(
        s, out, listing, weights, lambda client: FullFit(client, out, s, spec.n_features, progress),
        lambda staged, listed: (run_parts(staged, listed), sum(p["rows"] for p in staged)),
        say=say, progress=progress, client=client, timings=timings,
    )
    if isinstance(s.n_components, int) and done.pca.n_components < s.n_components:
        log.warning(f"{s.n_components} components asked, the data has {done.pca.n_components}: kept {done.pca.n_components}")
    featurized = sum(part["images"] for part in done.staged if not part["resumed"])
    manifest = manifest_of(s, out, started, done.listed, done.skipped, weights, done, timings, featurized)
    manifest["history"] = [history_entry("run", s, manifest, listed=done.listed, featurized=featurized,
                                         failed=len(done.errors))]
    if made := preprocess.recorded(listing.fs, listing.root):
        manifest["preprocess"] = made  # recognize preprocesses new photos alike
    out.commit(manifest)
    return manifest


# --- the flow that run and update share ------------------------------------------------------------


class Fit(Protocol):
    """How a command gets its PCA: told of each partition as it is staged, asked for the PCA once all are."""

    stage: str  # its name in the manifest's timings

    def add(self, index: int, path: str) -> None: ...

    def pca(self, staged: list[dict]) -> reduce.Pca: ...


class FullFit:
    """A run's exact PCA: each partition's moments added up on the workers while the others are featurized."""

    stage = "pca fit"

    def __init__(self, client, out: Output, s: Settings, width: int, progress: bool):
        self.moments = reduce.MomentsSum(client, out.fs, width, s.images_per_partition)
        self.add = self.moments.add
        self.out, self.n_components, self.progress = out, s.n_components, progress

    def pca(self, staged: list[dict]) -> reduce.Pca:
        n_rows = sum(part["rows"] for part in staged)
        if n_rows < 2:
            raise UsageError(
                f"only {n_rows} of {sum(part['images'] for part in staged)} images could be used (see the errors in "
                f"{self.out.url}/{sink.STAGING}/{sink.ERRORS}): the PCA needs at least 2"
            )
        with progress_bar("pca fit", n_rows, self.progress) as bar:
            pca = self.moments.pca(self.n_components)
            bar.update(n_rows)
        return pca


@dataclasses.dataclass(frozen=True)
class Done:
    """What one pass of the flow did: the staged partitions, every error, the PCA, the parts written."""

    staged: list[dict]
    errors: list[dict]
    pca: reduce.Pca
    parts: int
    written: int
    workers: dict  # the cluster's worker processes and threads when featurizing ended
    dashboard: str
    listed: int  # images listed (featurized or resumed)
    skipped: int  # non-image files under the input
    index: dict  # the nearest-images index built: index.json


def featurize_fit_write(
    s: Settings, out: Output, listing: source.Listing, weights: featurize.Weights,
    fit_on: Callable[[object], Fit], parts_of: Callable[[list[dict], listings.Partitions], tuple[list[sink.OutputPart], int]], *,
    kept_errors: list[dict] = (), say: Callable[[str], None], progress: bool, client, timings: dict,
) -> Done:
    """On the cluster: featurize and stage the listing's images, fit the PCA, project and write every part.

    run and update differ only in what they list, how they fit (`fit_on`: given the client) and
    which parts they write (`parts_of`: given the staged partitions and what was listed, the parts and
    the rows they will hold); the errors of images not featurized again (`kept_errors`) join the new ones.
    Everything is written under _staging/.
    """
    key = featurize.ModelKey(s.model, s.image_size, weights.used, s.seed, s.backend)
    with on_cluster(s, client, say, timings) as client:
        fit = fit_on(client)
        with stopwatch(timings, "featurize"):
            staged, listed = stage_features(client, listing, key, s, out.fs, out.path, progress,
                                            cluster.featurize_resources(client, s.gpu), fit.add, say)
        workers = cluster.size(client)  # who featurized: `cluster plan --from` divides the rate by them
        errors = list(kept_errors) + [error for part in staged for error in part["errors"]]
        sink.write_parquet(out.fs, out / f"{sink.STAGING}/{sink.ERRORS}", sink.errors_table(errors))
        with stopwatch(timings, fit.stage):
            pca = fit.pca(staged)
            pca.save(out.fs, out / f"{sink.STAGING}/{sink.PCA}")
        with stopwatch(timings, "project + write"):
            parts, n_rows = parts_of(staged, listed)
            written = write_output(client, parts, n_rows, out.fs, out.path, progress, preprocess.details(listing.fs, listing.root))
        with stopwatch(timings, "index"):
            built = build_index(out, pca.n_components, written, say)
        return Done(staged, errors, pca, len(parts), written, workers, client.dashboard_link, listed.images, listed.skipped, built)


def run_parts(staged: list[dict], listed: listings.Partitions) -> list[sink.OutputPart]:
    """A run's output parts in path order: each a staged partition, or where the listing's data files shared
    paths, the rows of a few in a range of paths (listings.Partitions.outputs)."""
    parts = []
    for indices, low, high in listed.output_parts():
        sources = tuple(staged[i]["staged"] for i in indices if staged[i]["rows"])
        if sources:
            parts.append(sink.OutputPart(sink.part_name(len(parts)), sources, low=low, high=high))
    return parts


def build_index(out: Output, width: int, rows: int, say: Callable[[str], None]) -> dict:
    """The nearest-images index of the parts just written (under _staging/), from them, one after another."""
    folder = out / f"{sink.STAGING}/{sink.IMAGES}"
    out.fs.invalidate_cache(folder)  # written by the workers
    parts = sorted(out.fs.find(folder))
    return index.build(out.fs, out / f"{sink.STAGING}/{sink.INDEX}", parts, width, rows, say=say)


@contextlib.contextmanager
def on_cluster(s: Settings, client, say: Callable[[str], None], timings: dict) -> Iterator:
    """A client of the settings' cluster (or `client`, kept open), its dashboard said, a performance report if asked."""
    with contextlib.ExitStack() as stack:
        with stopwatch(timings, "cluster start"):
            if client is None:
                client = stack.enter_context(cluster.connect(s.cluster, s.local_cluster, say))
        say(f"dashboard: {client.dashboard_link}")
        if s.report:
            stack.enter_context(performance_report(filename=s.report, storage_options=s.storage_options))
        yield client


def manifest_of(s: Settings, out: Output, started: datetime, listed: int, skipped: int, weights: featurize.Weights,
                done: Done, timings: dict, featurized: int, devices: tuple[str, ...] = ()) -> dict:
    """The manifest of a run or an update, without its history: what ran, with what, what it did, how fast.

    `listed` counts every image under the input (an update featurizes only some), `skipped` its non-image files.
    """
    spec = featurize.model_spec(s.model)
    return masked({
        "input": s.input,
        "output": out.url,
        "started": started.isoformat(),
        "finished": datetime.now(timezone.utc).isoformat(),
        "settings": public_settings(s),
        "versions": versions(),
        "model": {"name": s.model, "n_features": spec.n_features, "image_size": s.image_size,
                  "devices": sorted(set(devices) | {part["device"] for part in done.staged if "device" in part})},
        "weights": {"requested": s.weights, "used": weights.used, "warning": weights.warning,
                    "finetuned": finetune.about(weights.used, s.storage_options)},
        "cluster": done.workers,
        **outcome(listed, skipped, done, timings, featurized),
        "dashboard": done.dashboard,
    })


def history_entry(command: str, s: Settings, manifest: dict, **counts) -> dict:
    """One command's entry in the manifest's history: when, on what, its counts, and its featurize rate and
    workers, which `cluster plan --from` reads (the rate of a run, not that of a later update of a few images)."""
    return masked({"command": command, "input": s.input, "started": manifest["started"], "finished": manifest["finished"], **counts,
                   "images_per_s": manifest["images_per_s"]["featurize"], "cluster": manifest["cluster"],
                   "cluster_start_s": manifest["timings_s"].get("cluster start", 0.0)})


def outcome(listed: int, skipped: int, done: Done, timings: dict, featurized: int) -> dict:
    """The manifest's figures of one command (a run or an update): counts, PCA, timings and speed."""
    return {
        "counts": {
            "listed": listed,
            "written": done.written,
            "failed": len(done.errors),
            "skipped_non_images": skipped,
            "partitions": done.parts,
            "partitions_resumed": sum(part["resumed"] for part in done.staged),
            "partitions_redone": sum(part.get("redone", False) for part in done.staged),
        },
        "pca": {"n_components": done.pca.n_components, "variance_kept": done.pca.variance_kept, "n_samples": done.pca.n_samples},
        "index": done.index,
        "timings_s": timings,
        "worker_seconds": worker_seconds(done.staged),
        "images_per_s": {
            "featurize": featurized / timings["featurize"] if featurized else 0.0,
            "list_to_output": featurized / sum(v for k, v in timings.items() if k != "cluster start"),
        },
    }


def stage_features(client, listing, key, s: Settings, out_fs, out: str, progress: bool, resources=None,
                   staged_one: Callable[[int, str], None] = lambda index, path: None,
                   say: Callable[[str], None] = lambda message: None) -> tuple[list[dict], listings.Partitions]:
    """Featurize every partition on the workers (those with `resources`) and stage its features;
    returns each partition's result, in the partitions' order, and what was listed.

    Each task is given its partition's byte range in a partitions file under `_staging/` (written here, or
    by the workers for an inventory, a listing file or a prefix), not its rows, and its result is let go
    once read, so that a worker lost later is not asked to redo it. Where the workers list, a data file's
    partitions are featurized as soon as it (and every one before it) is listed, while they list the rest.
    Partitions an interrupted run already staged are not featurized again: their summary is read back.
    `staged_one(index, path)` is called as each partition with rows is staged (or found staged).
    The partitions redone because a worker was lost are counted in each result's "redone".
    """
    sink.make_folder(out_fs, f"{out}/{sink.STAGED}")
    done = set(out_fs.find(f"{out}/{sink.STAGED}"))
    size = config.partition_size(s.images_per_partition, listing.estimate)
    started = time.perf_counter()
    plan = listings.plan(listing, client, out_fs, out, size, say)

    def submit(index: int, todo: str, byte_range: tuple[int, int]):
        staged = f"{out}/{sink.STAGED}/{sink.part_name(index)}"
        if staged in done:
            return client.submit(sink.staged_summary, out_fs, staged, key=f"resume-{index}-{client.id}")
        featurizing.add(index)
        return client.submit(
            featurize.featurize_partition, todo, byte_range, listing.fs, listing.root, key, s.batch_size,
            images.Limits.of(s), s.storage_options, out_fs, staged, key=f"featurize-{index}-{client.id}",
            resources=resources,
        )

    def submit_ready() -> None:
        """Submit partitions ready to featurize while fewer than `window` are: the client's futures (some KB each)
        stay bounded however many partitions there are, and the workers always have work queued."""
        while len(futures) < window and plan.ready:
            index, path, byte_range, n_images = plan.ready.popleft()
            future = submit(index, path, byte_range)
            futures[future] = (index, n_images)
            running.add(future)

    def said_listed() -> None:
        say(f"{plan.listed.images} images in {len(plan.listed.parts)} partitions of up to {size}; non-image files skipped: "
            f"{plan.listed.skipped} (listed in {time.perf_counter() - started:.1f} s)")

    window = max(WINDOW, 8 * sum(client.nthreads().values()))
    featurizing: set[int] = set()  # the partitions submitted to featurize (not found staged)
    results: dict[int, dict] = {}
    futures = {}
    running = as_completed(plan.pending, with_results=True)
    if plan.listed is not None:
        said_listed()
    submit_ready()
    with progress_bar("featurize", plan.estimate, progress) as bar:
        for future, result in running:
            if future not in futures:  # a data file listed by a worker
                if plan.add(future, result):
                    said_listed()
                    bar.total = plan.listed.images
                    bar.refresh()
                submit_ready()
                continue
            index, n_images = futures.pop(future)
            staged = f"{out}/{sink.STAGED}/{sink.part_name(index)}"
            results[index] = result | {"staged": staged, "images": n_images, "resumed": staged in done}
            if result["rows"]:
                staged_one(index, staged)
            bar.update(n_images)
            submit_ready()
    for index in redone(client, featurizing):
        results[index]["redone"] = True
    return [results[index] for index in range(len(results))], plan.listed


def redone(client, indices: set[int]) -> list[int]:
    """The partitions among `indices` that a lost worker was computing, or held unread: the scheduler redid them."""
    lost, ours = set(), f"-{client.id}"
    for _, event in client.get_events("all"):
        if isinstance(event, dict) and event.get("action") == "remove-worker":
            keys = (str(key) for key in [*event.get("processing-tasks", ()), *event.get("lost-computed-tasks", ())])
            lost |= {int(key.split("-")[1]) for key in keys if key.startswith("featurize-") and key.endswith(ours)} & indices
    return sorted(lost)


def write_output(client, parts: list[sink.OutputPart], n_rows: int, out_fs, out: str, progress: bool, details=None) -> int:
    """Project each part on the kept components and write it to the new images.parquet/; returns the rows.

    `details`: adds the photos' details to the rows of preprocessed images (preprocess.details).
    The projection is loaded by a task rather than scattered, so that Dask can recompute it on
    another worker if the one holding it is lost.
    """
    final = f"{out}/{sink.STAGING}/{sink.IMAGES}"
    sink.make_folder(out_fs, final)
    projection = client.submit(reduce.projection, out_fs, f"{out}/{sink.STAGING}/{sink.PCA}", key=f"projection-{client.id}")
    futures = [
        client.submit(sink.finish_partition, out_fs, part, final, projection, details, key=f"write-{part.name}-{client.id}")
        for part in parts
    ]
    written = 0
    with progress_bar("write", n_rows, progress) as bar:
        for _, rows in as_completed(futures, with_results=True):
            bar.update(rows)
            written += rows
    return written


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
    """The settings for the manifest, with every credential masked (config.masked)."""
    return masked(s.as_dict())


def versions() -> dict[str, str]:
    """Python's and the main packages' versions, for the manifest."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found
