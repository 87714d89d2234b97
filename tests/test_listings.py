"""Inventories and listing files as input: the workers read them, data file by data file, and the rows are
those a listed prefix gives, in the same order; the client holds the manifest and the partitions' byte ranges."""
import dataclasses
import gzip
import io
import json
import urllib.parse

import pandas as pd
import pyarrow as pa
import pyarrow.orc
import pyarrow.parquet as pq
import pytest
import s3fs
from distributed import Client, as_completed, get_task_stream

import pipeline
from pipeline import cli, config, source
from pipeline.making import listings, sink
from pipeline.config import SAMPLE_DIR, UsageError

EXTENSIONS = config.settings().extensions
CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"
SCHEMA = pa.schema([("bucket", pa.string()), ("key", pa.string()), ("version_id", pa.string()), ("is_latest", pa.bool_()),
                    ("is_delete_marker", pa.bool_()), ("size", pa.int64()), ("last_modified_date", pa.timestamp("ms", "UTC")),
                    ("e_tag", pa.string()), ("storage_class", pa.string())])  # the ORC and Parquet files' (AWS's names and types)


def objects(fs, bucket: str) -> list[dict]:
    """A bucket's objects as S3 Inventory reports them (ETag without quotes)."""
    return [{"bucket": bucket, "key": info["name"].split("/", 1)[1], "version_id": None, "is_latest": True,
             "is_delete_marker": False, "size": info["size"], "last_modified_date": info["LastModified"],
             "e_tag": info["ETag"].strip('"'), "storage_class": "STANDARD"}
            for info in fs.find(bucket, detail=True).values()]


def write_inventory(fs, destination: str, rows: list[dict], fmt: str, n_files: int = 3, day: str = "2026-12-01T01-00Z",
                    chunks: list[list[dict]] | None = None) -> str:
    """An S3 Inventory in AWS's layout under `destination` (a bucket, or a folder holding a copy of one): rows spread
    over `n_files` data files (CSV.gz with URL-encoded keys, ORC or Parquet), or the `chunks` given; returns the manifest's path."""
    config_folder = f"inventories/{rows[0]['bucket']}/daily"
    files = []
    # by default every data file spans the whole key range: the workers must sort them together
    for i, chunk in enumerate(chunks or [rows[i::n_files] for i in range(n_files)]):
        key = f"{config_folder}/data/{day}-{i}.{ {'csv': 'csv.gz', 'orc': 'orc', 'parquet': 'parquet'}[fmt] }"
        if fmt == "csv":
            lines = "".join(",".join(f'"{value}"' for value in (
                r["bucket"], urllib.parse.quote_plus(r["key"], safe="/"), r["version_id"] or "", str(r["is_latest"]).lower(),
                str(r["is_delete_marker"]).lower(), r["size"], r["last_modified_date"].strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                r["e_tag"], r["storage_class"])) + "\n" for r in chunk)
            data = gzip.compress(lines.encode())
        else:
            table, buffer = pa.Table.from_pylist(chunk, SCHEMA), io.BytesIO()
            (pq.write_table if fmt == "parquet" else pa.orc.write_table)(table, buffer)
            data = buffer.getvalue()
        put(fs, f"{destination}/{key}", data)
        files.append({"key": key, "size": len(data), "MD5checksum": "0" * 32})
    manifest = {"sourceBucket": rows[0]["bucket"], "destinationBucket": "arn:aws:s3:::inventories", "version": "2016-11-30",
                "creationTimestamp": "1764550800000", "fileFormat": {"csv": "CSV", "orc": "ORC", "parquet": "Parquet"}[fmt],
                "fileSchema": CSV_SCHEMA if fmt == "csv" else "struct<...>", "files": files}
    path = f"{destination}/{config_folder}/{day}/manifest.json"
    put(fs, path, json.dumps(manifest).encode())
    return path


