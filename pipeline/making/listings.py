"""Listings the workers read: an S3 Inventory (its manifest.json) or a listing file (Parquet or CSV of paths).

The client reads only the manifest (or the listing file's footer) and hands each worker a few data
files; the worker keeps the images under the prefix with the extensions asked for, sorts them by
path and writes them as partitions (sink.write_partitions) to `_staging/partitions/NNNNN.arrow`.
The client gets back byte ranges, counts and each group's first and last path: never the keys.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import posixpath
import time
import urllib.parse
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.spec import AbstractFileSystem

from . import sink
from .. import source
from ..config import UsageError

# The inventory's fields an image needs, in the names of its ORC and Parquet files; its CSV files have no
# header: their columns are named in the manifest's fileSchema ("Bucket, Key, Size, ...").
FIELDS = {"Bucket": "bucket", "Key": "key", "IsLatest": "is_latest", "IsDeleteMarker": "is_delete_marker",
          "Size": "size", "LastModifiedDate": "last_modified_date", "ETag": "e_tag"}
LISTING_COLUMNS = ("path", "label", "split", "identity")  # a listing file's: path required, the others optional
FORMATS = {".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv", ".tsv": "csv"}


@dataclasses.dataclass(frozen=True)
class DataFile:
    """One data file of a listing, or some of its row groups (a Parquet file is split between workers)."""

    path: str
    format: str  # csv, parquet or orc
    columns: tuple[str, ...] | None = None  # a headerless CSV's column names (the inventory's fileSchema)
    row_groups: tuple[int, ...] | None = None  # None: the whole file
    bytes: int = 0


@dataclasses.dataclass(frozen=True)
class KeyRange:
    """Some of a prefix's objects, listed by one worker: a folder of it ("" its top) with everything under it, or
    only the top's own files; on S3 also only the keys after `after` up to `upto` (a flat prefix split by StartAfter)."""

    folder: str
    recursive: bool = True
    after: str | None = None
    upto: str | None = None
    bytes = 0


@dataclasses.dataclass(frozen=True)
class Partitions:
    """What was listed: each partition's file, byte range and images, the files skipped, and the output's parts.

    `outputs` gives the output's parts in path order: a partition's index (the part is that partition), or
    [indices, low, high] (the rows of those partitions with paths in [low, high): where data files share paths).
    None: every partition in turn, in its own order.
    """

    parts: list[tuple[str, tuple[int, int], int]]
    skipped: int
    outputs: list | None = None

    @property
    def images(self) -> int:
        return sum(n for _, _, n in self.parts)

    def output_parts(self) -> Iterator[tuple[list[int], str | None, str | None]]:
        """The output's parts in path order: the partitions each takes its rows from, and its range of paths."""
        for part in self.outputs if self.outputs is not None else range(len(self.parts)):
            yield ([part], None, None) if isinstance(part, int) else tuple(part)


@dataclasses.dataclass(frozen=True)
class Spread:
    """A listing read by the workers, data file by data file: the images' filesystem and root (a bucket, or
    the listing file's folder, and the prefix), and the data files with their own filesystem."""

    fs: AbstractFileSystem
    root: str
    files_fs: AbstractFileSystem
    files: tuple[DataFile, ...]
    kind: str  # "inventory" or "listing file"
    prefix: str  # only keys under it, given relative to it (as a listed prefix gives them)
    extensions: tuple[str, ...]
    version: str  # the manifest's or listing file's identity: --resume refuses another
    estimate: int = 0  # about how many keys, before reading them (what `images-per-partition: auto` grows with)

    skipped = 0  # known once listed: Partitions.skipped

    def partitions(self, client, out_fs, out: str, size: int, say=lambda message: None) -> Partitions:
        """List on the workers, `size` images a partition; data files whose paths overlap are sorted together."""
        groups = [[f] for f in self.files]
        while True:
            bare = dataclasses.replace(self, files=())  # each task is sent its own data files only
            futures = [client.submit(list_group, bare, group, out_fs, f"{out}/{sink.STAGING}/partitions/{i:05d}.arrow", size,
                                     key=f"list-{i}-{len(groups)}-{client.id}", pure=False)
                       for i, group in enumerate(groups)]
            listed = client.gather(futures)
            del futures
            order = sorted(range(len(groups)), key=lambda i: listed[i]["first"] or "")
            merged = overlapping([listed[i] for i in order], [groups[i] for i in order])
            if len(merged) == len(groups):
                break
            say(f"{len(groups) - len(merged)} of the listing's data files share paths with another: sorting them together")
            groups = merged
        kept = [listed[i] for i in order if listed[i]["images"]]
        parts = [(group["path"], tuple(byte_range), n) for group in kept for byte_range, n in zip(group["ranges"], group["counts"])]
        return Partitions(parts, sum(group["skipped"] for group in listed))


