"""Incremental update: bring a finished output up to date with its input, featurizing only what changed.

`python -m pipeline update` lists the input again and compares it with the output, path by path
and identity by identity (ETag, or size and mtime): new and replaced images are featurized,
deleted ones dropped. An inventory, a listing file or a prefix listed by the workers is written as
partitions by them and compared here one stretch of paths at a time (`compare_listed`). The PCA goes
on fitting with the new features alone (reduce.update), every row is projected again with it
(features are stored: this reads and writes, but computes little), and the new version is committed
like a run: the old one stays whole until the new manifest.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

import cluster

from . import featurize, job, listings, reduce, sink
from .. import config, source
from ..config import Settings, UsageError
from ..output import RESUME_KEYS, Output

FINAL_ERRORS = pa.array(["decode", "segment"])  # errors that stay until the image changes (others are tried again)
STRETCH = 65_536  # old rows compared at a time with the listing's paths in their range (compare_listed)
KEPT_SETTINGS = (*(key for key in RESUME_KEYS if key not in ("input", "input_prefix")), "n_components")  # the output's


@dataclasses.dataclass(frozen=True)
class OldPart:
    """A part file of the last version, as an update sees it: where its paths start, which go, how many stay."""

    name: str
    first: str
    dropped: frozenset
    kept: int


@dataclasses.dataclass(frozen=True)
class Changes:
    """What an update does: the listing rows to featurize, the old paths to drop, the old errors to keep."""

    featurize: pd.DataFrame  # path, label, split, identity: new, replaced, or failed to read last time
    drop: frozenset  # paths whose old row or error goes: deleted, replaced or redone
    kept_errors: pd.DataFrame
    parts: list[OldPart]  # the last version's part files, in path order
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
    if input is None and "***" in base["input"]:
        raise UsageError(f"{out.url} was made from {base['input']}, recorded without its credentials: give --input again")
    kept = {key: base["settings"][key] for key in KEPT_SETTINGS} | {"extensions": tuple(base["settings"]["extensions"])}
    prefix = settings.input_prefix if settings.input_prefix is not None else base["settings"].get("input_prefix")
    s = dataclasses.replace(settings, **kept, input=input or base["input"], input_prefix=prefix)
    if s.report:
        job.check_report_writable(s.report, s.storage_options)
    weights = featurize.Weights(base["weights"]["used"], base["weights"]["warning"])
    timings: dict[str, float] = {}

    with contextlib.ExitStack() as stack:
        if out.holds(sink.RUN):
            listing, _ = out.resume_plan(s, command="update")
            say(f"finishing the interrupted update of {out.url}")
        else:
            with job.stopwatch(timings, "list"):
                listing = listings.open_input(s)
            out.check_writable()
            out.save_plan(s, listing, weights, command="update", base=base["finished"])
        if isinstance(listing, listings.Spread):  # listed by the workers, compared here stretch by stretch
            with job.stopwatch(timings, "cluster start"):
                if client is None:
                    client = stack.enter_context(cluster.connect(s.cluster, s.local_cluster, say))
            with job.stopwatch(timings, "list"):
                size = config.partition_size(s.images_per_partition, listing.estimate)
                listed = listings.partitions(listing, client, out.fs, out.path, size, say)
            changes = compare_listed(out.fs, listed, out.parts(), out.errors())
            listed, listing = listed.images, source.Listing(listing.fs, listing.root, changes.featurize.reset_index(drop=True), listed.skipped)
        else:
            changes = compare(listing.rows, out.parts(), out.errors())
            listed, listing = len(listing.rows), dataclasses.replace(listing, rows=changes.featurize.reset_index(drop=True))  # the rest only featurizes these
        s = dataclasses.replace(s, images_per_partition=config.partition_size(s.images_per_partition, listed))
        say(f"{listed} images under {s.input}: {changes.added} new, {changes.replaced} replaced, "
            f"{changes.removed} removed, {len(changes.featurize)} to featurize")
        if changes.nothing:
            sink.remove(out.fs, out.path, sink.STAGING)
            say(f"{out.url} is up to date")
            return base

        done = job.featurize_fit_write(
            s, out, listing, weights, lambda client: UpdateFit(out, s, progress),
            lambda staged, listed: (partitions(out.path, changes, staged, s.images_per_partition),
                                    sum(part.kept for part in changes.parts) + sum(p["rows"] for p in staged)),
            kept_errors=changes.kept_errors.to_dict("records"), say=say, progress=progress, client=client, timings=timings,
        )
    featurized = sum(part["images"] for part in done.staged)
    manifest = job.manifest_of(s, out, started, listed, listing.skipped, weights, done, timings, featurized,
                               tuple(base["model"].get("devices", [])))
    manifest = base | manifest | {"weights": base["weights"]}
    manifest["history"] = base.get("history", []) + [job.history_entry(
        "update", s, manifest, listed=listed, added=changes.added, replaced=changes.replaced, removed=changes.removed,
        featurized=featurized, failed=len(done.errors) - len(changes.kept_errors))]
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


def compare(listing: pd.DataFrame, parts: Iterable[tuple[str, pa.Table]], errors: pd.DataFrame) -> Changes:
    """What changed between the last version and the listing, by path and identity, in whole Arrow columns.

    `parts`: the last version's part files one after another (name, and its path and identity
    columns), each looked up in its own stretch of the sorted listing, so that the old rows are
    never all held: at a million images this holds some 12 MB above the listing, where the rows and
    a hash table of all their paths held 170. An image is redone when it is new, when its identity
    changed (replaced under the same name), or when it could not be read last time (a transient
    failure, perhaps); one that failed to decode (or in which preprocess found no fruit) stays an error until it changes. Where a path is both a row and an error, the row decides.
    """
    listed, identities = strings(listing.path), strings(listing.identity)
    in_rows, changed = np.zeros(len(listed), bool), np.zeros(len(listed), bool)
    old, gone = [], set()
    for name, table in parts:
        if len(table):
            part, positions, replaced, deleted = compare_part(name, table, listed, identities)
            old.append(part)
            in_rows[positions] = True
            changed[positions[replaced]] = True
            gone.update(deleted)
    at = pc.index_in(listed, value_set=strings(errors.path))  # each listed path's error, or null (errors are few)
    as_error = pc.is_valid(at).to_numpy() & ~in_rows
    changed |= pc.fill_null(pc.not_equal(identities, strings(errors.identity).take(at)), True).to_numpy() & as_error
    retried = pc.fill_null(pc.invert(pc.is_in(strings(errors.stage).take(at), value_set=FINAL_ERRORS)), False).to_numpy() & as_error
    new = ~in_rows & ~as_error
    gone |= unlisted(strings(errors.path), at, listed)
    drop = frozenset(gone) | frozenset(listed.filter(changed | retried).to_pylist())
    return Changes(
        featurize=listing[new | changed | retried],
        drop=drop,
        kept_errors=errors[~errors.path.isin(drop)],
        parts=sorted(old, key=lambda part: part.first),
        added=int(new.sum()),
        replaced=int(changed.sum()),
        removed=len(gone),
    )


def compare_listed(fs, listed: listings.Partitions, parts: Iterable[tuple[str, pa.Table]], errors: pd.DataFrame,
                   stretch: int = STRETCH) -> Changes:
    """compare() of a listing the workers wrote as partitions in path order, one stretch of paths at a time: the
    stretch from an old part's first path to that of the part some STRETCH rows on, read partition by partition.
    The client holds a stretch of the listing, its old parts and what changed, never the whole listing."""
    rows = stretches(fs, listed)
    next(rows)
    old = ((name, table) for name, table in parts if len(table))
    following = next(old, None)
    done, low = [], None
    while True:
        here = []  # old parts of some `stretch` rows, and the stretch of paths up to the next one's first
        while following is not None and (not here or sum(len(table) for _, table in here) < stretch):
            here.append(following)
            following = next(old, None)
        high = following[1]["path"][0].as_py() if following is not None else None
        inside = np.ones(len(errors), bool)
        if low is not None:
            inside &= (errors.path >= low).to_numpy(dtype=bool, na_value=False)
        if high is not None:
            inside &= (errors.path < high).to_numpy(dtype=bool, na_value=False)
        done.append(compare(rows.send(high), here, errors[inside]))
        if following is None:
            break
        low = high
    return Changes(
        featurize=pd.concat([c.featurize for c in done], ignore_index=True),
        drop=frozenset().union(*(c.drop for c in done)),
        kept_errors=pd.concat([c.kept_errors for c in done], ignore_index=True),
        parts=[part for c in done for part in c.parts],
        added=sum(c.added for c in done), replaced=sum(c.replaced for c in done), removed=sum(c.removed for c in done),
    )


def stretches(fs, listed: listings.Partitions) -> Iterator[pd.DataFrame]:
    """A generator sent a path (None: the end) that answers the listing's rows before it, read partition by partition
    (in Arrow strings, as compare takes them)."""
    partitions, held = iter(listed.parts), []
    high = yield None
    while True:
        while not held or high is None or held[-1]["path"][-1].as_py() < high:
            part = next(partitions, None)
            if part is None:
                break
            start, end = part[1]
            held.append(pa.ipc.open_stream(fs.cat_file(part[0], start=start, end=end)).read_all())
        rows = pa.concat_tables(held).combine_chunks() if held else pa.table({name: pa.array([], pa.string()) for name in listings.LISTING_COLUMNS})
        cut = len(rows) if high is None else pc.sum(pc.less(rows["path"], high)).as_py() or 0
        held = [rows.slice(cut)] if cut < len(rows) else []
        high = yield rows.slice(0, cut).to_pandas(types_mapper=pd.ArrowDtype)


def compare_part(name: str, table: pa.Table, listed: pa.ChunkedArray, identities: pa.ChunkedArray):
    """One old part against the stretch of the listing between its first and last path: the part as an update
    sees it, the listing positions of its rows still listed, which of those were replaced, and its deleted paths.

    Paths the listing has out of that stretch (were it not sorted as source.list_images sorts) would
    be taken as deleted and listed anew: redone, not lost.
    """
    paths = table["path"]
    low, high = (value.as_py() for value in pc.min_max(paths).values())
    sorted_listed = Sorted(listed)
    lo, hi = bisect.bisect_left(sorted_listed, low), bisect.bisect_right(sorted_listed, high)
    at = pc.index_in(paths, value_set=listed.slice(lo, hi - lo))
    found = pc.is_valid(at)
    positions = at.drop_null().to_numpy().astype(np.int64) + lo
    replaced = pc.fill_null(pc.not_equal(table["identity"].filter(found), identities.take(positions)), True)
    deleted = paths.filter(pc.invert(found)).to_pylist()
    dropped = frozenset(deleted) | frozenset(paths.filter(found).filter(replaced).to_pylist())
    return OldPart(name, low, dropped, len(table) - len(dropped)), positions, replaced.to_numpy(), deleted


class Sorted:
    """A sorted Arrow string column as `bisect` reads it: one value at a time, never converted whole."""

    def __init__(self, column: pa.ChunkedArray):
        self.column = column

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, index: int) -> str:
        return self.column[index].as_py()


def unlisted(last: pa.ChunkedArray, at: pa.ChunkedArray, listed: pa.ChunkedArray) -> frozenset:
    """The paths of `last` (the old errors) that are not listed: those that no listed path found (`at`), but
    for a second entry of a listed path, found among these few rather than in a hash table of every listed path."""
    found = np.zeros(len(last), bool)
    found[at.drop_null().to_numpy()] = True
    candidates = last.filter(~found)
    return frozenset(candidates.to_pylist()) - frozenset(listed.filter(pc.is_in(listed, value_set=candidates)).to_pylist())


def strings(column: pd.Series) -> pa.ChunkedArray:
    """A column as Arrow strings, not copied when it is Arrow already (NaN and NA become null)."""
    array = pa.array(column, from_pandas=True)
    return (array if isinstance(array, pa.ChunkedArray) else pa.chunked_array([array])).cast(pa.string())


def partitions(out: str, changes: Changes, staged: list[dict], size: int, table: str = sink.IMAGES) -> list[sink.OutputPart]:
    """The parts of the new images.parquet/, rows sorted by path across them as after a full run.

    Each part of the previous output keeps its range of paths and takes the new rows that sort
    into it; a range given more than `size` new rows is cut at new paths, so no part grows
    beyond its own rows and `size` more. Each part is told only its own paths to drop.
    """
    new_paths = list(changes.featurize.path)  # sorted, in the order the staged partitions hold them
    spans = [(new_paths[i], new_paths[min(i + size, len(new_paths)) - 1], part["staged"])
             for i, part in zip(range(0, len(new_paths), size), staged) if part["rows"]]
    span_firsts, span_lasts = [first for first, _, _ in spans], [last for _, last, _ in spans]
    firsts = changes.parts  # in path order
    old = [(part.name, part.first if i else None, firsts[i + 1].first if i + 1 < len(firsts) else None)
           for i, part in enumerate(firsts)] or [(None, None, None)]
    dropped = {part.name: part.dropped for part in firsts}
    parts = []
    for name, low, high in old:
        inside = new_paths[position(new_paths, low, 0) : position(new_paths, high, len(new_paths))]
        cuts = [low, *inside[size::size], high]
        for a, b in zip(cuts, cuts[1:]):
            staged_here = tuple(path for _, _, path in spans[position(span_lasts, a, 0) : position(span_firsts, b, len(spans))])
            if name or staged_here:
                previous = f"{out}/{table}/{name}" if name else None
                parts.append(sink.OutputPart(sink.part_name(len(parts)), staged_here, previous, dropped.get(name, frozenset()), a, b))
    return parts


def position(sorted_paths: list[str], path: str | None, otherwise: int) -> int:
    """Where `path` would sort into `sorted_paths` (before its equals); `otherwise` for None, an open end."""
    return otherwise if path is None else bisect.bisect_left(sorted_paths, path)
