"""`update`: as images arrive, are replaced or deleted, the output follows without featurizing the rest again.

Growing a bucket in steps and updating after each gives the output of one full run: the same
rows in the same order, the same features (within the tolerance of images batched with other
neighbours) and the same PCA (exact: it goes on fitting with the new rows).
"""
import json
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image
from scipy.linalg import subspace_angles

import pipeline
from pipeline import cli
from pipeline.making import featurize, incremental, listings, sink
from pipeline.reading import index
from pipeline.config import SAMPLE_DIR, UsageError
from faults import interrupted_once_staged

LABELS = sorted(p.name for p in (SAMPLE_DIR / "Training").iterdir())
QUIET = dict(progress=False, say=lambda message: None)


def listing(*rows) -> pd.DataFrame:
    """A listing of (path, identity), sorted by path as source.list_images gives it."""
    return pd.DataFrame([(path, "label", "Training", identity) for path, identity in sorted(rows)],
                        columns=["path", "label", "split", "identity"])


def errors(*rows) -> pd.DataFrame:
    return pd.DataFrame([(path, identity, stage, "Error", "") for path, identity, stage in rows],
                        columns=["path", "identity", "stage", "error", "message"])


def output_rows(*rows, per_part: int = 1000) -> list[tuple[str, pa.Table]]:
    """An output's part files as an update reads them: the rows sorted by path, `per_part` to a part."""
    rows, schema = sorted(rows), pa.schema([("path", pa.string()), ("identity", pa.string())])
    return [(f"part-{i // per_part:05d}.parquet", pa.table(list(zip(*rows[i : i + per_part])) or [[], []], schema=schema))
            for i in range(0, max(len(rows), 1), per_part)]


def test_new_and_replaced_images_are_featurized_deleted_ones_dropped_the_rest_kept():
    changes = incremental.compare(
        listing(("same.jpg", "1"), ("new.jpg", "1"), ("replaced.jpg", "2")),
        output_rows(("same.jpg", "1"), ("replaced.jpg", "1"), ("deleted.jpg", "1")),
        errors(),
    )
    assert list(changes.featurize.path) == ["new.jpg", "replaced.jpg"]  # in path order, as listed
    assert changes.drop == {"replaced.jpg", "deleted.jpg"}
    assert (changes.added, changes.replaced, changes.removed) == (1, 1, 1)


def test_a_listing_written_by_the_workers_is_compared_stretch_by_stretch_with_the_same_changes(tmp_path):
    listed = [(f"{n:03d}.jpg", "2" if n % 11 == 0 else "1") for n in range(0, 90) if n % 7]  # some gone, some replaced
    old = [(f"{n:03d}.jpg", "1") for n in range(5, 80)]  # nothing before 005 nor after 079: new at both ends
    failed = errors(("001.jpg", "1", "decode"), ("002.jpg", "1", "read"), ("050.jpg", "1", "read"), ("077.jpg", "1", "decode"),
                    ("200.jpg", "1", "decode"))  # one error each way, in and out of the old parts' stretches
    whole = incremental.compare(listing(*listed), output_rows(*old, per_part=9), failed)
    fs = pipeline.source.open_url(str(tmp_path), {})[0]
    ranges = sink.write_partitions(fs, f"{tmp_path}/partitions.arrow", listing(*listed), 4)  # as the workers write them
    counts = [min(4, len(listed) - i) for i in range(0, len(listed), 4)]
    parts = listings.Partitions([(f"{tmp_path}/partitions.arrow", r, n) for r, n in zip(ranges, counts)], 0)
    for stretch in (1, 20, incremental.STRETCH):  # old rows compared at a time: a part, a few, all of them
        streamed = incremental.compare_listed(fs, parts, output_rows(*old, per_part=9), failed, stretch)
        assert list(streamed.featurize.path) == list(whole.featurize.path) and len(whole.featurize) > 10
        assert list(streamed.featurize.identity) == list(whole.featurize.identity)
        assert streamed.drop == whole.drop and streamed.parts == whole.parts
        assert list(streamed.kept_errors.path) == list(whole.kept_errors.path)
        assert (streamed.added, streamed.replaced, streamed.removed) == (whole.added, whole.replaced, whole.removed)