MIN_FOLDERS = 16  # `list-on: auto` lists a prefix on the workers from this many folders at its first level
RANGES = 64  # key ranges of a flat prefix listed on the workers


def overlapping(listed: list[dict], groups: list[list[DataFile]]) -> list[list[DataFile]]:
    """The groups (sorted by first path) merged where a group's paths start before the previous one's end."""
    merged, last = [], None
    for result, group in zip(listed, groups):
        if merged and result["images"] and last is not None and result["first"] <= last:
            merged[-1] = merged[-1] + group
        else:
            merged.append(list(group))
        if result["images"]:
            last = max(last or "", result["last"])
    return merged


def open_input(s, say=lambda message: None) -> "source.Listing | Spread":
    """The images of the settings' input: a folder or prefix listed here, or an inventory or listing file the
    workers will read."""
    if is_listing(s.input):
        return open_listing(s.input, s.storage_options, s.extensions, s.input_prefix)
    if s.input_prefix:
        raise UsageError(f"`input-prefix` {s.input_prefix!r} is for an inventory's manifest.json or a listing file: "
                         f"give the prefix in --input instead ({s.input.rstrip('/')}/{s.input_prefix.strip('/')})")
    if s.list_on != "client":
        spread = open_prefix(s.input, s.storage_options, s.extensions, MIN_FOLDERS if s.list_on == "auto" else 0)
        if spread is not None:
            return spread
    return source.list_images(s.input, s.storage_options, s.extensions)


def partitions(listing: "source.Listing | Spread", client, out_fs, out: str, size: int, say=lambda message: None) -> Partitions:
    """Write the listing's partitions, `size` images each, in path order: the client's rows here, a Spread's on the
    workers (data files that share paths sorted together). `plan` is what a run uses: it need not wait for them all."""
    if isinstance(listing, Spread):
        sink.make_folder(out_fs, f"{out}/{sink.STAGING}/partitions")
        return listing.partitions(client, out_fs, out, size, say)
    return written_here(listing, out_fs, out, size)


def written_here(listing: "source.Listing", out_fs, out: str, size: int) -> Partitions:
    """The client's own listing written as partitions, `size` rows each (sink.write_partitions)."""
    path, n = f"{out}/{sink.PARTITIONS}", len(listing.rows)
    ranges = sink.write_partitions(out_fs, path, listing.rows, size)
    return Partitions([(path, byte_range, min(size, n - i * size)) for i, byte_range in enumerate(ranges)], listing.skipped)


def plan(listing: "source.Listing | Spread", client, out_fs, out: str, size: int, say=lambda message: None) -> "Plan":
    """The partitions to featurize, `size` images each, as they become known: a listing made here (or saved by an
    interrupted command) all at once; a Spread's data file by data file, as the workers list them."""
    if not isinstance(listing, Spread):
        return Plan(written_here(listing, out_fs, out, size))
    saved = f"{out}/{sink.STAGING}/partitions.json"
    if out_fs.exists(saved):  # an interrupted command's: its staged partitions are these
        listed = sink.read_json(out_fs, saved)
        return Plan(Partitions([(path, tuple(byte_range), n) for path, byte_range, n in listed["parts"]], listed["skipped"],
                               listed.get("outputs")))
    sink.make_folder(out_fs, f"{out}/{sink.STAGING}/partitions")
    return Plan(None, Listers(listing, client, out_fs, out, size, saved, say))


class Plan:
    """Partitions handed on in order as they are known (`ready`): every one at once, or those of each data file
    once it and every data file before it are listed, while the workers list the others (`pending`)."""

    def __init__(self, listed: Partitions | None, listers: "Listers | None" = None):
        self.listers, self.listed = listers, listed
        self.ready = collections.deque()  # (index, file, byte range, images) not yet taken
        self.pending = listers.futures if listers else []
        if listers is not None and listers.done:  # no data file at all
            listed = self.listed = listers.finish()
        if listed is not None:
            self.ready.extend((i, *part) for i, part in enumerate(listed.parts))

    @property
    def estimate(self) -> int:
        return self.listed.images if self.listed is not None else self.listers.estimate

    def add(self, future, result: dict) -> bool:
        """A data file listed by a worker: its partitions (and any that waited for it) join `ready`; True once every
        data file is listed (then `listed` is complete, saved for --resume)."""
        self.ready.extend(self.listers.add(future, result))
        if self.listers.done:
            self.listed = self.listers.finish()
        return self.listed is not None