def put(fs, path: str, data: bytes) -> None:
    if source.is_local(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


def read(url: str, options: dict) -> pd.DataFrame:
    """A table of the output as it is now (not as this process's S3 client cached it)."""
    s3fs.S3FileSystem.clear_instance_cache()
    return pd.read_parquet(url, storage_options=options)


def same_rows(listing, expected) -> None:
    columns = ["path", "label", "split", "identity"]
    pd.testing.assert_frame_equal(listing.rows[columns].astype(object), expected.rows[columns].astype(object))
    assert listing.skipped == expected.skipped


@pytest.fixture
def bucket(s3):
    """The sample in s3://fruits/fruits-360, with a name to decode, a file that is no image and an old version."""
    s3.pipe_file("fruits/fruits-360/Training/Apple Red 1/a+b 100%.jpg", (SAMPLE_DIR / "Training/Apple Red 1").glob("*.jpg").__next__().read_bytes())
    s3.pipe_file("fruits/fruits-360/notes.txt", b"not an image")
    s3.pipe_file("fruits/elsewhere/x.jpg", b"outside the prefix")
    return s3


@pytest.mark.parametrize("fmt", ["csv", "orc", "parquet"])
def test_an_inventory_in_each_of_aws_formats_gives_the_rows_of_the_listed_prefix(bucket, s3_endpoint, tmp_path, fmt):
    rows = objects(bucket, "fruits")
    rows.append(rows[0] | {"is_latest": False, "e_tag": "an-older-version"})  # a versioned bucket's inventory
    rows.append(rows[1] | {"key": "fruits-360/Training/deleted.jpg", "is_delete_marker": True})
    fs = pipeline.source.open_url(str(tmp_path), {})[0]
    manifest = write_inventory(fs, str(tmp_path / "copy-of-the-destination-bucket"), rows, fmt)
    options = {"endpoint_url": s3_endpoint}

    spread = listings.open_listing(manifest, options, EXTENSIONS, "fruits-360")
    assert spread.root == "fruits/fruits-360" and len(spread.files) == 3
    same_rows(listings.gathered(spread), source.list_images("s3://fruits/fruits-360", options, EXTENSIONS))


def test_a_listing_file_gives_paths_relative_to_its_folder_with_the_labels_it_names(tmp_path):
    listed = source.list_images(str(SAMPLE_DIR), {}, EXTENSIONS)
    rows = pa.Table.from_pandas(listed.rows[["path", "identity"]].astype(str), preserve_index=False)
    pq.write_table(rows.slice(10).append_column("label", pa.array(["mine"] * (len(rows) - 10))), tmp_path / "first.parquet")
    pacsv = pytest.importorskip("pyarrow.csv")
    pacsv.write_csv(rows.select(["path"]), tmp_path / "paths.csv")

    from_parquet = listings.gathered(listings.open_listing(str(tmp_path / "first.parquet"), {}, EXTENSIONS, None))
    assert set(from_parquet.rows.label) == {"mine"} and list(from_parquet.rows.path) == list(listed.rows.path[10:])
    from_csv = listings.gathered(listings.open_listing(str(tmp_path / "paths.csv"), {}, EXTENSIONS, "Training"))
    assert from_csv.root == f"{tmp_path}/Training"
    assert list(from_csv.rows.path) == [p.removeprefix("Training/") for p in listed.rows.path if p.startswith("Training/")]
    assert set(from_csv.rows.split) == {"Training"} and set(from_csv.rows.identity) == {""}


def test_the_workers_write_the_partitions_in_the_order_of_the_listed_prefix(bucket, s3_endpoint, dask_cluster, tmp_path):
    options = {"endpoint_url": s3_endpoint}
    bucket.mkdir("inventories")
    manifest = write_inventory(bucket, "inventories", objects(bucket, "fruits"), "csv", n_files=4)  # on the S3 server
    spread = listings.open_listing(f"s3://{manifest}", options, EXTENSIONS, "fruits-360")
    with Client(dask_cluster) as client:
        listed = listings.partitions(spread, client, source.open_url(str(tmp_path), {})[0], str(tmp_path), 16)
    expected = source.list_images("s3://fruits/fruits-360", options, EXTENSIONS)
    assert listed.images == len(expected.rows) and listed.skipped == expected.skipped
    assert [n for _, _, n in listed.parts][:-1] == [16] * (len(listed.parts) - 1)  # data files sharing paths: sorted together
    rows = pd.concat([sink.partition_rows(source.open_url(str(tmp_path), {})[0], path, byte_range) for path, byte_range, _ in listed.parts])
    assert list(rows.path) == list(expected.rows.path) and list(rows.identity) == list(expected.rows.identity)


def test_the_manifest_says_what_is_wrong_with_it(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"files": []}))
    with pytest.raises(UsageError, match="not an S3 Inventory manifest"):
        listings.open_listing(str(tmp_path / "manifest.json"), {}, EXTENSIONS, None)
    (tmp_path / "list.parquet").write_bytes(b"")
    pq.write_table(pa.table({"name": ["a.jpg"]}), tmp_path / "list.parquet")
    with pytest.raises(UsageError, match="no `path` column"):
        listings.open_listing(str(tmp_path / "list.parquet"), {}, EXTENSIONS, None)
    with pytest.raises(UsageError, match="input-prefix"):
        listings.open_input(config.settings(input=str(SAMPLE_DIR), input_prefix="Training"))


