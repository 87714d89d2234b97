"""End-to-end check of the pipeline on the real Fruits-360 apples through a real S3 API server (moto).

Uploads the images to a local moto server, runs `python -m pipeline run` on them as a user would,
reads the output back from S3 and checks it (rows, labels, errors, PCA against scikit-learn's exact
PCA), then times the bare model on the same images decoded in memory and prints a table.

    .venv/bin/python benchmarks/apples_s3.py                # all 2,134 images (a few minutes)
    .venv/bin/python benchmarks/apples_s3.py --limit 200    # a quick try

Exit code 0 if every check passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import pathlib
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "fruits-360-apples"
BUCKET, PREFIX, OUTPUT = "fruits", "fruits-360", "out"
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}
IMAGE_SIZE, BATCH_SIZE, SEED = 224, 32, 0
PIPELINE_TIMEOUT_S = 3600
# TensorFlow's C++ start-up chatter (oneDNN, CUDA, CPU features), left out of the stderr shown.
TF_NOISE = ("I0000 ", "W0000 ", "E0000 ", "WARNING: All log messages before absl",
            "To enable the following instructions")

# Fake credentials before boto/s3fs/moto are imported, so that this process, the pipeline
# subprocess and its Dask workers all see them (and never a real account's).
os.environ.update(FAKE_AWS)
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
    os.environ.pop(_name, None)

import numpy as np  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=pathlib.Path, default=DEFAULT_IMAGES,
                        help=f"folder of images to upload (default {DEFAULT_IMAGES})")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (sorted by path)")
    parser.add_argument("--model", default="mobilenet_v2", help="CNN of the pipeline and the bare model (default mobilenet_v2)")
    return parser.parse_args(argv)


def select_files(folder: pathlib.Path, limit: int | None) -> tuple[list[str], list[str]]:
    """Relative paths of the images to use (sorted, first `limit`) and of the other files (uploaded too)."""
    if not folder.is_dir():
        sys.exit(f"error: no image folder at {folder} (give --images PATH)")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    images = [f for f in files if f.lower().endswith((".jpg", ".jpeg"))]
    others = [f for f in files if f not in set(images)]
    if limit is not None:
        images = images[:limit]
    if not images:
        sys.exit(f"error: no .jpg images under {folder}")
    return images, others


def start_s3() -> tuple[object, str]:
    """A moto S3 API server on a free loopback port, and its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def s3_filesystem(endpoint: str):
    """An s3fs filesystem on the moto endpoint."""
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint)


def upload(fs, folder: pathlib.Path, relative: list[str]) -> float:
    """Create the bucket and upload the files under fruits-360/ with their relative keys; returns seconds."""
    started = time.perf_counter()
    fs.mkdir(BUCKET)
    fs.put([str(folder / r) for r in relative], [f"{BUCKET}/{PREFIX}/{r}" for r in relative])
    seconds = time.perf_counter() - started
    stored = fs.find(f"{BUCKET}/{PREFIX}")
    if len(stored) != len(relative):
        sys.exit(f"error: uploaded {len(relative)} files but the bucket lists {len(stored)}")
    return seconds


def tree_rss(process) -> int:
    """Resident bytes of a process and all its descendants now."""
    import psutil

    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def watch_peak_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    """Poll the process tree's RSS until `stop`, keeping the maximum in peak[0]."""
    import psutil

    try:
        process = psutil.Process(pid)
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(process))
            stop.wait(0.2)
    except psutil.NoSuchProcess:
        pass


def pipeline_command(endpoint: str, model: str) -> list[str]:
    """The command line a user would type, with this interpreter."""
    return [
        sys.executable, "-m", "pipeline", "run",
        "--input", f"s3://{BUCKET}/{PREFIX}", "--output", f"s3://{BUCKET}/{OUTPUT}",
        "--endpoint-url", endpoint, "--cluster", "local", "--model", model,
        "--weights", "random", "--n-components", "0.95", "--json",
    ]