def test_an_image_that_failed_to_decode_is_redone_only_once_it_changes_one_that_failed_to_read_is_retried():
    changes = incremental.compare(
        listing(("broken.jpg", "1"), ("fixed.jpg", "2"), ("unreadable.jpg", "1")),
        output_rows(),
        errors(("broken.jpg", "1", "decode"), ("fixed.jpg", "1", "decode"), ("unreadable.jpg", "1", "read"),
               ("deleted.jpg", "1", "decode")),
    )
    assert list(changes.featurize.path) == ["fixed.jpg", "unreadable.jpg"]
    assert list(changes.kept_errors.path) == ["broken.jpg"]
    assert (changes.added, changes.replaced, changes.removed) == (0, 1, 1)


def test_each_part_of_the_output_is_told_where_it_starts_and_only_its_own_paths_to_drop():
    changes = incremental.compare(
        listing(("a", "1"), ("c", "1"), ("d", "1"), ("e", "2"), ("ee", "1"), ("f", "1"), ("g", "1"), ("h", "1"), ("z", "1")),
        output_rows(("a", "1"), ("b", "1"), ("c", "1"), ("d", "1"), ("e", "1"), ("f", "1"), ("g", "1"), ("h", "1"), per_part=3),
        errors(),
    )
    assert changes.parts == [incremental.OldPart("part-00000.parquet", "a", frozenset({"b"}), 2),
                             incremental.OldPart("part-00001.parquet", "d", frozenset({"e"}), 2),
                             incremental.OldPart("part-00002.parquet", "g", frozenset(), 2)]
    assert list(changes.featurize.path) == ["e", "ee", "z"]


def test_where_a_path_is_both_a_row_and_an_error_the_row_decides():
    kept = incremental.compare(listing(("a.jpg", "1")), output_rows(("a.jpg", "1")), errors(("a.jpg", "0", "read")))
    assert kept.featurize.empty and list(kept.kept_errors.path) == ["a.jpg"] and kept.removed == 0
    replaced = incremental.compare(listing(("a.jpg", "2")), output_rows(("a.jpg", "1")), errors(("a.jpg", "2", "decode")))
    assert list(replaced.featurize.path) == ["a.jpg"] and replaced.kept_errors.empty and replaced.replaced == 1


def test_the_part_by_part_comparison_agrees_with_a_plain_one_on_random_versions():
    rng = np.random.default_rng(0)
    for trial in range(20):
        paths = sorted({f"{rng.choice(['a', 'b', 'b b', 'é'])}/{rng.integers(10**4)}.jpg" for _ in range(rng.integers(1, 400))})
        last = {path: "1" for path in paths if rng.random() < 0.8}
        failed = {path: ("1", rng.choice(["read", "decode"])) for path in paths if path not in last and rng.random() < 0.3}
        now = {path: rng.choice(["1", "2"], p=[0.9, 0.1]) for path in paths if rng.random() < 0.9}
        changes = incremental.compare(listing(*now.items()), output_rows(*last.items(), per_part=int(rng.integers(1, 50))),
                                      errors(*((path, identity, stage) for path, (identity, stage) in failed.items())))

        new = {path for path in now if path not in last and path not in failed}
        replaced = {path for path in now if path in last and now[path] != last[path]} | \
                   {path for path in now if path in failed and now[path] != failed[path][0]}
        retried = {path for path in now if path in failed and failed[path][1] == "read"}
        gone = (set(last) | set(failed)) - set(now)
        assert list(changes.featurize.path) == sorted(new | replaced | retried), trial
        assert changes.drop == gone | replaced | retried, trial
        assert (changes.added, changes.replaced, changes.removed) == (len(new), len(replaced), len(gone)), trial
        assert sum(part.kept for part in changes.parts) == len(set(last) - gone - replaced), trial


def test_nothing_changed_means_nothing_to_do():
    same = incremental.compare(listing(("a.jpg", "1")), output_rows(("a.jpg", "1")), errors())
    assert same.nothing and same.featurize.empty


# --- on a real cluster and S3 server ------------------------------------------------------------------


def settings(output, cluster, endpoint, **options):
    return pipeline.settings(input="s3://fruits/growing", output=output, cluster=cluster, weights="random",
                             storage_options={"endpoint_url": endpoint}, **options)


def put_labels(s3, labels) -> None:
    for label in labels:
        s3.put(str(SAMPLE_DIR / "Training" / label) + "/", f"fruits/growing/Training/{label}/", recursive=True)