class Listers:
    """A Spread's data files listed by the workers, a task each, at a lower priority than featurizing: a worker
    lists a data file when it has no partition to featurize. A data file's partitions are numbered on from those
    of the data files before it (so that a rerun numbers them alike, for --resume); the output's parts follow the
    data files' first paths, and where data files share paths, the rows of theirs are cut into ranges of paths."""

    def __init__(self, spread: Spread, client, out_fs, out: str, size: int, saved: str, say):
        bare = dataclasses.replace(spread, files=())  # each task is sent its own data file only
        self.client, self.out_fs, self.saved, self.size, self.say = client, out_fs, saved, size, say
        self.futures = [client.submit(list_group, bare, [data_file], out_fs, f"{out}/{sink.STAGING}/partitions/{i:05d}.arrow", size,
                                      key=f"list-{i}-{client.id}", pure=False, priority=-1)
                        for i, data_file in enumerate(spread.files)]
        self.at = {future.key: i for i, future in enumerate(self.futures)}
        self.results: list[dict | None] = [None] * len(self.futures)
        self.next = 0  # the first data file whose partitions are not yet handed on
        self.parts: list[tuple[str, tuple[int, int], int]] = []
        self.estimate, self.started = spread.estimate, time.perf_counter()

    @property
    def done(self) -> bool:
        return self.next == len(self.results)

    def add(self, future, result: dict) -> list[tuple[int, str, tuple[int, int], int]]:
        """A data file's listing: the partitions now handed on (its own and later ones', if it was the next)."""
        self.results[self.at.pop(future.key)] = result
        ready = []
        while self.next < len(self.results) and self.results[self.next] is not None:
            listed, start = self.results[self.next], len(self.parts)
            for byte_range, n in zip(listed.pop("ranges"), listed.pop("counts")):
                ready.append((len(self.parts), listed["path"], tuple(byte_range), n))
                self.parts.append(ready[-1][1:])
            listed["indices"] = range(start, len(self.parts))
            self.next += 1
        if ready and len(self.parts) == len(ready):
            others = len(self.results) - self.next
            self.say(f"first {len(ready)} partitions of up to {self.size} images listed in {time.perf_counter() - self.started:.1f} s "
                     f"({self.next} of {len(self.results)} data files)" + (f": featurized while the workers list the other {others}" if others else ""))
        return ready

    def finish(self) -> Partitions:
        """Every data file listed: the output's parts in path order, saved with the partitions for --resume."""
        order = sorted(((r["first"], r["last"], r["indices"]) for r in self.results if r["images"]), key=lambda g: g[0])
        outputs, last = [], None
        clusters = []  # runs of data files that share paths
        for first, end, indices in order:
            if clusters and last is not None and first <= last:
                clusters[-1].append(indices)
            else:
                clusters.append([indices])
            last = max(last or "", end)
        for cluster in clusters:
            if len(cluster) == 1:
                outputs.extend(cluster[0])
            else:
                outputs.extend(self.cut(cluster))
        listed = Partitions(self.parts, sum(r["skipped"] for r in self.results), outputs)
        sink.write_json(self.out_fs, self.saved, {"parts": listed.parts, "skipped": listed.skipped, "outputs": outputs})
        return listed

    def cut(self, cluster: list[range]) -> list[list]:
        """Output parts for data files that share paths: ranges of paths cut at each partition's first path, each
        taking the rows of the partitions that reach into it (the shared stretch of paths is read once a data file)."""
        indices = [i for indices in cluster for i in indices]
        self.say(f"{len(cluster)} of the listing's data files share paths: their {len(indices)} partitions are cut into ranges")
        bounds = self.client.gather([self.client.submit(partition_bounds, self.out_fs, *self.parts[i][:2], priority=1, pure=False)
                                     for i in indices])
        spans = sorted(zip(bounds, indices))  # ((first, last), index) by first path
        cuts = sorted({first for (first, _), _ in spans})
        outputs, active, at = [], [], 0
        for k, low in enumerate(cuts):
            high = cuts[k + 1] if k + 1 < len(cuts) else None
            while at < len(spans) and (high is None or spans[at][0][0] < high):
                active.append(spans[at])
                at += 1
            active = [span for span in active if span[0][1] >= low]
            outputs.append([sorted(index for _, index in active), low, high])
        return outputs


def partition_bounds(fs, path: str, byte_range: tuple[int, int]) -> tuple[str, str]:
    """On a worker: the first and last path of one partition."""
    paths = sink.partition_rows(fs, path, byte_range)["path"]
    return paths.iloc[0], paths.iloc[-1]


