"""The output's files: a task finds its partition's rows by their byte range in one Arrow file, not in its arguments."""
import fsspec
import pandas as pd
import pyarrow as pa

from pipeline.making import sink


def listing(n):
    return pd.DataFrame({"path": [f"a/{i:04d}.jpg" for i in range(n)], "label": "a", "split": None,
                         "identity": [str(i) for i in range(n)]}).astype(pd.ArrowDtype(pa.string()))


def test_each_partition_is_read_back_from_its_own_bytes_alone(tmp_path):
    fs, rows = fsspec.filesystem("file"), listing(1000)
    path = f"{tmp_path}/partitions.arrow"
    ranges = sink.write_partitions(fs, path, rows, 256)
    assert len(ranges) == 4 and ranges[0][0] == 0 and ranges[-1][1] == fs.size(path)
    assert all(end == start for (_, end), (start, _) in zip(ranges, ranges[1:]))  # one after another
    parts = [sink.partition_rows(fs, path, byte_range) for byte_range in reversed(ranges)][::-1]
    assert [len(part) for part in parts] == [256, 256, 256, 232]
    assert sink.rows_table(pd.concat(parts, ignore_index=True)).equals(sink.rows_table(rows))  # a missing split stays null


def test_no_images_make_no_partitions(tmp_path):
    assert sink.write_partitions(fsspec.filesystem("file"), f"{tmp_path}/partitions.arrow", listing(0), 256) == []


def test_a_listing_of_many_folders_is_saved_and_read_back_whole(tmp_path):
    fs, path = fsspec.filesystem("file"), f"{tmp_path}/listing.arrow"
    folders = [pa.table({"path": [f"{label}/1.jpg"], "label": pa.array([label]).dictionary_encode()}) for label in ("a", "b")]
    sink.write_arrow(fs, path, pa.concat_tables(folders))  # a dictionary per folder, one in the file
    assert sink.read_arrow(fs, path).to_pydict() == {"path": ["a/1.jpg", "b/1.jpg"], "label": ["a", "b"]}


def test_features_are_written_without_a_dictionary_and_strings_with_one(tmp_path):
    """Features never repeat: a dictionary tried on them cost 5 × the rest of staging a partition."""
    import numpy as np
    import pyarrow.parquet as pq

    fs, path = fsspec.filesystem("file"), f"{tmp_path}/part.parquet"
    features = np.random.default_rng(0).random((300, 64), dtype=np.float32)
    sink.stage_partition(fs, path, listing(300), features, [], {"read": 1.0})
    columns = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {columns.column(i).path_in_schema: columns.column(i).encodings for i in range(columns.num_columns)}
    assert not any("DICTIONARY" in e for e in encodings["features.list.element"])
    assert any("DICTIONARY" in e for e in encodings["label"])
    np.testing.assert_array_equal(sink.staged_features(fs, path, 64), features)


def test_a_file_is_published_whole_or_not_at_all(tmp_path):
    fs, path = fsspec.filesystem("file"), f"{tmp_path}/report.html"
    sink.write_bytes(fs, path, b"the old page")

    def fails_half_way(f):
        f.write(b"half of the new")
        raise OSError("disk full")

    try:
        sink.publish(fs, path, fails_half_way)
    except OSError:
        pass
    assert (tmp_path / "report.html").read_bytes() == b"the old page"  # what report and evaluate write is never half a file
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no partial file left
    sink.write_bytes(fs, path, b"the new page")
    assert (tmp_path / "report.html").read_bytes() == b"the new page"