def read(s3, output) -> tuple[pd.DataFrame, dict]:
    output = output.removeprefix("s3://")
    s3.invalidate_cache()  # the output was rewritten by other processes
    rows = pd.read_parquet(f"{output}/images.parquet", filesystem=s3).sort_values("path", ignore_index=True)
    with s3.open(f"{output}/pca.npz") as f, np.load(f) as saved:
        return rows, {name: saved[name] for name in saved.files}


def in_file_order(s3, output) -> pd.DataFrame:
    """The rows of an output as its part files hold them, part after part."""
    parts = sorted(s3.find(f"{output}/images.parquet"))
    return pd.concat([pd.read_parquet(part, filesystem=s3, columns=["path"]) for part in parts], ignore_index=True)


def indexed(s3, output) -> tuple[index.SearchIndex, pd.DataFrame]:
    """The output's index as recognize loads it, and its rows as the part files hold them, with their PCA."""
    manifest = json.loads(s3.cat_file(f"{output}/manifest.json"))
    parts = sorted(s3.find(f"{output}/images.parquet"))
    rows = pd.concat([pd.read_parquet(part, filesystem=s3, columns=["path", "pca"]) for part in parts], ignore_index=True)
    return index.SearchIndex.load(s3, output, manifest["finished"]), rows


def assert_same_pca(pca, exact, k):
    ratios, expected = pca["explained_variance_ratio"][:k], exact["explained_variance_ratio"][:k]
    assert np.abs(ratios - expected).max() / expected.min() < 0.01
    assert np.degrees(subspace_angles(pca["components"][:k].T, exact["components"][:k].T).max()) < 0.1


@pytest.mark.slow
def test_a_bucket_grown_in_three_steps_and_updated_after_each_equals_one_full_run(s3, s3_endpoint, dask_cluster):
    steps = [LABELS[:5], LABELS[5:9], LABELS[9:]]
    put_labels(s3, steps[0])
    pipeline.run(settings("s3://fruits/grown", dask_cluster, s3_endpoint), **QUIET)
    for labels in steps[1:]:
        put_labels(s3, labels)
        manifest = pipeline.update(settings("s3://fruits/grown", dask_cluster, s3_endpoint), **QUIET)
        assert manifest["history"][-1]["featurized"] == sum(len(list((SAMPLE_DIR / "Training" / l).iterdir())) for l in labels)
    full = pipeline.run(settings("s3://fruits/full", dask_cluster, s3_endpoint), **QUIET)

    (rows, pca), (expected, exact) = read(s3, "fruits/grown"), read(s3, "fruits/full")
    pd.testing.assert_frame_equal(rows[["path", "label", "split", "identity"]], expected[["path", "label", "split", "identity"]])
    assert featurize.features_agree(np.stack(rows.features), np.stack(expected.features))
    assert list(in_file_order(s3, "fruits/grown").path) == sorted(rows.path)  # the new rows merged in, not appended
    assert [entry["command"] for entry in manifest["history"]] == ["run", "update", "update"]
    assert manifest["pca"]["n_samples"] == full["pca"]["n_samples"] == 129
    assert manifest["counts"]["listed"] == full["counts"]["listed"] and manifest["counts"]["written"] == full["counts"]["written"]
    assert manifest["pca"]["n_components"] == full["pca"]["n_components"]
    assert_same_pca(pca, exact, full["pca"]["n_components"])
    kept = pca["components"][: pca["n_components"]]
    np.testing.assert_allclose(np.stack(rows.pca), (np.stack(rows.features) - pca["mean"]) @ kept.T, rtol=1e-3, atol=1e-3)

    found, in_order = indexed(s3, "fruits/grown")  # the index holds every row, added ones too, in the new PCA
    assert found.rows["path"].to_pylist() == list(in_order.path) and manifest["index"]["rows"] == 129
    nearest = found.search(np.stack(in_order.pca), 1)
    assert nearest.rows[:, 0].tolist() == list(range(129)) and nearest.distances.max() < 1e-3