def gathered(spread: Spread) -> "source.Listing":
    """A Spread's whole listing read here, data file by data file (`update` no longer does: it compares the
    partitions the workers wrote, stretch by stretch; incremental.compare_listed)."""
    tables, skipped = [], 0
    for data_file in spread.files:
        table, others = select(read_data_file(spread, data_file), spread, encoded=is_encoded(spread, data_file))
        tables.append(table)
        skipped += others
    table = pa.concat_tables(tables).sort_by("path") if tables else select(empty(), spread)[0]
    if not len(table):
        raise UsageError(f"no images in the {spread.kind} {spread.files_fs.unstrip_protocol(spread.files[0].path) if spread.files else ''}"
                         f"{' under ' + spread.prefix if spread.prefix else ''}: {skipped} other files")
    rows = table.to_pandas(types_mapper=pd.ArrowDtype)
    return source.Listing(fs=spread.fs, root=spread.root, rows=rows, skipped=skipped)


def is_listing(url: str) -> bool:
    """True if `url` names an inventory's manifest.json or a listing file rather than a folder or prefix."""
    name = posixpath.basename(url.rstrip("/")).lower()
    return name == "manifest.json" or any(name.endswith(ext) for ext in FORMATS)


def open_listing(url: str, storage_options: dict, extensions: tuple[str, ...], prefix: str | None) -> Spread:
    """The Spread of an inventory's manifest.json or a listing file: reads the manifest or the Parquet footer only."""
    files_fs, path = source.open_url(url, storage_options)
    try:
        info = files_fs.info(path)
        version = source.identity(info)
        if posixpath.basename(path).lower() == "manifest.json":
            return inventory(files_fs, path, storage_options, extensions, prefix or "", version)
        return listing_file(files_fs, path, info, extensions, prefix or "", version)
    except (UsageError, FileNotFoundError):
        raise
    except Exception as error:  # each storage backend fails its own way (no credentials, no endpoint...)
        raise UsageError(f"cannot read the listing {url}: {type(error).__name__}: {error}") from None


def inventory(files_fs, path: str, storage_options: dict, extensions, prefix: str, version: str) -> Spread:
    """An S3 Inventory: the images are in its source bucket; its data files sit in its destination bucket, whose
    layout (destination-prefix/source-bucket/config-ID/data/…) is found from the manifest's own place."""
    manifest = json.loads(files_fs.cat_file(path))
    try:
        bucket, format, keys = manifest["sourceBucket"], manifest["fileFormat"].lower(), [f["key"] for f in manifest["files"]]
    except (KeyError, TypeError, AttributeError):
        raise UsageError(f"{path} is not an S3 Inventory manifest: it lacks sourceBucket, fileFormat or files") from None
    if format not in ("csv", "orc", "parquet"):
        raise UsageError(f"inventory format {manifest['fileFormat']!r} of {path}: CSV, ORC or Parquet expected")
    columns = None
    if format == "csv":
        columns = tuple(name.strip() for name in manifest.get("fileSchema", "").split(","))
        if "Key" not in columns:
            raise UsageError(f"{path}: the CSV inventory's fileSchema names no Key column")
    base = destination_root(path, keys)
    files = tuple(DataFile(f"{base}/{f['key']}" if base else f["key"], format, columns, bytes=int(f.get("size", 0)))
                  for f in manifest["files"])
    fs, root = source.open_url(f"s3://{bucket}", storage_options)
    prefix = prefix.strip("/")
    return Spread(fs, f"{root}/{prefix}" if prefix else root, files_fs, files, "inventory", prefix, extensions, version,
                  estimated(files_fs, files))


def destination_root(manifest_path: str, keys: list[str]) -> str:
    """Where the destination bucket's keys start on the manifest's filesystem: the manifest sits at
    <root>/<destination-prefix/source-bucket/config-ID>/<date>/manifest.json, its data files at
    <root>/<destination-prefix/source-bucket/config-ID>/data/<file>, so a copy of the bucket on a disk reads alike."""
    config = posixpath.dirname(posixpath.dirname(manifest_path))
    common = posixpath.dirname(posixpath.dirname(keys[0])) if keys else ""
    if common and (config == common or config.endswith(f"/{common}")):
        return config[: len(config) - len(common)].rstrip("/")
    raise UsageError(f"the inventory's data files ({keys[0] if keys else 'none'}) are not beside {manifest_path} "
                     "in S3 Inventory's layout: give the manifest.json where S3 delivered it, or a copy of that folder")


