"""The output: one parquet row per image, an errors table, the manifest.

Layout under the output folder:
    images.parquet/part-NNNNN.parquet  path, label, split, features list<float32>, pca list<float32>
    errors.parquet                     path, stage, error, message: inputs that could not be used
    pca.npz                            the fitted PCA (see reduce.py)
    manifest.json                      settings, versions, weights used, counts, timings
    _staging/                          features between featurizing and the PCA; removed at the end
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import source

IMAGES = "images.parquet"
ERRORS = "errors.parquet"
MANIFEST = "manifest.json"
PCA = "pca.npz"
STAGING = "_staging"
ERROR_COLUMNS = ["path", "stage", "error", "message"]


def part_name(index: int) -> str:
    """File name of partition `index`; zero-padded so that names sort like the rows."""
    return f"part-{index:05d}.parquet"


def error_row(path: str, stage: str, error: BaseException) -> dict:
    """One row of the errors table."""
    return {"path": path, "stage": stage, "error": type(error).__name__, "message": str(error)}


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
    """path, label, split, then one list<float32> column per named matrix."""
    columns = {
        "path": pa.array(rows["path"].tolist(), pa.string()),
        "label": pa.array(rows["label"].tolist(), pa.string()),
        "split": pa.array(rows["split"].tolist(), pa.string()),
    }
    columns.update({name: list_array(values) for name, values in vectors.items()})
    return pa.table(columns)


def write_parquet(fs, path: str, table: pa.Table) -> None:
    """Write one parquet file through any fsspec filesystem (no pandas index: Spark reads it as is)."""
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def read_parquet(fs, path: str) -> pa.Table:
    """Read one parquet file through any fsspec filesystem."""
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def staged_features(fs, path: str, width: int) -> np.ndarray:
    """The features of one staged partition, for the PCA fit."""
    with fs.open(path, "rb") as f:
        return matrix(pq.read_table(f, columns=["features"])["features"], width)


def finish_partition(fs, staged_path: str, final_path: str, mean: np.ndarray, components: np.ndarray) -> int:
    """Add the PCA projection to a staged partition and write it to the output; returns its rows."""
    table = read_parquet(fs, staged_path)
    features = matrix(table["features"], mean.shape[0])
    projected = (features - mean) @ components.T
    write_parquet(fs, final_path, table.append_column("pca", list_array(projected.astype(np.float32))))
    return table.num_rows


def errors_table(errors: list[dict]) -> pa.Table:
    """The errors table, with its columns even when empty."""
    return pa.table({name: pa.array([e[name] for e in errors], pa.string()) for name in ERROR_COLUMNS})


def write_json(fs, path: str, data: dict) -> None:
    """Write a JSON document (the manifest) through any fsspec filesystem."""
    with fs.open(path, "w") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")


def make_folder(fs, path: str) -> None:
    """Create a folder on a local filesystem; object stores have none (and no bucket is created)."""
    if source.is_local(fs):
        fs.makedirs(path, exist_ok=True)


def remove_outputs(fs, output: str) -> None:
    """Remove what an earlier run wrote here (only the pipeline's own files), so that runs never mix."""
    for name in (IMAGES, ERRORS, MANIFEST, PCA, STAGING):
        path = f"{output}/{name}"
        if fs.exists(path):
            fs.rm(path, recursive=True)