@pytest.mark.slow
def test_a_replaced_object_is_redone_a_deleted_one_removed_and_nothing_else_touched(s3, s3_endpoint, dask_cluster, capsys):
    put_labels(s3, LABELS[:3])
    output = "s3://fruits/out"
    pipeline.run(settings(output, dask_cluster, s3_endpoint), **QUIET)
    before, _ = read(s3, output)
    replaced, deleted = before.path[0], before.path[1]
    photo = Image.open(s3.open(f"fruits/growing/{replaced}")).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    with s3.open(f"fruits/growing/{replaced}", "wb") as f:
        photo.save(f, "JPEG")
    s3.rm(f"fruits/growing/{deleted}")

    manifest = pipeline.update(settings(output, dask_cluster, s3_endpoint), **QUIET)
    after, _ = read(s3, output)
    assert {k: manifest["history"][-1][k] for k in ("added", "replaced", "removed", "featurized")} == \
        {"added": 0, "replaced": 1, "removed": 1, "featurized": 1}
    assert list(after.path) == [path for path in before.path if path != deleted]
    old, new = before.set_index("path"), after.set_index("path")
    assert new.identity[replaced] != old.identity[replaced]
    assert not np.array_equal(new.features[replaced], old.features[replaced])
    untouched = [path for path in after.path if path != replaced]
    np.testing.assert_array_equal(np.stack(new.features[untouched]), np.stack(old.features[untouched]))
    found, in_order = indexed(s3, "fruits/out")  # the deleted image is no longer found, the replaced one is, as it is now
    assert deleted not in found.rows["path"].to_pylist() and found.rows["path"].to_pylist() == list(in_order.path)
    at = list(in_order.path).index(replaced)
    assert found.search(np.stack(in_order.pca[[at]]), 1).rows.tolist() == [[at]]

    assert cli.main(["update", "--output", output, "--cluster", dask_cluster, "--endpoint-url", s3_endpoint]) == 0
    again = json.loads(s3.cat("fruits/out/manifest.json"))
    assert again["history"] == manifest["history"] and not s3.exists("fruits/out/_staging")  # up to date: nothing written
    assert capsys.readouterr().out.splitlines() == [  # not the last update's summary again
        "up to date     nothing new, replaced or removed under s3://fruits/growing: nothing written", f"output         {output}"]


@pytest.mark.slow
def test_an_interrupted_update_leaves_the_output_as_it_was_and_running_it_again_finishes_it(
    faulty_s3, s3, tmp_path, dask_cluster
):
    put_labels(s3, LABELS[:2])
    output = tmp_path / "out"
    options = dict(images_per_partition=4, image_size=320)  # many small partitions: slow enough to stop
    first = pipeline.run(settings(str(output), dask_cluster, faulty_s3.endpoint, **options), **QUIET)
    before = set(s3.find("fruits/growing"))
    put_labels(s3, LABELS[2:6])
    new = sorted(set(s3.find("fruits/growing")) - before)
    held = faulty_s3.hold("GET", new[-1])  # the last partition cannot finish: the update is stopped mid-way
    command = [sys.executable, "-m", "pipeline", "update", "--output", str(output), "--endpoint-url", faulty_s3.endpoint, "--quiet"]
    returncode, stderr = interrupted_once_staged(command, output / "_staging" / "features", 2, held, "the update")
    assert returncode == 130 and "again" in stderr.splitlines()[-1]
    assert json.loads((output / "manifest.json").read_text())["finished"] == first["finished"]  # the old version, whole
    assert len(pd.read_parquet(output / "images.parquet")) == first["counts"]["written"]

    with pytest.raises(UsageError, match="holds an interrupted update: finish it with `python -m pipeline update"):
        pipeline.run(settings(str(output), dask_cluster, faulty_s3.endpoint, **options), resume=True, **QUIET)
    said = []
    finished = pipeline.update(settings(str(output), dask_cluster, faulty_s3.endpoint), progress=False, say=said.append)
    assert f"finishing the interrupted update of {output}" in said
    assert finished["counts"]["partitions_resumed"] >= 2 and finished["counts"]["written"] == first["counts"]["listed"] + len(new)
    rows = pd.read_parquet(output / "images.parquet")
    assert rows.path.is_unique and len(rows) == finished["counts"]["written"]


def test_updating_what_is_not_a_finished_output_says_what_to_do(tmp_path):
    with pytest.raises(UsageError, match="no manifest.json in .*: give the --output of a finished `pipeline run`"):
        pipeline.update(pipeline.settings(output=str(tmp_path)), **QUIET)
