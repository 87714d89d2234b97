"""Incremental update: bring a finished output up to date with its input, featurizing only what changed.

`python -m pipeline update` lists the input again and compares it with the output, path by path
and identity by identity (ETag, or size and mtime): new and replaced images are featurized,
deleted ones dropped. The PCA goes on fitting with the new features alone (reduce.update), every
row is projected again with it (features are stored: this reads and writes, but computes little),
and the new version is committed like a run: the old one stays whole until the new manifest.
"""
from __future__ import annotations

import contextlib
import dataclasses
from datetime import datetime, timezone
from typing import Callable

import pandas as pd
import pyarrow as pa
from distributed import performance_report

import cluster

from . import featurize, job, reduce, sink, source
from .config import Settings, UsageError

KEPT_SETTINGS = (*(key for key in job.RESUME_KEYS if key != "input"), "n_components", "pca_batch_size")  # the output's


@dataclasses.dataclass(frozen=True)
class Changes:
    """What an update does: the listing rows to featurize, the old paths to drop, the old errors to keep."""

    featurize: pd.DataFrame  # path, label, split, identity: new, replaced, or failed to read last time
    drop: frozenset  # paths whose old row or error goes: deleted, replaced or redone
    kept_errors: pd.DataFrame
    added: int
    replaced: int
    removed: int

    @property
    def nothing(self) -> bool:
        return self.featurize.empty and not self.drop


def update(
    settings: Settings, *, input: str | None = None, say: Callable[[str], None] = print,
    progress: bool = True, client=None,
) -> dict:
    """Update the output of `settings` with what changed under `input` (default: the output's own input).

    The model, weights, partitioning and PCA settings are the output's (its manifest's), whatever
    `settings` say: rows of one output always share them. `settings` give where to run (cluster,
    gpu, storage options, report). An interrupted update is finished by running it again.
    Returns the new manifest, or the old one when nothing changed.
    """
    cluster.check_reachable(settings.cluster)
    started = datetime.now(timezone.utc)
    out_fs, out = source.open_url(settings.output, settings.storage_options)
    output = source.full_url(out_fs, out)
    with job.output_errors(output):
        base = finished_manifest(out_fs, out, output)
    kept = {key: base["settings"][key] for key in KEPT_SETTINGS} | {"extensions": tuple(base["settings"]["extensions"])}
    s = dataclasses.replace(settings, **kept, input=input or base["input"])
    if s.report:
        job.check_report_writable(s.report, s.storage_options)
    weights = featurize.Weights(base["weights"]["used"], base["weights"]["warning"])
    timings: dict[str, float] = {}

    if sink.exists(out_fs, out, sink.RUN):
        listing, _ = job.resume_plan(out_fs, out, output, s, command="update")
        say(f"finishing the interrupted update of {output}")
    else:
        with job.stopwatch(timings, "list"):
            listing = source.list_images(s.input, s.storage_options, s.extensions)
        job.check_writable(out_fs, out, output)
        job.save_plan(out_fs, out, s, listing, weights, command="update", base=base["finished"])
    old_rows, old_errors = previous_output(out_fs, out)
    changes = compare(listing.rows, old_rows, old_errors)
    say(f"{len(listing.rows)} images under {s.input}: {changes.added} new, {changes.replaced} replaced, "
        f"{changes.removed} removed, {len(changes.featurize)} to featurize")
    if changes.nothing:
        sink.remove(out_fs, out, sink.STAGING)
        say(f"{output} is up to date")
        return base

    spec = featurize.model_spec(s.model)
    with contextlib.ExitStack() as stack:
        with job.stopwatch(timings, "cluster start"):
            if client is None:
                client = stack.enter_context(cluster.connect(s.cluster, s.local_cluster, say))
        say(f"dashboard: {client.dashboard_link}")
        if s.report:
            stack.enter_context(performance_report(filename=s.report, storage_options=s.storage_options))
        key = featurize.ModelKey(s.model, s.image_size, weights.used, s.seed, s.backend)
        new = source.Listing(listing.fs, listing.root, changes.featurize.reset_index(drop=True), listing.skipped)
        with job.stopwatch(timings, "featurize"):
            staged = job.stage_features(client, new, key, s, out_fs, out, progress, cluster.featurize_resources(client, s.gpu))
        workers = cluster.size(client)  # who featurized: `cluster plan --from` divides the rate by them
        new_errors = [error for part in staged for error in part["errors"]]
        errors = changes.kept_errors.to_dict("records") + new_errors
        sink.write_parquet(out_fs, f"{out}/{sink.STAGING}/{sink.ERRORS}", sink.errors_table(errors))
        with job.stopwatch(timings, "pca update"):
            pca = updated_pca(out_fs, out, staged, spec.n_features, s, progress)
        with job.stopwatch(timings, "project + write"):
            parts = partitions(out, old_rows, changes, staged, s.images_per_partition)
            n_rows = len(old_rows) - int(old_rows.path.isin(changes.drop).sum()) + sum(p["rows"] for p in staged)
            written = job.write_output(client, parts, n_rows, out_fs, out, progress)
        dashboard = client.dashboard_link

    finished = datetime.now(timezone.utc).isoformat()
    featurized = sum(part["images"] for part in staged)
    entry = {"command": "update", "input": s.input, "started": started.isoformat(), "finished": finished,
             "listed": len(listing.rows), "added": changes.added, "replaced": changes.replaced,
             "removed": changes.removed, "featurized": featurized, "failed": len(new_errors)}
    manifest = base | {
        "input": s.input,
        "output": output,
        "started": started.isoformat(),
        "finished": finished,
        "settings": job.public_settings(s),
        "versions": job.versions(),
        "model": base["model"] | {"devices": sorted(set(base["model"].get("devices", [])) | {p["device"] for p in staged if "device" in p})},
        "cluster": workers,
        **job.outcome(listing, written, len(errors), len(parts), staged, pca, timings, featurized),
        "dashboard": dashboard,
        "history": base.get("history", []) + [entry],
    }
    sink.commit(out_fs, out, manifest)
    return manifest