def listing_file(files_fs, path: str, info: dict, extensions, prefix: str, version: str) -> Spread:
    """A Parquet or CSV file of paths relative to its own folder (optional label, split and identity columns).
    A Parquet file is split between the workers by row groups, some 64 MB of them a task."""
    name = posixpath.basename(path).lower()
    format = next(FORMATS[ext] for ext in sorted(FORMATS, key=len, reverse=True) if name.endswith(ext))
    if format == "parquet":
        with files_fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        if "path" not in meta.schema.names:
            raise UsageError(f"the listing file {path} has no `path` column (columns: {', '.join(meta.schema.names)})")
        files = tuple(DataFile(path, format, row_groups=tuple(group), bytes=size) for group, size in row_group_runs(meta))
    else:
        files = (DataFile(path, format, bytes=int(info.get("size") or 0)),)
    folder = posixpath.dirname(path)
    prefix = prefix.strip("/")
    return Spread(files_fs, f"{folder}/{prefix}" if prefix else folder, files_fs, files, "listing file", prefix,
                  extensions, version, estimated(files_fs, files))


def estimated(files_fs, files: tuple[DataFile, ...], sample: int = 1 << 20) -> int:
    """About how many rows the data files hold, from their sizes and the rows of the first one's first MiB (a
    Parquet or ORC file's footer): one small read, where counting would read them all."""
    if not files or not files[0].bytes:
        return 0
    first = files[0]
    with files_fs.open(first.path, "rb") as f:
        if first.format == "parquet":
            meta = pq.ParquetFile(f).metadata
            groups = first.row_groups if first.row_groups is not None else range(meta.num_row_groups)
            rows, size = sum(meta.row_group(i).num_rows for i in groups), first.bytes
        elif first.format == "orc":
            from pyarrow import orc
            rows, size = orc.ORCFile(f).nrows, first.bytes
        else:
            head = f.read(sample)
            if first.path.endswith(".gz"):  # at most `sample` bytes of text: a MiB of keys may unzip to 20
                unzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
                text = unzip.decompress(head, sample)
                head = head[: len(head) - len(unzip.unconsumed_tail)]
            else:
                text = head
            rows, size = text.count(b"\n"), len(head)
    return int(rows / max(size, 1) * sum(f.bytes for f in files))


def row_group_runs(meta, target: int = 64 << 20) -> Iterator[tuple[list[int], int]]:
    """Consecutive row groups of a Parquet file, some `target` compressed bytes a run."""
    run, size = [], 0
    for i in range(meta.num_row_groups):
        run.append(i)
        size += meta.row_group(i).total_byte_size
        if size >= target:
            yield run, size
            run, size = [], 0
    if run or not meta.num_row_groups:
        yield run, size


# --- on a worker -------------------------------------------------------------------------------------


def list_group(spread: Spread, group: list[DataFile], out_fs, path: str, size: int) -> dict:
    """On a worker: read some data files, keep the images, sort them and write them as partitions to `path`."""
    tables, skipped = [], 0
    for data_file in group:
        table, others = select(read_data_file(spread, data_file), spread, encoded=is_encoded(spread, data_file))
        tables.append(table)
        skipped += others
    table = pa.concat_tables(tables) if tables else select(empty(), spread)[0]
    table = table.sort_by("path")
    ranges = sink.write_partitions(out_fs, path, table, size) if len(table) else []
    counts = [min(size, len(table) - i) for i in range(0, len(table), size)]
    first, last = (table["path"][0].as_py(), table["path"][-1].as_py()) if len(table) else (None, None)
    return {"path": path, "ranges": ranges, "counts": counts, "images": len(table), "skipped": skipped,
            "first": first, "last": last}


def is_encoded(spread: Spread, data_file: DataFile) -> bool:
    """S3 Inventory's CSV keys are URL-encoded (a space as '+', a '+' as %2B); its ORC and Parquet keys are not."""
    return spread.kind == "inventory" and data_file.format == "csv"


def empty() -> pa.Table:
    return pa.table({name: pa.array([], pa.string()) for name in ("path", "identity")})


