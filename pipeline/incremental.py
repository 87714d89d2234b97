"""Incremental update: bring a finished output up to date with its input, featurizing only what changed.

`python -m pipeline update` lists the input again and compares it with the output, path by path
and identity by identity (ETag, or size and mtime): new and replaced images are featurized,
deleted ones dropped. The PCA goes on fitting with the new features alone (reduce.update), every
row is projected again with it (features are stored: this reads and writes, but computes little),
and the new version is committed like a run: the old one stays whole until the new manifest.
"""
from __future__ import annotations

import bisect
import dataclasses
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

import cluster

from . import featurize, job, reduce, sink, source
from .config import Settings
from .output import RESUME_KEYS, Output

KEPT_SETTINGS = (*(key for key in RESUME_KEYS if key != "input"), "n_components", "pca_batch_size")  # the output's


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
    gpu, backend, storage options, report). An interrupted update is finished by running it again.
    Returns the new manifest, or the old one when nothing changed.
    """
    cluster.check_reachable(settings.cluster)
    started = datetime.now(timezone.utc)
    out = Output.at(settings.output, settings.storage_options)
    base = out.manifest()
    kept = {key: base["settings"][key] for key in KEPT_SETTINGS} | {"extensions": tuple(base["settings"]["extensions"])}
    s = dataclasses.replace(settings, **kept, input=input or base["input"])
    if s.report:
        job.check_report_writable(s.report, s.storage_options)
    weights = featurize.Weights(base["weights"]["used"], base["weights"]["warning"])
    timings: dict[str, float] = {}

    if out.holds(sink.RUN):
        listing, _ = out.resume_plan(s, command="update")
        say(f"finishing the interrupted update of {out.url}")
    else:
        with job.stopwatch(timings, "list"):
            listing = source.list_images(s.input, s.storage_options, s.extensions)
        out.check_writable()
        out.save_plan(s, listing, weights, command="update", base=base["finished"])
    old_rows, old_errors = out.rows_and_errors()
    changes = compare(listing.rows, old_rows, old_errors)
    say(f"{len(listing.rows)} images under {s.input}: {changes.added} new, {changes.replaced} replaced, "
        f"{changes.removed} removed, {len(changes.featurize)} to featurize")
    if changes.nothing:
        sink.remove(out.fs, out.path, sink.STAGING)
        say(f"{out.url} is up to date")
        return base

    new = source.Listing(listing.fs, listing.root, changes.featurize.reset_index(drop=True), listing.skipped)
    kept_rows = len(old_rows) - int(old_rows.path.isin(changes.drop).sum())
    done = job.featurize_fit_write(
        s, out, new, weights, lambda client: UpdateFit(out, s, progress),
        lambda staged: (partitions(out.path, old_rows, changes, staged, s.images_per_partition),
                        kept_rows + sum(p["rows"] for p in staged)),
        kept_errors=changes.kept_errors.to_dict("records"), say=say, progress=progress, client=client, timings=timings,
    )
    featurized = sum(part["images"] for part in done.staged)
    manifest = job.manifest_of(s, out, started, listing, weights, done, timings, featurized, tuple(base["model"].get("devices", [])))
    manifest = base | manifest | {"weights": base["weights"]}
    manifest["history"] = base.get("history", []) + [
        {"command": "update", "input": s.input, "started": manifest["started"], "finished": manifest["finished"],
         "listed": len(listing.rows), "added": changes.added, "replaced": changes.replaced, "removed": changes.removed,
         "featurized": featurized, "failed": len(done.errors) - len(changes.kept_errors)}]
    out.commit(manifest)
    return manifest


class UpdateFit:
    """An update's PCA: the output's own, fitted further (IncrementalPCA.partial_fit) with the new rows alone."""

    stage = "pca update"

    def __init__(self, out: Output, s: Settings, progress: bool):
        self.out, self.s, self.progress = out, s, progress

    def add(self, index: int, path: str) -> None:
        """Nothing to do as partitions are staged: the new rows are fitted once all are."""

    def pca(self, staged: list[dict]) -> reduce.Pca:
        pca = reduce.Pca.load(self.out.fs, self.out / sink.PCA)
        staged = [part for part in staged if part["rows"]]
        if staged:
            width = featurize.model_spec(self.s.model).n_features
            features = reduce.staged_matrix(self.out.fs, [p["staged"] for p in staged], [p["rows"] for p in staged], width)
            with job.progress_bar("pca", len(features), self.progress) as bar:
                pca = reduce.update(pca, features, self.s.n_components, self.s.pca_batch_size, bar.update)
        return pca


def compare(listing: pd.DataFrame, rows: pd.DataFrame, errors: pd.DataFrame) -> Changes:
    """What changed between the output and the listing, by path and identity, in whole Arrow columns.

    An image is redone when it is new, when its identity changed (replaced under the same name),
    or when it could not be read last time (a transient failure, perhaps); one that failed to
    decode stays an error until it changes. One hash lookup of paths, not a merge: at a million
    images it holds some 100 MB more than its inputs, where a pandas merge held 500.
    """
    listed = strings(listing.path)
    last = pa.concat_tables([  # a row first: where a path is both a row and an error, the row outweighs the error
        pa.table({"path": strings(rows.path), "identity": strings(rows.identity), "stage": pa.nulls(len(rows), pa.string())}),
        pa.table({name: strings(errors[name]) for name in ("path", "identity", "stage")}),
    ])
    at = pc.index_in(listed, value_set=last["path"])  # each listed path's place in the last version, or null: new
    new = pc.is_null(at)
    changed = pc.and_not(pc.fill_null(pc.not_equal(strings(listing.identity), last["identity"].take(at)), True), new)
    retried = pc.fill_null(pc.not_equal(last["stage"].take(at), "decode"), False)
    redo = pc.or_(new, pc.or_(changed, retried))
    gone = unlisted(last["path"], at, listed)
    drop = gone | frozenset(listed.filter(pc.and_not(redo, new)).to_pylist())
    return Changes(
        featurize=listing[np.asarray(redo)],
        drop=drop,
        kept_errors=errors[~errors.path.isin(drop)],
        added=pc.sum(new).as_py() or 0,
        replaced=pc.sum(changed).as_py() or 0,
        removed=len(gone),
    )


def unlisted(last: pa.ChunkedArray, at: pa.ChunkedArray, listed: pa.ChunkedArray) -> frozenset:
    """The paths of the last version that are not listed: those that no listed path found (`at`), but for a
    second entry of a listed path (its error beside its row), found among these few rather than in a
    second hash table of every listed path."""
    found = np.zeros(len(last), bool)
    found[at.drop_null().to_numpy()] = True
    candidates = last.filter(~found)
    return frozenset(candidates.to_pylist()) - frozenset(listed.filter(pc.is_in(listed, value_set=candidates)).to_pylist())


def strings(column: pd.Series) -> pa.ChunkedArray:
    """A column as Arrow strings, not copied when it is Arrow already (NaN and NA become null)."""
    array = pa.array(column, from_pandas=True)
    return (array if isinstance(array, pa.ChunkedArray) else pa.chunked_array([array])).cast(pa.string())


def partitions(out: str, old_rows: pd.DataFrame, changes: Changes, staged: list[dict], size: int) -> list[sink.OutputPart]:
    """The parts of the new images.parquet/, rows sorted by path across them as after a full run.

    Each part of the previous output keeps its range of paths and takes the new rows that sort
    into it; a range given more than `size` new rows is cut at new paths, so no part grows
    beyond its own rows and `size` more. Each part is told only its own paths to drop.
    """
    new_paths = list(changes.featurize.path)  # sorted, in the order the staged partitions hold them
    spans = [(new_paths[i], new_paths[min(i + size, len(new_paths)) - 1], part["staged"])
             for i, part in zip(range(0, len(new_paths), size), staged) if part["rows"]]
    span_firsts, span_lasts = [first for first, _, _ in spans], [last for _, last, _ in spans]
    firsts = sorted(old_rows.groupby("part", observed=True).path.min().items(), key=lambda item: item[1])  # (part, first path)
    dropped = {name: frozenset(paths) for name, paths in old_rows[old_rows.path.isin(changes.drop)].groupby("part", observed=True).path}
    old = [(name, low if i else None, firsts[i + 1][1] if i + 1 < len(firsts) else None)
           for i, (name, low) in enumerate(firsts)] or [(None, None, None)]
    parts = []
    for name, low, high in old:
        inside = new_paths[position(new_paths, low, 0) : position(new_paths, high, len(new_paths))]
        cuts = [low, *inside[size::size], high]
        for a, b in zip(cuts, cuts[1:]):
            staged_here = tuple(path for _, _, path in spans[position(span_lasts, a, 0) : position(span_firsts, b, len(spans))])
            if name or staged_here:
                previous = f"{out}/{sink.IMAGES}/{name}" if name else None
                parts.append(sink.OutputPart(sink.part_name(len(parts)), staged_here, previous, dropped.get(name, frozenset()), a, b))
    return parts


def position(sorted_paths: list[str], path: str | None, otherwise: int) -> int:
    """Where `path` would sort into `sorted_paths` (before its equals); `otherwise` for None, an open end."""
    return otherwise if path is None else bisect.bisect_left(sorted_paths, path)
