"""The nearest-images index (index.py): exact below a size, approximate above with its recall measured, plain files."""
import json

import dask.config
import fsspec
import numpy as np
import pyarrow as pa
import pytest

from pipeline.making import sink
from pipeline.reading import index

FS = fsspec.filesystem("file")


def write_parts(folder, vectors, per_part):
    """An images.parquet/ of these PCA rows, `per_part` to a part; row i is "label {i % 7}/{i}.jpg"."""
    FS.makedirs(f"{folder}/{sink.IMAGES}", exist_ok=True)
    parts = []
    for number, first in enumerate(range(0, len(vectors), per_part)):
        rows = np.arange(first, min(first + per_part, len(vectors)))
        table = pa.table({"path": [f"label {i % 7}/{i}.jpg" for i in rows], "label": [f"label {i % 7}" for i in rows],
                          "pca": sink.list_array(vectors[rows])})
        parts.append(f"{folder}/{sink.IMAGES}/{sink.part_name(number)}")
        sink.write_parquet(FS, parts[-1], table)
    return parts


def built(folder, vectors, per_part):
    parts = write_parts(folder, vectors, per_part)
    about = index.build(FS, f"{folder}/{sink.INDEX}", parts, vectors.shape[1], len(vectors))
    return about, parts, index.SearchIndex.load(FS, str(folder), "v1")


def clustered(n, width, seed=0):
    """Points around 50 centres whose spread falls off by dimension, as PCA coordinates do."""
    rng = np.random.default_rng(seed)
    scale = 1 / np.sqrt(np.arange(1, width + 1))
    centres = rng.normal(size=(50, width)) * 3 * scale
    return (centres[rng.integers(0, 50, n)] + rng.normal(size=(n, width)) * scale).astype(np.float32)


def test_a_small_output_gets_an_exact_index_whose_row_ids_name_path_and_label(tmp_path):
    vectors = clustered(500, 8)
    about, _, found = built(tmp_path, vectors, per_part=120)
    queries = clustered(6, 8, seed=1)
    nearest = found.search(queries, 4)

    distances = np.linalg.norm(vectors[None] - queries[:, None], axis=2)
    expected = np.argsort(distances, axis=1)[:, :4]
    assert about["kind"] == "flat" and about["rows"] == 500 and about["recall"] == {"@5": 1.0, "@10": 1.0}
    assert nearest.rows.tolist() == expected.tolist()
    assert nearest.paths.tolist() == [[f"label {i % 7}/{i}.jpg" for i in row] for row in expected]
    assert nearest.labels.tolist() == [[f"label {i % 7}" for i in row] for row in expected]
    np.testing.assert_allclose(nearest.distances, np.sort(distances, axis=1)[:, :4], rtol=1e-4, atol=1e-4)
    assert found.search(queries, 1000).rows.shape == (6, 500)  # k beyond the rows: every row


def test_the_exact_scan_part_by_part_finds_what_the_exact_index_finds(tmp_path):
    vectors = clustered(700, 6)
    _, parts, found = built(tmp_path, vectors, per_part=64)
    queries = clustered(5, 6, seed=2)
    scanned, indexed = found.exact(FS, parts, queries, 7), found.search(queries, 7)
    assert scanned.rows.tolist() == indexed.rows.tolist() and scanned.paths.tolist() == indexed.paths.tolist()
    np.testing.assert_allclose(scanned.distances, indexed.distances, rtol=1e-5)


def test_its_files_are_faiss_arrow_and_json_read_without_pickle(tmp_path):
    vectors = clustered(300, 5)
    built(tmp_path, vectors, per_part=100)
    folder = tmp_path / sink.INDEX
    assert sorted(p.name for p in folder.iterdir()) == ["index.faiss", "index.json", "rows.arrow"]
    assert json.loads((folder / "index.json").read_text())["factory"] == "Flat"
    rows = pa.ipc.open_file(pa.memory_map(str(folder / "rows.arrow"))).read_all()
    assert rows.column_names == ["path", "label"] and rows["path"][299].as_py() == "label 5/299.jpg"
    assert (folder / "index.faiss").read_bytes()[:4] == b"IxF2"  # faiss's IndexFlatL2, its own format


def test_above_the_exact_size_an_ivf_index_reaches_the_recall_it_measured(tmp_path):
    vectors, queries = np.split(clustered(20_200, 16), [20_000])  # queries: new points, not rows of the output
    with dask.config.set({"pipeline.index.exact-below": 5000, "pipeline.index.recall-queries": 300}):
        about, parts, found = built(tmp_path, vectors, per_part=1000)
    assert about["kind"] == "ivf-sq8" and about["factory"] == "IVF128,SQ8" and about["rows"] == 20_000
    assert about["recall"]["@5"] >= 0.95 and about["recall_queries"] == 300
    assert 1 <= about["parameters"]["nprobe"] <= 128

    approximate, exact = found.search(queries, 5), found.exact(FS, parts, queries, 5)
    agree = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(approximate.rows.tolist(), exact.rows.tolist())])
    assert agree >= 0.9
    assert approximate.paths[0, 0] == f"label {approximate.rows[0, 0] % 7}/{approximate.rows[0, 0]}.jpg"


def test_the_kind_follows_the_size():
    assert index.Plan.of(199_999, 128).kind == "flat"
    assert index.Plan.of(1_000_000, 128) == index.Plan("ivf-sq8", "IVF1024,SQ8", 1024)
    assert index.Plan.of(10**9, 420) == index.Plan("ivf-pq", "IVF32768,PQ105x8", 32768)
    assert index.Plan.of(10**10, 128).factory == "IVF131072_HNSW32,PQ32x8"


def test_an_output_without_an_index_says_how_to_make_one(tmp_path):
    with pytest.raises(index.UsageError, match=r"has no index/ \(made by an earlier version of the pipeline\): make it again"):
        index.SearchIndex.load(FS, str(tmp_path), "v1")