def read_data_file(spread: Spread, data_file: DataFile) -> pa.Table:
    """One data file as (path, identity[, label, split]) strings: an inventory's key and ETag; a prefix's objects."""
    if isinstance(data_file, KeyRange):
        return objects(spread, data_file)
    with spread.files_fs.open(data_file.path, "rb") as f:
        if spread.kind == "inventory":
            return inventory_rows(read_table(f, data_file, set(FIELDS.values()) | set(FIELDS)), data_file)
        table = read_table(f, data_file, set(LISTING_COLUMNS))
    if "path" not in table.column_names:
        raise UsageError(f"the listing file {data_file.path} has no `path` column (columns: {', '.join(table.column_names)})")
    columns = {name: table[name].cast(pa.string()) for name in LISTING_COLUMNS if name in table.column_names}
    columns.setdefault("identity", pa.nulls(len(table), pa.string()))
    columns["identity"] = pc.fill_null(columns["identity"], "")  # none given: an image changes only with its path
    return pa.table(columns)


def read_table(f, data_file: DataFile, wanted: set[str]) -> pa.Table:
    """The wanted columns of a CSV (gzip or not), Parquet or ORC file, as they are there."""
    if data_file.format == "parquet":
        parquet = pq.ParquetFile(f)
        names = [n for n in parquet.schema_arrow.names if n in wanted]
        groups = data_file.row_groups
        return parquet.read_row_groups(groups, columns=names) if groups is not None else parquet.read(columns=names)
    if data_file.format == "orc":
        from pyarrow import orc
        reader = orc.ORCFile(f)
        return reader.read(columns=[n for n in reader.schema.names if n in wanted])
    stream = pa.PythonFile(f, mode="r")
    if data_file.path.endswith(".gz"):
        stream = pa.CompressedInputStream(stream, "gzip")
    names = list(data_file.columns) if data_file.columns else None
    return pacsv.read_csv(
        stream,
        read_options=pacsv.ReadOptions(column_names=names, block_size=8 << 20),
        parse_options=pacsv.ParseOptions(delimiter="\t" if data_file.path.endswith(".tsv") else ","),
        convert_options=pacsv.ConvertOptions(
            include_columns=None if names is None else [n for n in names if n in wanted],
            column_types={name: pa.string() for name in (*wanted, *(names or ()))}, strings_can_be_null=False),
    )


def inventory_rows(table: pa.Table, data_file: DataFile) -> pa.Table:
    """An inventory's rows as (path, identity): the latest version of each object, its key decoded, its ETag
    (or size@last-modified, as source.identity gives it for a listed object)."""
    table = table.rename_columns([FIELDS.get(name, name) for name in table.column_names])
    if "key" not in table.column_names:
        raise UsageError(f"the inventory data file {data_file.path} has no key column")
    keep = None
    for column, wanted in (("is_latest", True), ("is_delete_marker", False)):  # a versioned bucket's inventory
        if column in table.column_names:
            is_true = pc.equal(pc.utf8_lower(table[column].cast(pa.string())), "true")
            keep = pc.and_(keep, is_true if wanted else pc.invert(is_true)) if keep is not None else (is_true if wanted else pc.invert(is_true))
    if keep is not None:
        table = table.filter(pc.fill_null(keep, False))
    keys = table["key"].cast(pa.string())
    if "e_tag" in table.column_names:
        identity = pc.utf8_trim(table["e_tag"].cast(pa.string()), '"')
    else:
        identity = pc.binary_join_element_wise(table["size"].cast(pa.string()), table["last_modified_date"].cast(pa.string()), "@")
    return pa.table({"path": keys, "identity": identity})


def folders_and_names(paths) -> tuple[pa.DictionaryArray, pa.Array]:
    """Each path's folder ("" for none), dictionary-encoded (images share their folder), and its file name."""
    paths = paths.combine_chunks() if isinstance(paths, pa.ChunkedArray) else paths
    top = pc.invert(pc.match_substring(paths, "/"))
    if pc.any(top).as_py():
        paths = pc.if_else(top, pc.binary_join_element_wise("", paths, "/"), paths)
    split = pc.split_pattern(paths, "/", max_splits=1, reverse=True)
    return pc.list_element(split, 0).dictionary_encode(), pc.list_element(split, 1)


def needs_decoding(strings) -> pa.Array:
    return pc.or_(pc.match_substring(strings, "%"), pc.match_substring(strings, "+"))


def decoded(strings: pa.Array) -> pa.Array:
    """URL-decoded strings, only those with a '%' or '+' passed through Python."""
    at = np.flatnonzero(needs_decoding(strings).to_numpy(zero_copy_only=False))
    if not len(at):
        return strings
    values = pa.array([urllib.parse.unquote_plus(s) for s in strings.take(pa.array(at)).to_pylist()], pa.string())
    mask = np.zeros(len(strings), bool)
    mask[at] = True
    return pc.replace_with_mask(strings, pa.array(mask), values)


