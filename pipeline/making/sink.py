"""The output: one parquet row per image, an errors table, the manifest; written so that a run
that stops half-way never looks complete.

Layout under the output folder:
    images.parquet/part-NNNNN.parquet  path, label, split, identity (ETag, or size@mtime),
                                       features list<float32>, pca list<float32>
    errors.parquet                     path, identity, stage, error, message: inputs that could not be used
    pca.npz                            the fitted PCA (see reduce.py)
    index/                             the nearest-images index of the PCA rows (faiss; see index.py)
    manifest.json                      settings, versions, weights used, counts, timings, history of
                                       the run and its updates; written last: an output is complete
                                       when it has a manifest
    report/                            pictures and report.html, by `python -m pipeline report` (report.py)
    evaluation/                        a classifier's scores, by `python -m pipeline evaluate` (evaluate.py)
    _staging/                          the run in progress, removed when it is committed:
      run.json, listing.arrow          what --resume (or a rerun of `update`) needs to finish it alike
      partitions.arrow                 the images to featurize, an Arrow stream per partition
      features/part-NNNNN.parquet      one partition's features, errors and timings; there = done
      images.parquet/, errors.parquet, pca.npz, index/   the new output, moved into place at commit

Every file is published whole: object stores show an object only once uploaded, and local files
are written beside their name and renamed. A retried partition rewrites its own file.
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import source
from ..config import masked

IMAGES = "images.parquet"
ERRORS = "errors.parquet"
MANIFEST = "manifest.json"
PCA = "pca.npz"
INDEX = "index"  # the nearest-images index (index.py)
STAGING = "_staging"
RUN = f"{STAGING}/run.json"
LISTING = f"{STAGING}/listing.arrow"
PARTITIONS = f"{STAGING}/partitions.arrow"
STAGED = f"{STAGING}/features"
FINAL = (IMAGES, ERRORS, PCA, INDEX)  # moved from _staging into place at commit, then the manifest
REPORT = "report"
EVALUATION = "evaluation"
ERROR_COLUMNS = ["path", "identity", "stage", "error", "message"]
COMPRESSED = pa.ipc.IpcWriteOptions(compression="zstd")  # the staged Arrow files: the listing, the partitions


def part_name(index: int) -> str:
    """File name of partition `index`; zero-padded so that names sort like the rows."""
    return f"part-{index:05d}.parquet"


def error_row(path: str, identity: str, stage: str, error: BaseException) -> dict:
    """One row of the errors table."""
    return {"path": path, "identity": identity, "stage": stage, "error": type(error).__name__, "message": masked(str(error))}


def list_array(matrix: np.ndarray) -> pa.ListArray:
    """An n × d float32 matrix as an Arrow list<float32> column, without copying row by row."""
    n, d = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(matrix, np.float32).ravel()))


def matrix(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A list<float32> column back as an n × width float32 matrix."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def rows_table(rows: pd.DataFrame, **vectors: np.ndarray) -> pa.Table:
    """path, label, split, identity, then one list<float32> column per named matrix."""
    columns = {name: pa.Array.from_pandas(rows[name], type=pa.string()) for name in ("path", "label", "split", "identity")}  # NaN, NA → null
    columns.update({name: list_array(values) for name, values in vectors.items()})
    return pa.table(columns)


def publish(fs, path: str, write: Callable) -> None:
    """Write a file through `write(f)` so that `path` appears only once complete, on any filesystem."""
    if not source.is_local(fs):  # an object store shows the object when its upload completes
        with fs.open(path, "wb") as f:
            write(f)
        return
    partial = f"{path}.{uuid.uuid4().hex[:8]}.partial"
    try:
        with fs.open(partial, "wb") as f:
            write(f)
        fs.mv(partial, path)
    finally:
        if fs.exists(partial):
            fs.rm_file(partial)


def write_parquet(fs, path: str, table: pa.Table) -> None:
    """Write one parquet file through any fsspec filesystem (no pandas index: Spark reads it as is).

    Vectors and floats are not dictionary-encoded: features never repeat, and trying a dictionary
    on them cost 5 × the rest of writing a partition (docs/performance.md, "Feeding a GPU").
    """
    repeating = [field.name for field in table.schema if not (pa.types.is_nested(field.type) or pa.types.is_floating(field.type))]
    publish(fs, path, lambda f: pq.write_table(table, f, use_dictionary=repeating))


def write_arrow(fs, path: str, table: pa.Table) -> None:
    """Write a table as a zstd-compressed Arrow IPC file: read back, it takes little more than its own size,
    where parquet's decoding takes three times that (a million images' listing: 100 MB, not 235)."""
    def write(f):
        with pa.ipc.new_file(f, table.schema, options=COMPRESSED) as writer:
            writer.write_table(table.unify_dictionaries(), max_chunksize=65536)  # one dictionary a column, as the format asks

    publish(fs, path, write)


def read_arrow(fs, path: str) -> pa.Table:
    """A file of write_arrow, whole."""
    with fs.open(path, "rb") as f:
        return pa.ipc.open_file(f).read_all()


def read_parquet(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    """Read one parquet file (or only these columns) through any fsspec filesystem.

    Not pq.read_table: on a Python file object it can leave threads that abort the process at
    exit (apache/arrow#34314; seen in some 3% of short CLI runs).
    """
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).read(columns=columns)


def write_partitions(fs, path: str, rows: pd.DataFrame | pa.Table, size: int) -> list[tuple[int, int]]:
    """Write the images to featurize (path, label, split, identity: a listing's rows, or a table of strings),
    a compressed Arrow IPC stream of `size` rows per partition, one after another; returns each partition's
    byte range (start, end) in the file.

    A task is then given its partition's byte range, not its rows: neither the scheduler nor the
    tasks it holds grow with the listing, and each task reads its own bytes alone, however many
    partitions there are (a file footer indexing them all would be read by every task).
    """
    ranges = []

    def write(f):
        ranges.clear()  # publish may retry
        for first in range(0, len(rows), size):
            table = rows.slice(first, size) if isinstance(rows, pa.Table) else rows_table(rows.iloc[first : first + size])
            stream = pa.BufferOutputStream()
            with pa.ipc.new_stream(stream, table.schema, options=COMPRESSED) as writer:
                writer.write_table(table)
            data = stream.getvalue()
            start = ranges[-1][1] if ranges else 0
            f.write(data)
            ranges.append((start, start + data.size))

    publish(fs, path, write)
    return ranges


def partition_rows(fs, path: str, byte_range: tuple[int, int]) -> pd.DataFrame:
    """The rows of one partition of a file of write_partitions, from its byte range."""
    start, end = byte_range
    return pa.ipc.open_stream(fs.cat_file(path, start=start, end=end)).read_all().to_pandas()


def stage_partition(fs, path: str, rows: pd.DataFrame, features: np.ndarray, errors: list[dict], seconds: dict) -> dict:
    """Stage one partition: its rows and features, with its errors and timings in the file's metadata.

    One file per partition makes it done or not done as a whole: --resume reads the summary back.
    """
    summary = {"rows": len(rows), "errors": errors, "seconds": seconds}
    table = rows_table(rows, features=features).replace_schema_metadata({"pipeline": json.dumps(summary)})
    write_parquet(fs, path, table)
    return summary


def staged_summary(fs, path: str) -> dict:
    """Rows, errors and timings of a partition staged by an earlier, interrupted run."""
    with fs.open(path, "rb") as f:
        return json.loads(pq.read_schema(f).metadata[b"pipeline"])


def staged_features(fs, path: str, width: int) -> np.ndarray:
    """The features of one staged partition, for the PCA fit."""
    return matrix(read_parquet(fs, path, columns=["features"])["features"], width)


@dataclasses.dataclass(frozen=True)
class OutputPart:
    """One file of the new images.parquet/: the rows of its sources with paths in [low, high).

    A run's part is one staged partition. An update's is a part of the previous output, less the
    paths in `drop`, and the staged new rows that sort into its range: rows stay sorted by path.
    """

    name: str
    staged: tuple[str, ...]
    previous: str | None = None
    drop: frozenset = frozenset()  # paths of `previous` to leave out: deleted or replaced images
    low: str | None = None  # None: from the first path
    high: str | None = None  # None: to the last


def finish_partition(fs, part: OutputPart, folder: str, projection: tuple[np.ndarray, np.ndarray] | None,
                     details: Callable[[pa.Table], pa.Table] | None = None) -> int:
    """Write one part into `folder`, its rows sorted by path, with their PCA projection (mean, components) if given.

    `details`: adds columns to the staged rows (the photos' details of preprocessed images).
    Returns the rows written; a part left without rows writes no file.
    """
    tables = [read_parquet(fs, path).replace_schema_metadata(None) for path in part.staged]
    if details is not None:
        tables = [details(table) for table in tables]
    if part.previous:  # projected by the previous PCA, and holding the images that changed since
        table = read_parquet(fs, part.previous)
        table = table.drop_columns("pca") if "pca" in table.column_names else table
        tables.append(table.filter(pc.invert(pc.is_in(table["path"], pa.array(sorted(part.drop), pa.string())))))
    table = pa.concat_tables(tables, promote_options="default")  # an older part may lack the photos' details
    if part.low is not None:
        table = table.filter(pc.greater_equal(table["path"], part.low))
    if part.high is not None:
        table = table.filter(pc.less(table["path"], part.high))
    table = table.sort_by("path")
    if not table.num_rows:
        return 0
    if projection is None:
        write_parquet(fs, f"{folder}/{part.name}", table)
        return table.num_rows
    mean, components = projection
    features = matrix(table["features"], mean.shape[0])
    projected = (features - mean) @ components.T
    write_parquet(fs, f"{folder}/{part.name}", table.append_column("pca", list_array(projected.astype(np.float32))))
    return table.num_rows


def errors_table(errors: list[dict]) -> pa.Table:
    """The errors table, with its columns even when empty."""
    return pa.table({name: pa.array([e[name] for e in errors], pa.string()) for name in ERROR_COLUMNS})


def write_json(fs, path: str, data: dict) -> None:
    """Write a JSON document (the manifest) through any fsspec filesystem."""
    write_bytes(fs, path, (json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n").encode())


def write_bytes(fs, path: str, data: bytes) -> None:
    """Write a whole file (a picture, a page) so that it appears only complete, as every output file does."""
    publish(fs, path, lambda f: f.write(data))


def read_json(fs, path: str) -> dict:
    """Read a JSON document (a manifest, a run's record) through any fsspec filesystem."""
    with fs.open(path, "rb") as f:
        return json.load(f)


def make_folder(fs, path: str) -> None:
    """Create a folder on a local filesystem; object stores have none (and no bucket is created)."""
    if source.is_local(fs):
        fs.makedirs(path, exist_ok=True)


def exists(fs, out: str, name: str) -> bool:
    """True if the output folder `out` holds `name` (a file or a folder of parts)."""
    return fs.exists(f"{out}/{name}")


def remove(fs, out: str, *names: str) -> None:
    """Remove these names of the pipeline's own under `out`, where they exist (nothing else)."""
    for name in names:
        if exists(fs, out, name):
            fs.rm(f"{out}/{name}", recursive=True)


def move(fs, path: str, target: str) -> None:
    """Move a file or a folder of files: a rename on a local disk, a copy of each object elsewhere."""
    if source.is_local(fs):
        fs.mv(path, target, recursive=True)
        return
    fs.invalidate_cache(path)  # written by the workers: a listing cached here would miss files
    files = fs.find(path)  # s3fs's recursive mv also tries to copy the folder as an object, and fails
    fs.copy(files, [target + name[len(path) :] for name in files])
    fs.rm(files)


def commit(fs, out: str, manifest: dict) -> None:
    """Replace the previous output by the staged one; the manifest, written last, marks it complete."""
    remove(fs, out, MANIFEST, REPORT, EVALUATION, *FINAL)  # the old pictures and scores go with the old output
    for name in FINAL:
        move(fs, f"{out}/{STAGING}/{name}", f"{out}/{name}")
    write_json(fs, f"{out}/{MANIFEST}", manifest)
    remove(fs, out, RUN, STAGING)