def finished_manifest(fs, out: str, url: str) -> dict:
    """The manifest of the complete output to update; a usage error that says what to do otherwise."""
    if sink.exists(fs, out, sink.MANIFEST):
        return sink.read_json(fs, f"{out}/{sink.MANIFEST}")
    if sink.exists(fs, out, sink.RUN):
        raise UsageError(f"{url} holds an interrupted run, not a finished one: finish it with "
                         f"`python -m pipeline run --resume --output {url}`, then update it")
    raise UsageError(f"{url} holds no finished output to update: make one with `python -m pipeline run --output {url}`")


def previous_output(fs, out: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The output's rows (path, identity, and the part file holding them) and its errors table."""
    tables = []
    fs.invalidate_cache(out)  # an earlier update in this process may have listed an older version
    try:
        for path in sorted(fs.find(f"{out}/{sink.IMAGES}")):
            table = sink.read_parquet(fs, path, columns=["path", "identity"]).to_pandas()
            tables.append(table.assign(part=path.rsplit("/", 1)[1]))
        errors = sink.read_parquet(fs, f"{out}/{sink.ERRORS}", columns=sink.ERROR_COLUMNS).to_pandas()
    except (KeyError, pa.ArrowInvalid):  # no identity column: an output of an earlier version
        raise UsageError(f"{fs.unstrip_protocol(out)} was written by an earlier version of the pipeline, without image "
                         "identities: make it again with `python -m pipeline run --overwrite`") from None
    rows = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["path", "identity", "part"])
    return rows, errors


def compare(listing: pd.DataFrame, rows: pd.DataFrame, errors: pd.DataFrame) -> Changes:
    """What changed between the output and the listing, by path and identity.

    An image is redone when it is new, when its identity changed (replaced under the same name),
    or when it could not be read last time (a transient failure, perhaps); one that failed to
    decode stays an error until it changes.
    """
    known = dict(zip(rows.path, rows.identity))
    failed = {path: (identity, stage) for path, identity, stage in zip(errors.path, errors.identity, errors.stage)}
    last_seen = {path: identity for path, (identity, _) in failed.items()} | known  # identity at the last version
    redo = [
        path not in last_seen or last_seen[path] != identity or failed.get(path, (None, "decode"))[1] != "decode"
        for path, identity in zip(listing.path, listing.identity)
    ]
    todo = listing[redo]
    seen_before = todo.path.isin(last_seen.keys())
    gone = set(last_seen) - set(listing.path)
    drop = frozenset(gone | set(todo.path[seen_before]))
    return Changes(
        featurize=todo,
        drop=drop,
        kept_errors=errors[~errors.path.isin(drop)],
        added=int((~seen_before).sum()),
        replaced=sum(last_seen[path] != identity for path, identity in zip(todo.path[seen_before], todo.identity[seen_before])),
        removed=len(gone),
    )


def updated_pca(fs, out: str, staged: list[dict], width: int, s: Settings, progress: bool) -> reduce.Pca:
    """The output's PCA, fitted further with the staged new features; saved into the staging area."""
    pca = reduce.Pca.load(fs, f"{out}/{sink.PCA}")
    staged = [part for part in staged if part["rows"]]
    if staged:
        features = reduce.staged_matrix(fs, [p["staged"] for p in staged], [p["rows"] for p in staged], width)
        with job.progress_bar("pca", len(features), progress) as bar:
            pca = reduce.update(pca, features, s.n_components, s.pca_batch_size, bar.update)
    pca.save(fs, f"{out}/{sink.STAGING}/{sink.PCA}")
    return pca


def partitions(out: str, old_rows: pd.DataFrame, changes: Changes, staged: list[dict], size: int) -> list[sink.OutputPart]:
    """The parts of the new images.parquet/, rows sorted by path across them as after a full run.

    Each part of the previous output keeps its range of paths and takes the new rows that sort
    into it; a range given more than `size` new rows is cut at new paths, so no part grows
    beyond its own rows and `size` more.
    """
    new_paths = list(changes.featurize.path)  # sorted, in the order the staged partitions hold them
    spans = [(new_paths[i], new_paths[min(i + size, len(new_paths)) - 1], part["staged"])
             for i, part in zip(range(0, len(new_paths), size), staged) if part["rows"]]
    firsts = sorted(old_rows.groupby("part").path.min().items(), key=lambda item: item[1])  # (part, first path)
    old = [(f"{out}/{sink.IMAGES}/{name}", low if i else None, firsts[i + 1][1] if i + 1 < len(firsts) else None)
           for i, (name, low) in enumerate(firsts)] or [(None, None, None)]
    ranges = []
    for previous, low, high in old:
        inside = [p for p in new_paths if (low is None or p >= low) and (high is None or p < high)]
        cuts = [low, *inside[size::size], high]
        ranges += [(previous, a, b) for a, b in zip(cuts, cuts[1:])]
    parts = []
    for previous, low, high in ranges:
        staged_here = tuple(path for first, last, path in spans if (high is None or first < high) and (low is None or last >= low))
        if previous or staged_here:
            parts.append(sink.OutputPart(sink.part_name(len(parts)), staged_here, previous, changes.drop, low, high))
    return parts