def select(table: pa.Table, spread: Spread, encoded: bool = False) -> tuple[pa.Table, int]:
    """The rows under the prefix (their paths made relative to it) whose names end in an image extension, with
    their label and split (source.label_and_split of their folder, where the file names none), and how many
    other files there were under the prefix. `encoded`: the paths are URL-encoded (an inventory's CSV keys).

    Whatever is done to a folder is done once for its images, in Python; each row only has its folder and
    name split, looked up and joined again in Arrow: some 2 s a million keys on one core.
    """
    folders, names = folders_and_names(table["path"])
    if encoded:
        names = decoded(names)
    under, relative, label, split = [], [], [], []
    prefix, root_split = spread.prefix, source.SPLITS.get(posixpath.basename(spread.root).lower())
    for folder in folders.dictionary.to_pylist():
        folder = urllib.parse.unquote_plus(folder) if encoded else folder
        inside = not prefix or folder == prefix or folder.startswith(prefix + "/")
        folder = folder[len(prefix) + 1 :] if prefix and inside else folder
        under.append(inside)
        relative.append(f"{folder}/" if folder else "")
        named = source.label_and_split(f"{folder}/x" if folder else "x", root_split)
        label.append(named[0]), split.append(named[1])
    tail = pc.utf8_lower(pc.utf8_slice_codeunits(names, -6))  # the longest extension, .jpeg, and its dot
    images = pa.array(np.zeros(len(names), bool))
    for extension in spread.extensions:
        images = pc.or_(images, pc.ends_with(tail, f".{extension}"))
    under = pa.array(under, pa.bool_()).take(folders.indices)
    files = pc.and_(under, pc.not_equal(names, ""))  # "folder/", a folder's marker object, is no file
    keep = pc.and_(files, images)
    skipped = pc.sum(files).as_py() - pc.sum(keep).as_py() if len(names) else 0
    indices, names = folders.indices.filter(keep), names.filter(keep)
    columns = {"path": pc.binary_join_element_wise(pa.array(relative, pa.string()).take(indices), names, "")}
    for name, per_folder in (("label", label), ("split", split)):
        given = table[name].filter(keep) if name in table.column_names else None
        columns[name] = given if given is not None else pa.array(per_folder, pa.string()).take(indices)
    columns["identity"] = table["identity"].filter(keep)
    return pa.table(columns).cast(pa.schema([(n, pa.string()) for n in LISTING_COLUMNS])), skipped


# --- a prefix listed by the workers ---------------------------------------------------------------------


def open_prefix(url: str, storage_options: dict, extensions: tuple[str, ...], min_folders: int = 0) -> Spread | None:
    """A prefix (or folder) to be listed by the workers: its first level of folders (one listing call, delimiter
    '/'), one for each worker to list; a prefix of more than a page at its first level (a flat one) split into
    RANGES key ranges (StartAfter). None where the client is as fast: a page of fewer than `min_folders` folders."""
    fs, root = source.open_url(url, storage_options)
    try:
        if is_s3(fs):
            bucket, key = (root.split("/", 1) + [""])[:2]
            page = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=f"{key}/" if key else "", Delimiter="/", MaxKeys=1000)
            folders = [p["Prefix"][len(key) + 1 if key else 0 :].rstrip("/") for p in page.get("CommonPrefixes", [])]
            files, flat = bool(page.get("Contents")), page.get("IsTruncated", False)
        else:
            entries = fs.ls(root, detail=True) if fs.isdir(root) else []
            folders = sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")
            files, flat = any(e["type"] != "directory" for e in entries), False
    except Exception as error:  # each storage backend fails its own way (no credentials, no endpoint...)
        raise UsageError(f"cannot list input {url}: {type(error).__name__}: {error}") from None
    if flat:
        ranges = key_ranges(fs, bucket, f"{key}/" if key else "", RANGES)
        units = tuple(KeyRange("", True, after, upto) for after, upto in ranges)
    elif folders and len(folders) >= min_folders:
        units = (*((KeyRange("", recursive=False),) if files else ()), *(KeyRange(folder) for folder in folders))
    else:
        return None
    return Spread(fs, root, fs, units, "prefix", "", extensions, "")


def is_s3(fs) -> bool:
    return any(protocol in ("s3", "s3a") for protocol in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)))


