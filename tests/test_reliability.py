"""Nothing lost, nothing duplicated: broken and odd files, failing storage, lost workers, reruns.

Every image listed ends up exactly once in the output or in the errors table with its reason.
"""
import concurrent.futures
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from distributed import Client, LocalCluster
from PIL import Image
from scipy.linalg import subspace_angles

import pipeline
from pipeline.making import featurize
from pipeline.config import SAMPLE_DIR, UsageError

pytestmark = pytest.mark.slow
ODD = "Training/Odd files"


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def odd_files() -> dict[str, tuple[bytes, str]]:
    """Relative path → (content, what the run must make of it: "row", "skipped" or the error stage)."""
    photo = (SAMPLE_DIR / "Training" / "Apple Red 1").glob("*.jpg").__next__().read_bytes()
    fruit = Image.open(io.BytesIO(photo))
    rotated = fruit.copy()
    exif = rotated.getexif()
    exif[0x0112] = 6
    frames = [fruit, fruit.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return {
        f"{ODD}/grayscale.png": (encode(fruit.convert("L"), "PNG"), "row"),
        f"{ODD}/palette.png": (encode(fruit.convert("P"), "PNG"), "row"),
        f"{ODD}/rgba.png": (encode(fruit.convert("RGBA"), "PNG"), "row"),
        f"{ODD}/cmyk.jpg": (encode(fruit.convert("CMYK"), "JPEG"), "row"),
        f"{ODD}/16-bit.png": (encode(Image.fromarray(np.full((50, 50), 40000, np.uint16)), "PNG"), "row"),
        f"{ODD}/animated.gif": (encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), "row"),
        f"{ODD}/animated.webp": (encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]), "row"),
        f"{ODD}/exif-rotated.jpg": (encode(rotated, "JPEG", exif=exif), "row"),
        f"{ODD}/one-pixel.png": (encode(Image.new("RGB", (1, 1), (200, 0, 0)), "PNG"), "row"),
        f"{ODD}/10000x10000.jpg": (encode(Image.new("L", (10_000, 10_000), 90), "JPEG"), "row"),
        f"{ODD}/a copy of the photo.jpg": (photo, "row"),
        f"{ODD}/sp ace#hash%25percent+plus'quote\"double.jpg": (photo, "row"),
        "Training/Яблоко 苹果/ünïcødé ☺.jpg": (photo, "row"),
        f"{ODD}/zero-bytes.jpg": (b"", "decode"),
        f"{ODD}/truncated.jpg": (photo[: len(photo) // 3], "decode"),
        f"{ODD}/text-named-like-an-image.png": (b"these are not the pixels you are looking for", "decode"),
        f"{ODD}/10000x10000.png": (encode(Image.new("L", (10_000, 10_000), 90), "PNG"), "decode"),
        f"{ODD}/notes.txt": (b"not an image", "skipped"),
        f"{ODD}/.DS_Store": (b"\0\0\0\1Bud1", "skipped"),
        "README": (b"about these files", "skipped"),
    }


@pytest.fixture(scope="module")
def corpus():
    return odd_files()


def run(input, output, cluster, *, resume=False, overwrite=False, **options):
    settings = pipeline.settings(input=str(input), output=str(output), cluster=cluster, weights="random", **options)
    return pipeline.run(settings, resume=resume, overwrite=overwrite, progress=False, say=lambda message: None)


def read_output(output, **storage) -> tuple[pd.DataFrame, pd.DataFrame]:
    options = {"storage_options": storage} if storage else {}
    rows = pd.read_parquet(f"{output}/images.parquet", **options)
    return rows, pd.read_parquet(f"{output}/errors.parquet", **options)


def assert_every_file_accounted_for(rows, errors, manifest, expected: dict[str, str], listed: int):
    assert rows.path.is_unique and errors.path.is_unique
    assert set(rows.path) == {path for path, outcome in expected.items() if outcome == "row"}
    assert dict(zip(errors.path, errors.stage)) == {
        path: outcome for path, outcome in expected.items() if outcome not in ("row", "skipped")
    }
    counts = manifest["counts"]
    assert counts["written"] + counts["failed"] + counts["skipped_non_images"] == listed
    assert counts["skipped_non_images"] == sum(outcome == "skipped" for outcome in expected.values())


def test_odd_and_broken_files_in_a_folder_each_become_a_row_or_an_error(corpus, tmp_path, dask_cluster):
    for path, (content, _) in corpus.items():
        (tmp_path / "in" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / path).write_bytes(content)
    manifest = run(tmp_path / "in", tmp_path / "out", dask_cluster)

    rows, errors = read_output(tmp_path / "out")
    assert_every_file_accounted_for(rows, errors, manifest, {p: o for p, (_, o) in corpus.items()}, len(corpus))
    reasons = dict(zip(errors.path, errors.error))
    assert reasons[f"{ODD}/10000x10000.png"] == "DecompressionBombError"
    assert reasons[f"{ODD}/zero-bytes.jpg"] == "UnidentifiedImageError"
    assert set(rows.label) == {"Odd files", "Яблоко 苹果"}
    assert rows.features.map(lambda f: np.isfinite(f).all()).all()


def test_on_s3_odd_keys_and_an_object_deleted_after_listing_are_accounted_for(corpus, s3, faulty_s3, dask_cluster):
    s3.rm("fruits/fruits-360", recursive=True)
    for path, (content, _) in corpus.items():
        s3.pipe_file(f"fruits/odd/{path}", content)
    vanishing = f"{ODD}/a copy of the photo.jpg"
    faulty_s3.before_first_read.append(lambda: s3.rm_file(f"fruits/odd/{vanishing}"))
    options = {"endpoint_url": faulty_s3.endpoint}
    manifest = run("s3://fruits/odd", "s3://fruits/out", dask_cluster, storage_options=options)

    rows, errors = read_output("s3://fruits/out", **options)
    expected = {p: o for p, (_, o) in corpus.items()} | {vanishing: "read"}
    assert_every_file_accounted_for(rows, errors, manifest, expected, len(corpus))
    assert dict(zip(errors.path, errors.error))[vanishing] == "FileNotFoundError"


def test_transient_storage_errors_are_retried_and_permanent_ones_recorded_at_once(faulty_s3, dask_cluster):
    photos = sorted(path.relative_to(SAMPLE_DIR).as_posix() for path in SAMPLE_DIR.rglob("*.jpg"))
    key = lambda path: f"fruits/fruits-360/{path}"
    faulty_s3.fail("GET", key(photos[0]), 503, 500, 503)  # throttled, then a server error, then throttled
    faulty_s3.fail("GET", key(photos[1]), "reset")  # connection reset by peer
    faulty_s3.fail_always("GET", key(photos[2]), 403)  # access denied: no retry helps
    faulty_s3.fail("PUT", "fruits/out/_staging/features/part-00000.parquet", 503)  # writes are retried too
    options = {"endpoint_url": faulty_s3.endpoint}
    manifest = run("s3://fruits/fruits-360", "s3://fruits/out", dask_cluster, storage_options=options)

    rows, errors = read_output("s3://fruits/out", **options)
    assert {photos[0], photos[1]} <= set(rows.path) and len(rows) == len(photos) - 1
    assert errors[["path", "stage", "error"]].to_dict("records") == [
        {"path": photos[2], "stage": "read", "error": "PermissionError"}
    ]
    assert faulty_s3.requests[("GET", key(photos[0]))] == 4 and faulty_s3.requests[("GET", key(photos[1]))] == 2
    assert faulty_s3.requests[("GET", key(photos[2]))] == 1
    assert manifest["counts"]["failed"] == 1


def test_rerunning_onto_an_output_is_refused_unless_asked_to_overwrite_or_resume(tmp_path, dask_cluster):
    first = run(SAMPLE_DIR, tmp_path, dask_cluster, n_components=5)
    with pytest.raises(UsageError, match="already holds a finished output: pass --overwrite .* `python -m pipeline update"):
        run(SAMPLE_DIR, tmp_path, dask_cluster, n_components=7)
    again = run(SAMPLE_DIR, tmp_path, dask_cluster, n_components=7, overwrite=True)
    assert again["pca"]["n_components"] == 7 and first["started"] != again["started"]
    resumed = pipeline.run(pipeline.settings(input=str(SAMPLE_DIR), output=str(tmp_path)), resume=True, say=print)
    assert resumed == json.loads(json.dumps(again, default=str))  # complete already: nothing to do
    assert sorted(p.name for p in tmp_path.iterdir()) == ["errors.parquet", "images.parquet", "index", "manifest.json", "pca.npz"]


# --- interrupted runs, lost workers, determinism ----------------------------------------------------

SMALL_PARTITIONS = dict(images_per_partition=4, image_size=320, n_components=10)  # 33 partitions, slow enough to stop


@pytest.fixture(scope="module")
def reference(dask_cluster, tmp_path_factory):
    """The rows of one uninterrupted run on the sample, and its PCA."""
    out = tmp_path_factory.mktemp("reference")
    run(SAMPLE_DIR, out, dask_cluster, **SMALL_PARTITIONS)
    return read_output(out)[0], np.load(out / "pca.npz")


def assert_same_output(out, reference, same_partitions: bool = True):
    """The same rows and PCA as the reference run: bit-identical features where the partitions were the same,
    within the promised tolerance where images shared their batches with others."""
    rows, pca = read_output(out)[0], np.load(out / "pca.npz")
    expected_rows, expected_pca = reference
    pd.testing.assert_frame_equal(rows[["path", "label", "split"]], expected_rows[["path", "label", "split"]])
    features, expected = np.stack(rows.features), np.stack(expected_rows.features)
    if same_partitions:
        np.testing.assert_array_equal(features, expected)
    else:
        assert featurize.features_agree(features, expected), np.abs(features - expected).max()
    np.testing.assert_allclose(pca["explained_variance_ratio"], expected_pca["explained_variance_ratio"], rtol=1e-3, atol=1e-9)
    k = int(expected_pca["n_components"])
    assert np.degrees(subspace_angles(pca["components"][:k].T, expected_pca["components"][:k].T).max()) < 0.1


def cli(input, out, *args) -> list[str]:
    """The command line of `python -m pipeline run` with the small partitions of these tests."""
    options = [f"--{name.replace('_', '-')}={value}" for name, value in SMALL_PARTITIONS.items()]
    return [sys.executable, "-m", "pipeline", "run", "--input", input, "--output", str(out),
            "--weights", "random", "--quiet", *options, *args]


def wait_for_staged_partitions(out, at_least: int, running, timeout: float = 240) -> int:
    """Wait until the run in progress has staged `at_least` partitions; how many it has."""
    folder = out / "_staging" / "features"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        staged = len(list(folder.glob("part-*.parquet"))) if folder.exists() else 0
        if staged >= at_least:
            return staged
        assert running(), "the run ended before it could be interrupted"
        time.sleep(0.01)
    pytest.fail(f"no {at_least} partitions staged in {timeout} s")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_an_interrupted_run_shows_no_output_and_resumes_to_the_same_result(stop, faulty_s3, tmp_path, reference):
    out, photos = tmp_path / "out", sorted(reference[0].path)
    held = faulty_s3.hold("GET", f"fruits/fruits-360/{photos[8 * 4]}")  # partition 8 cannot finish: the run is stopped mid-way
    input = ["s3://fruits/fruits-360", out, "--endpoint-url", faulty_s3.endpoint]
    # in its own process group, as a terminal runs it: Ctrl-C signals the whole group
    interrupted = subprocess.Popen(cli(*input), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_staged_partitions(out, 3, lambda: interrupted.poll() is None)
        os.killpg(interrupted.pid, stop)
        _, stderr = interrupted.communicate(timeout=120)
    finally:
        held.set()
    if stop == signal.SIGINT:
        assert interrupted.returncode == 130 and "--resume" in stderr.splitlines()[-1]
    staged_files = list((out / "_staging" / "features").glob("part-*.parquet"))
    staged, staged_images = len(staged_files), sum(pq.read_metadata(f).num_rows for f in staged_files)  # every image reads
    assert 3 <= staged < 33
    assert sorted(p.name for p in out.iterdir()) == ["_staging"]  # nothing that looks like an output

    refused = subprocess.run(cli(*input), capture_output=True, text=True)
    assert refused.returncode == 2 and "already holds an interrupted run" in refused.stderr
    resumed = subprocess.run(cli(*input, "--resume", "--json"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads(resumed.stdout)
    assert manifest["counts"]["partitions_resumed"] == staged
    entry, = manifest["history"]  # what the resumed run featurized itself: the partitions it had not staged
    assert entry["featurized"] == len(photos) - staged_images and entry["listed"] == len(photos)
    assert_same_output(out, reference)


@pytest.fixture(scope="module")
def two_workers(aws_env):
    """A LocalCluster of two single-threaded worker processes (the other tests' cluster has one of two threads)."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


def test_rows_and_features_do_not_depend_on_workers_or_partitions(two_workers, tmp_path, reference):
    run(SAMPLE_DIR, tmp_path, two_workers, **SMALL_PARTITIONS | {"images_per_partition": 50})
    assert_same_output(tmp_path, reference, same_partitions=False)


def test_a_worker_killed_mid_run_loses_and_duplicates_no_row(two_workers, tmp_path, reference):
    with Client(two_workers) as client, concurrent.futures.ThreadPoolExecutor(1) as background:
        pids = client.run(os.getpid)
        running = background.submit(run, SAMPLE_DIR, tmp_path, two_workers, **SMALL_PARTITIONS)
        wait_for_staged_partitions(tmp_path, 1, lambda: not running.done())
        os.kill(pids[sorted(pids)[0]], signal.SIGKILL)
        manifest = running.result(timeout=600)
        assert set(client.run(os.getpid).values()) != set(pids.values())  # one worker was lost and replaced
    assert manifest["counts"]["written"] == 129 and manifest["counts"]["failed"] == 0
    assert manifest["counts"]["partitions_redone"] >= 1  # what the lost worker held was done again elsewhere
    assert_same_output(tmp_path, reference)


def test_credentials_never_appear_in_output_logs_report_or_error_messages(faulty_s3, s3, aws_env, tmp_path):
    key, secret = aws_env
    s3.pipe_file("fruits/fruits-360/Training/Odd files/broken.jpg", b"\xff\xd8 broken")
    faulty_s3.fail_always("GET", "fruits/fruits-360/Training/Odd files/broken.jpg", 403)
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env |= {"DASK_PIPELINE__STORAGE_OPTIONS__KEY": key, "DASK_PIPELINE__STORAGE_OPTIONS__SECRET": secret}
    report = tmp_path / "report.html"
    command = [sys.executable, "-m", "pipeline", "run", "--input", "s3://fruits/fruits-360", "--weights", "random",
               "--endpoint-url", faulty_s3.endpoint, "--report", str(report)]
    done = subprocess.run([*command, "--output", "s3://fruits/out", "--json"], capture_output=True, text=True, env=env)
    failed = subprocess.run([*command, "--output", "s3://no-such-bucket/out"], capture_output=True, text=True, env=env)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"]["failed"] == 1  # the credentials were used, and an error recorded
    assert failed.returncode == 2 and "cannot write to output s3://no-such-bucket/out" in failed.stderr
    written = [s3.cat_file(path) for path in s3.find("fruits/out")]
    for text in [done.stdout, done.stderr, failed.stderr, report.read_text(), *(w.decode("latin-1") for w in written)]:
        assert key not in text and secret not in text