def run_pipeline(endpoint: str, model: str) -> dict:
    """Run `python -m pipeline run` on the bucket as a user would; wall seconds, peak RSS, manifest, stderr."""
    command = pipeline_command(endpoint, model)
    stop, peak = threading.Event(), [0]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    watcher = threading.Thread(target=watch_peak_rss, args=(process.pid, stop, peak), daemon=True)
    watcher.start()
    try:
        stdout, stderr = process.communicate(timeout=PIPELINE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    stop.set()
    watcher.join()
    try:
        manifest = json.loads(stdout) if process.returncode == 0 else None
    except json.JSONDecodeError:
        manifest = None
    return {"command": command, "rc": process.returncode, "seconds": seconds, "peak_rss": peak[0],
            "manifest": manifest, "stdout": stdout, "stderr": stderr}


def show_stderr(stderr: str, last: int = 20) -> None:
    """The pipeline's stderr without TensorFlow's start-up chatter (its last lines)."""
    lines = stderr.strip().splitlines()
    kept = [line for line in lines if not line.startswith(TF_NOISE)]
    if kept:
        print(f"pipeline stderr ({len(lines) - len(kept)} TensorFlow start-up lines hidden):\n  "
              + "\n  ".join(kept[-last:]), flush=True)


def read_output(fs) -> dict:
    """images.parquet, errors.parquet, pca.npz and manifest.json, read back from the bucket."""
    import pyarrow.parquet as pq

    out = f"{BUCKET}/{OUTPUT}"
    with np.load(io.BytesIO(fs.cat_file(f"{out}/pca.npz"))) as saved:
        pca = {name: saved[name] for name in saved.files}
    return {
        "images": pq.read_table(f"{out}/images.parquet", filesystem=fs),
        "errors": pq.read_table(f"{out}/errors.parquet", filesystem=fs),
        "pca": pca,
        "manifest": json.loads(fs.cat_file(f"{out}/manifest.json")),
        "leftovers": fs.find(f"{out}/_staging"),
    }


def check_table(output: dict, images: list[str], n_features: int) -> list[tuple[str, str, bool]]:
    """Checks of images.parquet and errors.parquet: (name, value, ok) rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table, errors = output["images"], output["errors"]
    expected_labels = sorted({path.split("/")[-2] for path in images})
    paths = table["path"].to_pylist() if "path" in table.column_names else []
    labels = table["label"].to_pylist() if "label" in table.column_names else []
    splits = set(table["split"].to_pylist()) if "split" in table.column_names else set()
    columns = ["path", "label", "split", "features", "pca"]
    k = output["pca"]["components"].shape[0]
    checks = [
        ("columns", ", ".join(table.column_names), table.column_names == columns),
        ("rows", f"{table.num_rows} (expected {len(images)})", table.num_rows == len(images)),
        ("paths = uploaded images", f"{len(set(paths) & set(images))} of {len(images)} match",
         sorted(paths) == sorted(images)),
        ("distinct labels", f"{len(set(labels))} (expected {len(expected_labels)})", sorted(set(labels)) == expected_labels),
        ("label = folder name (spaces kept)", ", ".join(sorted(set(labels))[:3]) + (" ..." if len(set(labels)) > 3 else ""),
         bool(paths) and all(label == path.split("/")[-2] for path, label in zip(paths, labels))),
        ("split", ", ".join(sorted(map(str, splits))), splits == {"Training"}),
        ("errors.parquet rows", str(errors.num_rows), errors.num_rows == 0),
        ("_staging removed", f"{len(output['leftovers'])} files left", not output["leftovers"]),
    ]
    for name, width in (("features", n_features), ("pca", k)):
        if name not in table.column_names:
            checks.append((f"{name} list<float32>[{width}]", "missing", False))
            continue
        column = table[name]
        lengths = pc.list_value_length(column)
        ok = column.type == pa.list_(pa.float32()) and pc.min(lengths).as_py() == pc.max(lengths).as_py() == width
        checks.append((f"{name} list<float32>[{width}]", f"{column.type}, {pc.min(lengths)}..{pc.max(lengths)} values", ok))
    return checks


def check_pca(output: dict, n_features: int) -> list[tuple[str, str, bool]]:
    """The written PCA against scikit-learn's exact PCA of the written features: (name, value, ok) rows."""
    from scipy.linalg import subspace_angles
    from sklearn.decomposition import PCA

    from pipeline.sink import matrix

    table, saved = output["images"], output["pca"]
    features = matrix(table["features"], n_features).astype(np.float64)
    components, mean = saved["components"].astype(np.float64), saved["mean"].astype(np.float64)
    ratio = saved["explained_variance_ratio"]
    k = components.shape[0]
    exact = PCA(n_components=k, svd_solver="full").fit(features)
    ratio_diff = float(np.max(np.abs(ratio[:k] - exact.explained_variance_ratio_) / exact.explained_variance_ratio_))
    top = min(10, k)
    angle_top = float(np.degrees(subspace_angles(components[:top].T, exact.components_[:top].T).max()))
    angle_k = float(np.degrees(subspace_angles(components.T, exact.components_.T).max()))
    expected = (features - mean) @ components.T
    written = matrix(table["pca"], k).astype(np.float64)
    projection_diff = float(np.abs(written - expected).max() / np.abs(expected).max())
    kept = float(ratio[:k].sum())
    return [
        ("PCA components k", f"{k} keep {kept:.2%} of the variance (sklearn: {exact.explained_variance_ratio_.sum():.2%})",
         kept >= 0.95 and (k == 1 or ratio[: k - 1].sum() < 0.95)),
        ("PCA n_samples", f"{int(saved['n_samples'])} (rows {len(features)})", int(saved["n_samples"]) == len(features)),
        ("PCA mean vs features mean", f"max abs diff {np.abs(mean - features.mean(0)).max():.2e}",
         np.allclose(mean, features.mean(0), rtol=1e-4, atol=1e-4 * np.abs(features).max())),
        ("explained_variance_ratio vs sklearn", f"max rel diff {ratio_diff:.2e} over {k}", ratio_diff < 1e-3),
        (f"largest angle, top-{top} subspace", f"{angle_top:.4f} deg", angle_top < 1.0),
        (f"largest angle, top-{k} subspace", f"{angle_k:.4f} deg", angle_k < 1.0),
        ("pca column = (features-mean) @ components.T", f"max diff / max |value| {projection_diff:.2e}", projection_diff < 1e-3),
    ]


def check_manifest(run: dict, output: dict, images: list[str], others: list[str]) -> list[tuple[str, str, bool]]:
    """The manifest printed on stdout against what was uploaded and the one written to S3."""
    manifest = run["manifest"] or {}
    counts = manifest.get("counts", {})
    return [
        ("pipeline exit code", str(run["rc"]), run["rc"] == 0),
        ("manifest counts", f"listed {counts.get('listed')}, written {counts.get('written')}, failed "
         f"{counts.get('failed')}, non-images skipped {counts.get('skipped_non_images')}",
         counts.get("listed") == counts.get("written") == len(images) and counts.get("failed") == 0
         and counts.get("skipped_non_images") == len(others)),
        ("manifest stdout = manifest.json", "same" if manifest == output["manifest"] else "differ", manifest == output["manifest"]),
    ]


def decode_all(folder: pathlib.Path, images: list[str]) -> list[np.ndarray]:
    """Every image decoded in memory exactly as the workers decode them."""
    from pipeline import images as decoding

    return [decoding.decode((folder / path).read_bytes(), IMAGE_SIZE) for path in images]


def time_bare_model(arrays: list[np.ndarray], model: str) -> float:
    """Seconds to featurize all `arrays` with the pipeline's Featurizer, after one warm-up batch."""
    from pipeline.featurize import Featurizer, ModelKey, configure_tensorflow

    configure_tensorflow()
    featurizer = Featurizer(ModelKey(model, IMAGE_SIZE, "random", SEED), {})
    featurizer(arrays[:BATCH_SIZE], BATCH_SIZE)
    started = time.perf_counter()
    featurizer(arrays, BATCH_SIZE)
    return time.perf_counter() - started


def speed_rows(n: int, bare_s: float, run: dict) -> list[tuple[str, int, float, float, float]]:
    """Rows of the speed table: (what, images, seconds, images/s, ratio to the bare model)."""
    bare = n / bare_s
    rows = [("bare model (decoded in memory)", n, bare_s, bare, 1.0),
            ("pipeline end to end (moto S3 → parquet)", n, run["seconds"], n / run["seconds"], n / run["seconds"] / bare)]
    timings = (run["manifest"] or {}).get("timings_s", {})
    if "featurize" in timings:
        s = timings["featurize"]
        rows.append(("  of which featurize stage (manifest)", n, s, n / s, n / s / bare))
    return rows


def print_report(speeds: list, checks: list, run: dict, upload_s: float, n_uploaded: int) -> None:
    """The speed table, the run's details and the checks, as plain text."""
    print()
    print(f"{'':42} {'images':>7} {'seconds':>8} {'images/s':>9} {'ratio':>6}")
    for what, n, seconds, speed, ratio in speeds:
        print(f"{what:42} {n:>7} {seconds:>8.1f} {speed:>9.1f} {ratio:>6.2f}")
    print()
    timings = (run["manifest"] or {}).get("timings_s", {})
    print(f"upload           {n_uploaded} files in {upload_s:.1f} s")
    workers = (run["manifest"] or {}).get("worker_seconds", {})
    print("pipeline stages  " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    print("worker seconds   " + ", ".join(f"{k} {v:.1f} s" for k, v in workers.items()) + " (summed over tasks)")
    if run["peak_rss"]:
        print(f"peak RSS         {run['peak_rss'] / 2**30:.2f} GiB (pipeline process and its Dask workers)")
    print()
    width = max(len(name) for name, _, _ in checks)
    for name, value, ok in checks:
        print(f"{'OK  ' if ok else 'FAIL'}  {name:{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    """Upload, run, read back, check, time the bare model, print; 1 if a check fails."""
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    from pipeline.featurize import MODELS

    if args.model not in MODELS:
        sys.exit(f"error: unknown model {args.model!r}: choose one of {', '.join(MODELS)}")
    n_features = MODELS[args.model].n_features
    folder = args.images.resolve()
    images, others = select_files(folder, args.limit)
    server, endpoint = start_s3()
    try:
        fs = s3_filesystem(endpoint)
        print(f"moto S3 at {endpoint}; uploading {len(images)} images and {len(others)} other files", flush=True)
        upload_s = upload(fs, folder, images + others)
        print(f"running: {' '.join(repr(a) if ' ' in a else a for a in pipeline_command(endpoint, args.model))}", flush=True)
        run = run_pipeline(endpoint, args.model)
        print(f"pipeline finished in {run['seconds']:.1f} s (exit code {run['rc']})", flush=True)
        show_stderr(run["stderr"])
        if run["rc"] != 0 or run["manifest"] is None:
            print(f"FAIL  the pipeline failed (exit code {run['rc']}); stdout:\n{run['stdout'][-3000:]}")
            return 1
        output = read_output(fs)
        checks = check_manifest(run, output, images, others) + check_table(output, images, n_features)
        checks += check_pca(output, n_features)
    finally:
        server.stop()
    print(f"bare model: decoding {len(images)} images, then featurizing them in batches of {BATCH_SIZE}", flush=True)
    bare_s = time_bare_model(decode_all(folder, images), args.model)
    print_report(speed_rows(len(images), bare_s, run), checks, run, upload_s, len(images) + len(others))
    return 0 if all(ok for _, _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