def objects(spread: Spread, unit: KeyRange) -> pa.Table:
    """On a worker: the objects of one KeyRange as (path relative to the root, identity)."""
    fs, root = spread.files_fs, spread.root
    folder = f"{root}/{unit.folder}" if unit.folder else root
    if is_s3(fs):
        bucket, key = (folder.split("/", 1) + [""])[:2]
        start = len(root.split("/", 1)[1]) + 1 if "/" in root else 0
        found = [(k[start:], etag) for k, etag in s3_keys(fs, bucket, f"{key}/" if key else "", unit)]
    elif unit.recursive:
        found = [(path[len(root) + 1 :], source.identity(info)) for path, info in fs.find(folder, detail=True).items()]
    else:
        found = [(e["name"][len(root) + 1 :], source.identity(e)) for e in fs.ls(folder, detail=True) if e["type"] != "directory"]
    paths, identities = zip(*found) if found else ((), ())
    return pa.table({"path": pa.array(paths, pa.string()), "identity": pa.array(identities, pa.string())})


def s3_keys(fs, bucket: str, prefix: str, unit: KeyRange) -> Iterator[tuple[str, str]]:
    """(key, ETag) of the keys under `prefix` in the unit's range, page by page (1,000 keys a call)."""
    ask = {"Bucket": bucket, "Prefix": prefix, **({"Delimiter": "/"} if not unit.recursive else {}),
           **({"StartAfter": unit.after} if unit.after else {})}
    if unit.upto is not None:
        ask["MaxKeys"] = 100  # a range may hold a few keys: a first page of 1,000 would mostly be the next range's
    while True:
        page = fs.call_s3("list_objects_v2", **ask)
        ask["MaxKeys"] = 1000
        for item in page.get("Contents", []):
            if unit.upto is not None and item["Key"] > unit.upto:
                return
            yield item["Key"], item.get("ETag", "").strip('"')
        if not page.get("IsTruncated"):
            return
        ask["ContinuationToken"] = page["NextContinuationToken"]


def key_ranges(fs, bucket: str, prefix: str, pieces: int, probes: int = 400) -> list[tuple[str | None, str | None]]:
    """About `pieces` key ranges (after, upto] that together hold every key under `prefix`, found without listing
    them: the key space is bisected, each half probed with one StartAfter call of one key (empty halves dropped)."""
    def first_after(after: str) -> str | None:
        page = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, StartAfter=after, MaxKeys=1)
        return page["Contents"][0]["Key"] if page.get("Contents") else None

    spans, asked = [(prefix, prefix + "\x7f")], 0
    while len(spans) < pieces and asked < probes:
        halves = []
        with ThreadPoolExecutor(16) as pool:  # a round's probes at once
            firsts = list(pool.map(first_after, [after for after, _ in spans]))
        asked += len(spans)
        for (after, upto), first in zip(spans, firsts):
            if first is None or first > upto:
                continue  # nothing there
            middle = midpoint(first, upto)
            halves += [(after, middle), (middle, upto)] if first < middle < upto else [(after, upto)]
        if halves == spans or not halves:
            break
        spans = halves
    bounds = [upto for _, upto in spans[:-1]]
    return list(zip([None, *bounds], [*bounds, None]))


def midpoint(low: str, high: str) -> str:
    """A string about half-way between two keys, as numbers in base 96 of their printable ASCII characters."""
    width = max(len(low), len(high)) + 1
    def number(key: str) -> int:
        digits = [min(max(ord(c) - 32, 0), 95) for c in key] + [0] * (width - len(key))
        return sum(d * 96 ** (width - 1 - i) for i, d in enumerate(digits))

    middle, out = (number(low) + number(high)) // 2, []
    for _ in range(width):
        middle, d = divmod(middle, 96)
        out.append(chr(d + 32))
    return "".join(reversed(out)).rstrip(" ")


def count_keys(url: str, storage_options: dict) -> int:
    """How many objects an inventory (or rows a listing file) names, for `cluster plan --images`: from the Parquet and
    ORC footers, or by counting a CSV's lines as it streams by (memory-light; a minute or so for 10^8 keys)."""
    spread = open_listing(url, storage_options, (), None)
    total = 0
    for data_file in spread.files:
        with spread.files_fs.open(data_file.path, "rb") as f:
            if data_file.format == "parquet":
                meta = pq.ParquetFile(f).metadata
                total += sum(meta.row_group(i).num_rows for i in (data_file.row_groups if data_file.row_groups is not None
                                                                  else range(meta.num_row_groups)))
            elif data_file.format == "orc":
                from pyarrow import orc
                total += orc.ORCFile(f).nrows
            else:
                stream = pa.PythonFile(f, mode="r")
                if data_file.path.endswith(".gz"):
                    stream = pa.CompressedInputStream(stream, "gzip")
                lines = 0
                while chunk := stream.read(16 << 20):
                    lines += chunk.count(b"\n")
                total += lines - (spread.kind == "listing file")  # a listing file's header
    return total