def test_partitions_grow_with_the_input_so_that_tasks_stay_in_the_tens_of_thousands():
    sizes = {n: config.partition_size("auto", n) for n in (10**3, 10**5, 10**6, 10**7, 10**8, 10**9)}
    assert sizes == {10**3: 256, 10**5: 256, 10**6: 256, 10**7: 512, 10**8: 4096, 10**9: 4096}
    assert config.partition_size(64, 10**9) == 64
    assert -(-10**8 // sizes[10**8]) < 25_000


@pytest.mark.slow
def test_a_run_from_an_inventory_gives_one_row_or_error_per_key_and_a_newer_inventory_updates_it(bucket, s3_endpoint, dask_cluster):
    options = {"endpoint_url": s3_endpoint}
    quiet = dict(progress=False, say=lambda message: None)
    rows = objects(bucket, "fruits")
    rows.append(rows[0] | {"key": "fruits-360/Training/Apple Braeburn/vanished.jpg"})  # deleted since the inventory
    bucket.mkdir("inventories")
    manifest = write_inventory(bucket, "inventories", rows, "csv", n_files=2)
    settings = pipeline.settings(input=f"s3://{manifest}", input_prefix="fruits-360", output="s3://fruits/out", cluster=dask_cluster,
                                 weights="random", image_size=96, storage_options=options)

    done = pipeline.run(settings, **quiet)
    images, errors = (read(f"s3://fruits/out/{name}", options) for name in ("images.parquet", "errors.parquet"))
    keys = sorted(r["key"].removeprefix("fruits-360/") for r in rows if r["key"].startswith("fruits-360/") and r["key"].endswith(".jpg"))
    assert sorted([*images.path, *errors.path]) == keys and list(images.path) == sorted(images.path)
    assert errors.set_index("path").loc["Training/Apple Braeburn/vanished.jpg", "stage"] == "read"
    assert done["counts"]["listed"] == len(keys) and done["settings"]["images_per_partition"] == 256

    bucket.copy(f"fruits/{rows[0]['key']}", "fruits/fruits-360/Training/Apple Braeburn/new.jpg")
    gone = next(r for r in rows if r["key"].endswith(".jpg") and r["key"].startswith("fruits-360/"))
    new = [r for r in rows[:-1] if r is not gone] + [rows[0] | {"key": "fruits-360/Training/Apple Braeburn/new.jpg", "e_tag": "new"}]
    newer = write_inventory(bucket, "inventories", new, "parquet", n_files=2, day="2026-12-02T01-00Z")
    updated = pipeline.update(settings, input=f"s3://{newer}", **quiet)
    assert (updated["history"][-1]["added"], updated["history"][-1]["removed"]) == (1, 2)  # new.jpg; a deleted key, vanished.jpg
    images, errors = (read(f"s3://fruits/out/{name}", options) for name in ("images.parquet", "errors.parquet"))
    keys = sorted(r["key"].removeprefix("fruits-360/") for r in new if r["key"].startswith("fruits-360/") and r["key"].endswith(".jpg"))
    assert sorted([*images.path, *errors.path]) == keys and list(images.path) == sorted(images.path)


def test_an_interrupted_run_from_an_inventory_resumes_only_from_the_same_inventory(bucket, s3_endpoint, tmp_path):
    options = {"endpoint_url": s3_endpoint}
    bucket.mkdir("inventories")
    manifest = write_inventory(bucket, "inventories", objects(bucket, "fruits"), "orc", n_files=1)
    settings = pipeline.settings(input=f"s3://{manifest}", input_prefix="fruits-360", output=str(tmp_path), storage_options=options)
    out = pipeline.output.Output.at(str(tmp_path), {})
    spread = listings.open_input(settings)
    out.check_writable()
    out.save_plan(settings, spread, pipeline.making.featurize.Weights("random", None), command="run")
    again, _ = out.resume_plan(settings)
    assert again == spread
    bucket.pipe_file(manifest, bucket.cat_file(manifest) + b" ")  # a new version under the same name
    with pytest.raises(UsageError, match="has changed since the interrupted run"):
        out.resume_plan(settings)


def worker_listed(spread, address, out) -> tuple[pd.DataFrame, listings.Partitions]:
    """What the workers list: the rows of every partition they wrote, in order."""
    out_fs = source.open_url(str(out), {})[0]
    with Client(address) as client:
        listed = listings.partitions(spread, client, out_fs, str(out), 16)
    return pd.concat([sink.partition_rows(out_fs, path, byte_range) for path, byte_range, _ in listed.parts], ignore_index=True), listed


def assert_same_listing(rows: pd.DataFrame, listed, expected) -> None:
    columns = ["path", "label", "split", "identity"]
    pd.testing.assert_frame_equal(rows[columns].astype(object).fillna("-"), expected.rows[columns].reset_index(drop=True).astype(object).fillna("-"))
    assert listed.skipped == expected.skipped


def test_a_folder_of_folders_is_listed_by_the_workers_folder_by_folder_into_the_same_rows(dask_cluster, sample_copy, tmp_path):
    for extra in ("Training/notes.txt", "Training/top.jpg"):  # a file beside the folders, and one that is no image
        (sample_copy / extra).write_bytes(b"x")
    spread = listings.open_prefix(str(sample_copy / "Training"), {}, EXTENSIONS)
    assert [unit.folder for unit in spread.files][:2] == ["", "Apple Braeburn"] and not spread.files[0].recursive
    rows, listed = worker_listed(spread, dask_cluster, tmp_path / "out")
    assert_same_listing(rows, listed, source.list_images(str(sample_copy / "Training"), {}, EXTENSIONS))
    assert listings.open_prefix(str(sample_copy), {}, EXTENSIONS, min_folders=16) is None  # two folders: the client lists them


@pytest.mark.slow
def test_a_prefix_on_s3_is_listed_by_the_workers_and_a_flat_one_split_by_key_ranges(bucket, s3_endpoint, dask_cluster, tmp_path):
    options = {"endpoint_url": s3_endpoint}
    spread = listings.open_prefix("s3://fruits/fruits-360/Training", options, EXTENSIONS, min_folders=1)
    rows, listed = worker_listed(spread, dask_cluster, tmp_path / "folders")
    assert_same_listing(rows, listed, source.list_images("s3://fruits/fruits-360/Training", options, EXTENSIONS))

    bucket.pipe({f"fruits/flat/{n:06d}.{'jpg' if n % 7 else 'txt'}": b"" for n in range(0, 2200, 2)})  # more than a page
    spread = listings.open_prefix("s3://fruits/flat", options, EXTENSIONS)
    ranges = [(unit.after, unit.upto) for unit in spread.files]
    assert len(ranges) >= 8 and ranges[0][0] is None and ranges[-1][1] is None
    assert all(upto == after for (_, upto), (after, _) in zip(ranges, ranges[1:]))  # every key in one range
    rows, listed = worker_listed(spread, dask_cluster, tmp_path / "flat")
    assert_same_listing(rows, listed, source.list_images("s3://fruits/flat", options, EXTENSIONS))


def test_cluster_plan_reads_the_number_of_images_from_an_inventory(tmp_path, capsys):
    rows = [{"bucket": "camera", "key": f"photos/{n:05d}.jpg", "version_id": None, "is_latest": True, "is_delete_marker": False,
             "size": 1, "last_modified_date": pd.Timestamp("2026-12-01", tz="UTC"), "e_tag": "e", "storage_class": "STANDARD"}
            for n in range(1234)]
    fs = source.open_url(str(tmp_path), {})[0]
    for fmt in ("csv", "parquet", "orc"):
        manifest = write_inventory(fs, str(tmp_path / fmt), rows, fmt)
        assert listings.count_keys(manifest, {}) == 1234
        assert abs(listings.open_listing(manifest, {}, EXTENSIONS, None).estimate - 1234) < 1234 * 0.2
    assert cli.main(["cluster", "plan", "cluster/local.yaml", "--images", manifest]) == 0
    assert "1,234 images" in capsys.readouterr().out


def planned(spread, address, out) -> tuple[listings.Partitions, list[int]]:
    """What `run` plans from a Spread: the partitions as the workers list them, and the order they were handed on in."""
    out_fs = source.open_url(str(out), {})[0]
    with Client(address) as client:
        plan = listings.plan(spread, client, out_fs, str(out), 4)
        order = [index for index, *_ in plan.ready]
        for future, result in as_completed(list(plan.pending), with_results=True):
            plan.add(future, result)
            order += [index for index, *_ in plan.ready]
            plan.ready.clear()
    assert listings.plan(spread, None, out_fs, str(out), 4).listed == plan.listed  # what --resume reads back
    return plan.listed, order


def output_rows(listed: listings.Partitions, out) -> list[str]:
    """The paths of the output's parts, one after another, as run_parts and sink.finish_partition make them."""
    out_fs, paths = source.open_url(str(out), {})[0], []
    for indices, low, high in listed.output_parts():
        rows = pd.concat([sink.partition_rows(out_fs, *listed.parts[i][:2]) for i in indices]).path
        paths += sorted(p for p in rows if (low is None or p >= low) and (high is None or p < high))
    return paths


def test_data_files_are_handed_on_in_order_as_listed_and_the_output_keeps_path_order_where_they_share_paths(dask_cluster, tmp_path):
    rows = [{"bucket": "camera", "key": f"photos/{n // 10:03d}/{n:05d}.jpg", "version_id": None, "is_latest": True,
             "is_delete_marker": False, "size": 1, "last_modified_date": pd.Timestamp("2026-12-01", tz="UTC"), "e_tag": f"e{n}",
             "storage_class": "STANDARD"} for n in range(90)]
    keys = [r["key"] for r in rows]
    fs = source.open_url(str(tmp_path), {})[0]
    apart = [r for three in zip(rows[60:], rows[:30], rows[30:60]) for r in three]  # data file i holds apart[i::3]: keys 60-89, 0-29, 30-59
    for name, inventory in (("shared", rows), ("apart", apart)):  # 3 data files each spanning every key, or a stretch each
        spread = listings.open_listing(write_inventory(fs, str(tmp_path / name), inventory, "csv", n_files=3), {}, EXTENSIONS, None)
        listed, order = planned(spread, dask_cluster, tmp_path / f"out-{name}")
        assert order == list(range(len(listed.parts))) and listed.images == 90  # each partition handed on once, in order
        assert output_rows(listed, tmp_path / f"out-{name}") == keys  # every key once, sorted across the output's parts
        if name == "apart":  # 8 partitions of 4 a data file; the output takes them whole, in the keys' order
            assert listed.outputs == [*range(8, 24), *range(0, 8)]
        else:  # cut into ranges of paths, each taking the rows of the partitions that reach into it
            assert any(not isinstance(part, int) for part in listed.outputs)
    nothing, order = planned(dataclasses.replace(spread, files=()), dask_cluster, tmp_path / "out-none")  # a manifest of no data file
    assert (nothing.parts, nothing.outputs, order) == ([], [], [])


@pytest.mark.slow
def test_a_run_featurizes_the_first_data_files_while_the_workers_list_the_others(bucket, s3_endpoint, dask_cluster, tmp_path):
    options = {"endpoint_url": s3_endpoint}
    rows = objects(bucket, "fruits")
    others = [rows[0] | {"key": f"archive/{n:07d}.jpg"} for n in range(100_000)]  # a data file long to list, none under the prefix
    fs = source.open_url(str(tmp_path), {})[0]
    manifest = write_inventory(fs, str(tmp_path / "inventory"), rows, "csv", chunks=[rows, others])
    settings = pipeline.settings(input=manifest, input_prefix="fruits-360", output=str(tmp_path / "out"), cluster=dask_cluster,
                                 weights="random", image_size=32, images_per_partition=16, storage_options=options)
    with Client(dask_cluster) as client, get_task_stream(client) as tasks:
        done = pipeline.run(settings, progress=False, say=lambda message: None)
    started = {prefix: [s["start"] for task in tasks.data if task["key"].startswith(prefix) for s in task["startstops"]
                        if s["action"] == "compute"] for prefix in ("featurize-", "list-")}
    ended = max(s["stop"] for task in tasks.data if task["key"].startswith("list-") for s in task["startstops"])
    assert min(started["featurize-"]) < ended  # the first partitions featurized before the last data file was listed
    images = pd.read_parquet(tmp_path / "out" / "images.parquet")
    listed = source.list_images("s3://fruits/fruits-360", options, EXTENSIONS)
    assert list(images.path) == list(listed.rows.path) and list(images.identity) == list(listed.rows.identity)
    assert done["counts"]["listed"] == len(listed.rows) and done["counts"]["partitions"] == -(-len(listed.rows) // 16)
