"""Throughput and memory: the bare model, the pipeline from an S3 API server, and the PySpark peer.

In one run, on the same machine and the same images, prints one table:

  bare model      the pipeline's CNN on images already decoded in memory (benchmarks/bare_model.py)
  pipeline        `python -m pipeline run` from a moto S3 server on loopback to parquet on it
  PySpark peer    the same job the Spark way (benchmarks/spark_peer.py), from a local folder

with images, seconds, images/s, ratio to the bare model and peak memory (RSS of the process and
all its children), then where the pipeline's time went, the peak memory of each of its processes,
and checks of its output (rows, labels, PCA against scikit-learn's exact PCA, the PySpark peer's
features). With --count N the images are N made from the apples (benchmarks/make_images.py), and
the pipeline also runs on the first --baseline of them, to compare each process's peak memory.

    .venv/bin/python benchmarks/throughput.py                 # the 2,134 apples (about 4 minutes on 2 cores)
    .venv/bin/python benchmarks/throughput.py --count 20000   # 20,000 made from them (about 25 minutes)
    .venv/bin/python benchmarks/throughput.py --count 20000 --local --no-s3   # from a local folder only (about 12 minutes)
    .venv/bin/python benchmarks/throughput.py --limit 300 --no-spark   # a quick try
    .venv/bin/python benchmarks/throughput.py --count 20000 --local --no-spark --image-size 32   # the data path
    .venv/bin/python benchmarks/throughput.py --count 5000 --local --no-s3 --backend tensorflow   # one engine

With a list of engines (the default: onnxruntime,tensorflow) the first runs every part as above,
and each other adds its bare model and, with --local, its pipeline from the local folder, in the
same sitting; a table then sets them side by side (with the ONNX Runtime goals), and a check
compares each one's features with the first's. ONNX Runtime's network is exported first, timed,
into the sitting's own cache.

With --image-size 32 the model is cheap and everything around it (read, decode, stage,
scheduling) is what limits the pipeline: the "data path" lines say how many cores a worker
needs per 1,000 images/s of it, which is what a GPU worker must bring.

Needs the `test` extra (moto) and, for the PySpark peer, the `bench` extra (pyspark) and Java 17+.
Exit code 0 if every check passes, 1 otherwise (a missed speed goal is reported, not a failure).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "fruits-360-apples"
BUCKET, OUTPUT = "fruits", "out"
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}
TIMEOUT_S = 3 * 3600
GOALS = {"vs bare": 0.9, "vs spark": 3.0, "local vs spark": 1.15, "onnxruntime vs spark": 2.5, "memory": 1.25, "gpu stage": 0.8, "gpu busy": 80, "gpu rest": 20}
# Start-up chatter of TensorFlow (C++ logs) and Spark (log4j, JVM), left out of the stderr shown.
NOISE = ("I0000 ", "W0000 ", "E0000 ", "WARNING: All log messages before absl", "To enable the following instructions",
         "WARNING: Using incubator", "Using Spark's default", "Setting default log level", "To adjust logging level",
         "netlib-", "  require_minimum_pandas_version")

# Fake credentials before boto/s3fs/moto are imported, so that this process, the pipeline
# subprocess and its Dask workers all see them (and never a real account's).
os.environ.update(FAKE_AWS)
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
    os.environ.pop(_name, None)

import numpy as np  # noqa: E402

from benchmarks import make_images  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=pathlib.Path, default=DEFAULT_IMAGES,
                        help=f"folder of images (default {DEFAULT_IMAGES})")
    parser.add_argument("--count", type=int, default=None,
                        help="make this many images from --images with flips, rotations and crops, and use them")
    parser.add_argument("--baseline", type=int, default=2000,
                        help="with --count: also run the pipeline on this many, to compare peak memory (default 2000)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (sorted by path)")
    parser.add_argument("--model", default="mobilenet_v2", help="CNN of all three (default mobilenet_v2)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="model input side (default 224); 32 makes the model cheap, so the data path is measured")
    parser.add_argument("--backend", default="onnxruntime,tensorflow",
                        help="engine of the pipeline and the bare model; a comma-separated list compares engines in one "
                             "sitting: each after the first adds the bare model and, with --local, the pipeline from the "
                             "local folder on it (default onnxruntime,tensorflow)")
    parser.add_argument("--batch-size", default="auto", help="images per model call (default auto: 32 on CPU, 256 on GPU)")
    parser.add_argument("--bare-limit", type=int, default=None,
                        help="the bare model featurizes only the first N images (its rate needs no more)")
    parser.add_argument("--s3-limit", type=int, default=None,
                        help="the pipeline from S3 reads only the first N images (uploading many to moto is slow)")
    parser.add_argument("--no-spark", action="store_true", help="leave out the PySpark peer")
    parser.add_argument("--local", action="store_true",
                        help="also run the pipeline from the local folder the PySpark peer reads")
    parser.add_argument("--no-s3", action="store_true",
                        help="with --local: leave out moto S3 (the pipeline from the local folder only; half the time)")
    parser.add_argument("--report", type=pathlib.Path, default=None,
                        help="save the pipeline's Dask performance report here (HTML)")
    parser.add_argument("--workdir", type=pathlib.Path, default=None,
                        help="where to put the images and outputs (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    from pipeline.config import BACKENDS

    args.engines = [engine.strip() for engine in args.backend.split(",")]
    if unknown := [engine for engine in args.engines if engine not in BACKENDS]:
        parser.error(f"--backend: unknown {', '.join(unknown)} (choose from {', '.join(BACKENDS)})")
    args.backend = args.engines[0]
    return args


# --- the images --------------------------------------------------------------------------------------


def prepare_images(args: argparse.Namespace, target: pathlib.Path) -> tuple[list[str], list[str]]:
    """Put the images to use under `target`: relative paths of the images, and of other files (skipped)."""
    source = args.images.resolve()
    if not source.is_dir():
        sys.exit(f"error: no image folder at {source} (give --images PATH)")
    if args.count:
        started = time.perf_counter()
        make_images.make_images(source, target, args.count)
        print(f"made {args.count} images from {source} in {time.perf_counter() - started:.0f} s", flush=True)
        source = target
    files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    images = [f for f in files if f.lower().endswith((".jpg", ".jpeg"))][: args.limit]
    others = [f for f in files if not f.lower().endswith((".jpg", ".jpeg"))]
    if not images:
        sys.exit(f"error: no .jpg images under {source}")
    if source != target:  # the selected images, alone in a folder that all three runs read
        copy_images(source, images + others, target)
    return images, others


# --- moto S3 -----------------------------------------------------------------------------------------


def copy_images(folder: pathlib.Path, relative: list[str], target: pathlib.Path) -> None:
    """Copy these files of `folder` into `target`, keeping their relative paths (labels and splits)."""
    for path in relative:
        (target / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / path, target / path)


def start_s3() -> tuple[object, str]:
    """A moto S3 API server on a free loopback port (in this process), and its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def upload(fs, folder: pathlib.Path, relative: list[str], prefix: str) -> float:
    """Upload the files under s3://fruits/<prefix>/ with their relative keys; returns seconds."""
    started = time.perf_counter()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    fs.put([str(folder / r) for r in relative], [f"{BUCKET}/{prefix}/{r}" for r in relative])
    seconds = time.perf_counter() - started
    stored = fs.find(f"{BUCKET}/{prefix}")
    if len(stored) != len(relative):
        sys.exit(f"error: uploaded {len(relative)} files but the bucket lists {len(stored)}")
    return seconds


# --- running a command and watching its memory -------------------------------------------------------


class TreeWatch:
    """Peak RSS of a process tree (the sum at each moment) and of each of its processes, polled."""

    def __init__(self, pid: int, interval: float = 0.1):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_total = 0
        self.processes: dict[int, dict] = {}  # pid → {"name", "started", "peak", "cpu", "samples": [(time, cpu)]}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in tree:
                try:
                    with p.oneshot():
                        rss, cpu = p.memory_info().rss, sum(p.cpu_times()[:2])
                        seen = self.processes.setdefault(p.pid, {"name": describe(p, self.root), "started": p.create_time(), "peak": 0,
                                                                 "samples": []})
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                seen["peak"], seen["cpu"] = max(seen["peak"], rss), cpu
                seen["samples"].append((time.time(), cpu))
                total += rss
            self.peak_total = max(self.peak_total, total)
            self.stop.wait(self.interval)

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()
        ordered = sorted(self.processes.values(), key=lambda p: p["started"])
        workers = [p for p in ordered if p["name"] == "worker"]
        for number, p in enumerate(workers, 1):
            p["name"] = f"worker {number}"
        return {"peak_total": self.peak_total, "processes": ordered, "cpu": sum(p.get("cpu", 0) for p in ordered)}


class GpuWatch:
    """GPU utilisation (%) sampled by nvidia-smi every 200 ms while a command runs, with the time of each sample."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self.process = None
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self.read, daemon=True).start()

    def read(self) -> None:
        for line in self.process.stdout:
            values = [float(v) for v in line.split(",") if v.strip().replace(".", "", 1).isdigit()]
            if values:
                self.samples.append((time.time(), sum(values) / len(values)))  # the mean over the machine's GPUs

    def finish(self) -> list[tuple[float, float]]:
        if self.process:
            self.process.terminate()
            self.process.wait(10)
        return self.samples


def featurize_window(manifest: dict) -> tuple[float, float]:
    """Start and end (epoch seconds) of a run's featurize stage, from its manifest's start and stage times."""
    from datetime import datetime

    timings = manifest["timings_s"]
    start = datetime.fromisoformat(manifest["started"]).timestamp() + timings.get("list", 0) + timings.get("cluster start", 0)
    return start, start + timings["featurize"]


def gpu_busy(run: dict) -> str:
    """Mean GPU utilisation during the featurize stage, or why there is none."""
    if not run.get("gpu"):
        return "no GPU sampled (no nvidia-smi)"
    start, end = featurize_window(run["manifest"])
    during = [util for at, util in run["gpu"] if start <= at <= end]
    if not during:
        return "no sample inside the featurize stage"
    return f"{sum(during) / len(during):.0f}% mean over {len(during)} samples (200 ms apart) during featurize"


def describe(process, root) -> str:
    """A short name for a process of a benchmarked tree."""
    if process.pid == root.pid:
        return "client"
    line = " ".join(process.cmdline())
    if "spawn_main" in line:
        return "worker"  # a Dask worker process of the LocalCluster (multiprocessing spawn)
    if "resource_tracker" in line:
        return "resource tracker"
    if "java" in process.name():
        return "JVM"
    if "pyspark" in line:
        return "Python worker"
    return process.name()


def run_watched(command: list[str], cwd: pathlib.Path = REPO) -> dict:
    """Run a command to its end, watching its memory; wall seconds, rc, stdout, stderr, memory, CPU."""
    started, cpu_before = time.perf_counter(), time.process_time()
    process = subprocess.Popen(command, cwd=cwd, env=dict(os.environ), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    watch = TreeWatch(process.pid)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    memory = watch.finish()
    return {"command": command, "rc": process.returncode, "seconds": seconds, "stdout": stdout, "stderr": stderr,
            "memory": memory, "this_process_cpu": time.process_time() - cpu_before}


def last_json(stdout: str) -> dict | None:
    """The JSON document a command printed on stdout (the last line that parses, or the whole)."""
    for text in [stdout, *reversed(stdout.strip().splitlines())]:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            continue
    return None


def show_stderr(what: str, stderr: str, last: int = 15) -> None:
    """A command's stderr without TensorFlow's and Spark's start-up chatter (its last lines)."""
    lines = stderr.strip().splitlines()
    kept = [line for line in lines if not line.startswith(NOISE) and "WARN " not in line and line.strip()]
    if kept:
        print(f"{what} stderr (last lines):\n  " + "\n  ".join(kept[-last:]), flush=True)


def pipeline_command(endpoint: str, prefix: str, output: str, args: argparse.Namespace, report: pathlib.Path | None,
                     backend: str | None = None) -> list[str]:
    """The command line a user would type, with this interpreter, at the default settings but the model's."""
    command = [
        sys.executable, "-m", "pipeline", "run", "--input", prefix, "--output", output, "--cluster", "local",
        "--model", args.model, "--image-size", str(args.image_size), "--backend", backend or args.backend, "--batch-size", args.batch_size,
        "--weights", "random", "--n-components", "0.95", "--json", "--overwrite",
    ]
    if endpoint:
        command += ["--endpoint-url", endpoint]
    if report:
        command += ["--report", str(report.resolve())]
    return command


def run_pipeline(what: str, command: list[str]) -> dict:
    """Run the pipeline as a user would and keep its manifest, and the GPU's utilisation where there is one."""
    print(f"{what}: {' '.join(repr(a) if ' ' in a else a for a in command)}", flush=True)
    gpu = GpuWatch()
    run = run_watched(command)
    run["gpu"] = gpu.finish()
    run["manifest"] = last_json(run["stdout"]) if run["rc"] == 0 else None
    print(f"  finished in {run['seconds']:.1f} s (exit code {run['rc']})", flush=True)
    show_stderr("  pipeline", run["stderr"])
    return run


# --- engines ----------------------------------------------------------------------------------------


def export_onnx_once(args: argparse.Namespace) -> None:
    """Where an engine is ONNX Runtime, export the network before anything is timed, and say how long it took.

    A machine exports once (workers then read the cached file); here into this sitting's own
    cache (XDG_CACHE_HOME under the work folder, inherited by every command), so it is measured.
    """
    from pipeline.making.featurize import engine

    if "onnxruntime" not in {engine(e) for e in args.engines}:
        return
    code = ("import sys; from pipeline.making import featurize; "
            "featurize.onnx_file(featurize.ModelKey(sys.argv[1], int(sys.argv[2]), 'random', 0, 'onnxruntime'), {})")
    export = run_watched([sys.executable, "-c", code, args.model, str(args.image_size)])
    if export["rc"]:
        show_stderr("  ONNX export", export["stderr"])
        sys.exit("error: exporting the network to ONNX failed")
    print(f"exported {args.model} at {args.image_size} px to ONNX in {export['seconds']:.1f} s "
          f"(Keras on TensorFlow, tf2onnx; once per machine), peak RSS {gib(export['memory']['peak_total'])}", flush=True)


def run_bare(args: argparse.Namespace, folder: pathlib.Path, n: int, backend: str) -> dict:
    """benchmarks/bare_model.py on `backend`, watched; its JSON result under "result"."""
    print(f"bare model on {min(n, args.bare_limit or n)} images, {backend}", flush=True)
    run = run_watched([sys.executable, str(REPO / "benchmarks" / "bare_model.py"), str(folder), "--model", args.model,
                       "--image-size", str(args.image_size), "--backend", backend, "--batch-size", args.batch_size,
                       *(["--limit", str(args.bare_limit)] if args.bare_limit else [])])
    run["result"] = last_json(run["stdout"])
    if run["rc"]:
        show_stderr("  bare model", run["stderr"])
    return run


def check_engine(engine: str, bare: dict, local: dict | None, out: pathlib.Path, output: dict, first: str,
                 n_features: int) -> list[tuple[str, str, bool]]:
    """Another engine's bare model ran, and its pipeline wrote the first engine's features (within FEATURE_TOLERANCE)."""
    import fsspec

    from pipeline.making.featurize import features_agree
    from pipeline.making.sink import matrix

    checks = [(f"bare model on {engine} exit code", str(bare["rc"]), bare["rc"] == 0)]
    if local is None:
        return checks
    if local["rc"]:
        return checks + [(f"pipeline on {engine} exit code", str(local["rc"]), False)]
    theirs = read_output(fsspec.filesystem("file"), str(out))["images"].sort_by("path")
    ours = output["images"].sort_by("path")
    same = theirs["path"].to_pylist() == ours["path"].to_pylist()
    a, b = (matrix(t["features"], n_features) for t in (theirs, ours)) if same else (np.zeros(1), np.ones(1))
    difference = float(np.abs(a - b).max() / np.abs(b).max())
    return checks + [(f"features on {engine} = on {first}", f"max diff / max |value| {difference:.1e}",
                      same and features_agree(a, b))]


def print_engines(engines: dict[str, tuple[dict, dict | None]], spark: dict | None, n: int) -> list[tuple[str, str, bool]]:
    """Each engine's bare model and pipeline from the local folder side by side; the ONNX Runtime goals."""
    spark_speed = n / spark["seconds"] if spark and spark["rc"] == 0 else None
    print(f"\nengines, one sitting ({n} images; the pipeline from the local folder, whole command):")
    print(f"  {'engine':14}{'bare images/s':>15}{'pipeline images/s':>19}{'pipeline / bare':>17}{'/ PySpark peer':>16}"
          f"{'worker peak RSS':>17}")
    goals = []
    for engine, (bare, local) in engines.items():
        result = bare.get("result")
        bare_speed = result["images"] / result["seconds"] if result else None
        speed = n / local["seconds"] if local and local["rc"] == 0 else None
        workers = [p["peak"] for p in (local or {}).get("memory", {}).get("processes", []) if p["name"].startswith("worker")]
        cells = [f"{bare_speed:.1f}" if bare_speed else "", f"{speed:.1f}" if speed else "",
                 f"{speed / bare_speed:.2f}" if speed and bare_speed else "", f"{speed / spark_speed:.2f}" if speed and spark_speed else "",
                 f"{max(workers) / 2**20:.0f} MiB" if workers else ""]
        print(f"  {engine:14}{cells[0]:>15}{cells[1]:>19}{cells[2]:>17}{cells[3]:>16}{cells[4]:>17}")
        if engine != "onnxruntime" or not speed:
            continue
        if bare_speed:
            goals.append(("pipeline on onnxruntime / bare onnxruntime", f"{speed / bare_speed:.2f} (goal ≥ {GOALS['vs bare']})",
                          speed / bare_speed >= GOALS["vs bare"]))
        if spark_speed:
            goals.append(("pipeline on onnxruntime / PySpark peer", f"{speed / spark_speed:.2f} (goal ≥ {GOALS['onnxruntime vs spark']})",
                          speed / spark_speed >= GOALS["onnxruntime vs spark"]))
    return goals


# --- checks of the pipeline's output -----------------------------------------------------------------


def read_output(fs, out: str) -> dict:
    """images.parquet, errors.parquet, pca.npz and manifest.json, read back from the bucket."""
    import pyarrow.parquet as pq

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
    columns = ["path", "label", "split", "identity", "features", "pca"]
    k = int(output["pca"]["n_components"])
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

    from pipeline.making.sink import matrix

    table, saved = output["images"], output["pca"]
    features = matrix(table["features"], n_features).astype(np.float64)
    k = int(saved["n_components"])
    components, mean = saved["components"][:k].astype(np.float64), saved["mean"].astype(np.float64)
    ratio = saved["explained_variance_ratio"]
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


def check_spark(run: dict, folder: pathlib.Path, output: dict, n_features: int) -> list[tuple[str, str, bool]]:
    """The PySpark peer did the same job: one row per image, the pipeline's features, a PCA as large."""
    import pyarrow.parquet as pq

    from pipeline.making.sink import matrix

    result = run.get("result") or {}
    if run["rc"] != 0 or not result:
        return [("PySpark peer exit code", str(run["rc"]), False)]
    peer = pq.read_table(folder).sort_by("path")
    ours = output["images"].sort_by("path")
    same_paths = peer["path"].to_pylist() == ours["path"].to_pylist()
    difference = float("nan")
    if same_paths:
        a, b = matrix(peer["features"], n_features), matrix(ours["features"], n_features)
        difference = float(np.abs(a - b).max() / np.abs(b).max())
    k = int(output["pca"]["n_components"])
    return [
        ("PySpark peer rows and paths", f"{peer.num_rows}, {'same paths' if same_paths else 'other paths'}", same_paths),
        ("PySpark features = pipeline features", f"max diff / max |value| {difference:.1e}", difference < 1e-3),
        ("PySpark PCA components k", f"{result.get('n_components')} (pipeline {k})",
         abs(int(result.get("n_components", -99)) - k) <= 1),
    ]


# --- the report ---------------------------------------------------------------------------------------


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def table_row(what: str, n: int, seconds: float, bare_speed: float | None, memory: float | None) -> str:
    speed = n / seconds
    ratio = f"{speed / bare_speed:.2f}" if bare_speed else ""
    return f"{what:44} {n:>7} {seconds:>8.1f} {speed:>9.1f} {ratio:>8} {gib(memory) if memory else '':>10}"


def print_table(rows: list[tuple], bare_speed: float | None) -> None:
    print(f"\n{'':44} {'images':>7} {'seconds':>8} {'images/s':>9} {'vs bare':>8} {'peak RSS':>10}")
    for what, n, seconds, memory in rows:
        print(table_row(what, n, seconds, bare_speed, memory))


def print_breakdown(run: dict, moto_cpu: float | None, what: str = "pipeline from moto S3") -> None:
    """Where the pipeline's time went: stages (wall), worker seconds per step, CPU of its processes."""
    manifest = run["manifest"] or {}
    timings, workers = manifest.get("timings_s", {}), manifest.get("worker_seconds", {})
    inside = sum(timings.values())
    print(f"\n{what}, where the time went (whole command {run['seconds']:.1f} s):")
    print("  stages (wall s)   " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
          + f"; start-up and shut-down {run['seconds'] - inside:.1f}")
    rest = run["seconds"] - timings.get("featurize", 0)
    print(f"  all but featurize {rest:.1f} s (start-up, imports, listing, cluster, PCA, writing, shut-down)")
    print("  worker seconds    " + ", ".join(f"{k} {v:.1f}" for k, v in workers.items()) + " (summed over tasks)")
    if run.get("gpu") is not None:
        print(f"  GPU busy          {gpu_busy(run)}")
    print(f"  model ran on      {', '.join(manifest.get('model', {}).get('devices', [])) or '?'}")
    cpu = run["memory"]["cpu"]
    print(f"  CPU seconds       {cpu:.1f} by the pipeline's processes"
          + (f", {moto_cpu:.1f} by the moto S3 server (same cores)" if moto_cpu is not None else ""))


def print_data_path(runs: dict, bare: dict, cores: int) -> None:
    """What everything but the model costs: the featurize stage against the bare model, in cores per 1,000 images/s.

    Both keep every core busy, so the difference of their seconds per image, times the cores, is
    the core-seconds per image of reading, decoding and staging (and of the scheduling around them).
    """
    bare_s = bare["seconds"] / bare["images"]
    print(f"\ndata path (the featurize stage against the bare model, {cores} cores, batch {bare['batch_size']}, "
          f"{bare['device']}): bare model {1 / bare_s:.0f} images/s")
    for name in ("pipeline", "local"):
        manifest = runs.get(name, {}).get("manifest")
        if not manifest or (name == "pipeline" and runs["pipeline"] is runs.get("local")):
            continue
        stage_s = manifest["timings_s"]["featurize"] / manifest["counts"]["listed"]
        cost = max(stage_s - bare_s, 0.0) * cores
        print(f"  {'from moto S3' if name == 'pipeline' else 'from the local folder':22} featurize stage "
              f"{1 / stage_s:.0f} images/s ({bare_s / stage_s:.2f}× the bare model's): {cost * 1e3:.2f} core-ms per image "
              f"around the model, {cost * 1e3:.1f} cores per 1,000 images/s")


def cpu_between(samples: list[tuple[float, float]], start: float, end: float) -> float:
    """A process's CPU seconds between two moments, from its polled (time, CPU seconds) samples (interpolated)."""
    import numpy as np

    if not samples:
        return 0.0
    times, cpu = zip(*samples)
    return float(np.interp(end, times, cpu) - np.interp(start, times, cpu))


def print_data_path_cpu(run: dict, bare: dict) -> None:
    """The data path in CPU time, which a busy machine changes little: the worker processes' CPU seconds during
    the featurize stage, less the model's (its build in each worker and its compute per image, as the bare
    model's process spent them), per image: cores per 1,000 images/s around the model."""
    manifest = run.get("manifest")
    if not manifest or "cpu_s" not in bare:
        return
    start, end = featurize_window(manifest)
    workers = [p for p in run["memory"]["processes"] if p["name"].startswith("worker")]
    used = sum(cpu_between(p["samples"], start, end) for p in workers)
    n = manifest["counts"]["listed"]
    model = len(workers) * bare["build_cpu_s"] + bare["cpu_s"] / bare["images"] * n
    print(f"  in CPU time: the {len(workers)} worker processes spent {used:.1f} CPU s during the featurize stage, the model "
          f"{model:.1f} of them (its build in each, {bare['cpu_s'] / bare['images'] * 1e3:.2f} CPU ms per image as the bare model): "
          f"{(used - model) / n * 1e3:.2f} cores per 1,000 images/s around the model")


def gpu_goals(run: dict, bare: dict) -> list[tuple[str, str, bool]]:
    """The GPU goals of a run from the local folder: featurize ≥ 0.8× the bare model, GPU ≥ 80% busy, the rest ≤ 20 s."""
    manifest = run["manifest"]
    stage = manifest["counts"]["listed"] / manifest["timings_s"]["featurize"]
    ratio = stage / (bare["images"] / bare["seconds"])
    start, end = featurize_window(manifest)
    during = [util for at, util in run["gpu"] if start <= at <= end]
    busy = sum(during) / len(during) if during else 0.0
    rest = run["seconds"] - manifest["timings_s"]["featurize"]
    return [
        ("GPU: featurize stage images/s / bare model's", f"{ratio:.2f} (goal ≥ {GOALS['gpu stage']})", ratio >= GOALS["gpu stage"]),
        ("GPU: utilisation during featurize", f"{busy:.0f}% (goal ≥ {GOALS['gpu busy']}%)", busy >= GOALS["gpu busy"]),
        ("GPU: all but featurize, whole command", f"{rest:.1f} s (goal ≤ {GOALS['gpu rest']} s)", rest <= GOALS["gpu rest"]),
    ]


def print_processes(runs: list[tuple[str, dict]]) -> list[tuple[str, str, bool]]:
    """Peak RSS of each process of each run side by side; the memory goal as checks (last vs first)."""
    names = []
    for _, run in runs:
        for p in run["memory"]["processes"]:
            if p["name"] not in names:
                names.append(p["name"])
    print("\npeak RSS per process (MiB)" + "".join(f"{label:>18}" for label, _ in runs)
          + ("       ratio" if len(runs) == 2 else ""))
    checks = []
    for name in names:
        peaks = [next((p["peak"] for p in run["memory"]["processes"] if p["name"] == name), None) for _, run in runs]
        cells = "".join(f"{peak / 2**20:>18.0f}" if peak else f"{'':>18}" for peak in peaks)
        ratio = peaks[-1] / peaks[0] if len(peaks) == 2 and all(peaks) else None
        print(f"  {name:24}{cells}" + (f"{ratio:>12.2f}" if ratio else ""))
        if ratio and (name == "client" or name.startswith("worker")):
            checks.append((f"peak RSS of {name}, {runs[-1][0]} / {runs[0][0]}", f"{ratio:.2f} (goal ≤ {GOALS['memory']})",
                           ratio <= GOALS["memory"]))
    return checks


def machine() -> str:
    cores = len(os.sched_getaffinity(0))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor()) \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    return f"{cores} cores ({cpu}), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, {platform.system()}"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- the whole benchmark -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Prepare the images, run the three, check, print; 1 if a check fails."""
    args = parse_args(argv)
    from cluster import local_size
    from pipeline.making.featurize import MODELS

    if args.model not in MODELS:
        sys.exit(f"error: unknown model {args.model!r}: choose one of {', '.join(MODELS)}")
    n_features = MODELS[args.model].n_features
    spark_available = not args.no_spark and shutil.which("java") and __import__("importlib").util.find_spec("pyspark")
    if not args.no_spark and not spark_available:
        sys.exit("error: the PySpark peer needs `pip install -e '.[bench]'` and Java 17+ (or pass --no-spark)")
    if args.no_s3 and not args.local:
        sys.exit("error: --no-s3 needs --local (the pipeline must read from somewhere)")
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    os.environ["XDG_CACHE_HOME"] = str(workdir / "cache")  # this sitting exports the ONNX network itself (export_onnx_once)
    folder = workdir / "images"
    print(f"machine: {machine()}; {load()} at the start", flush=True)
    images, others = prepare_images(args, folder)
    n = len(images)
    n_workers, threads = local_size(None, None)
    print(f"{n} images under {folder}; the pipeline's LocalCluster: {n_workers} worker process(es) × {threads} threads", flush=True)

    export_onnx_once(args)
    s3_images = images[: args.s3_limit]
    checks: list[tuple[str, str, bool]] = []
    runs: dict[str, dict] = {}
    baseline = args.count and args.baseline and args.baseline < n
    moto_cpu = None
    if args.no_s3:  # the local run stands in for the S3 one: its output is checked, its memory compared
        if baseline:
            copy_images(folder, images[: args.baseline], workdir / "baseline")
            runs["baseline"] = run_pipeline(f"pipeline on the first {args.baseline} images",
                                            pipeline_command("", str(workdir / "baseline"), str(workdir / "out-baseline"), args, None))
        runs["pipeline"] = runs["local"] = run_pipeline("pipeline from the local folder",
                                                        pipeline_command("", str(folder), str(workdir / "out-local"), args, args.report))
        if runs["pipeline"]["manifest"] is None:
            print(f"FAIL  the pipeline failed (exit code {runs['pipeline']['rc']}); stdout:\n{runs['pipeline']['stdout'][-3000:]}")
            return 1
        import fsspec

        s3_images, output = images, read_output(fsspec.filesystem("file"), str(workdir / "out-local"))
    else:
        server, endpoint = start_s3()
        try:
            import s3fs

            fs = s3fs.S3FileSystem(endpoint_url=endpoint)
            upload_s = upload(fs, folder, s3_images + others, "all")
            print(f"moto S3 at {endpoint}: uploaded {len(s3_images) + len(others)} files in {upload_s:.0f} s", flush=True)
            if baseline:
                upload(fs, folder, images[: args.baseline], "baseline")
                runs["baseline"] = run_pipeline(f"pipeline on the first {args.baseline} images",
                                                pipeline_command(endpoint, f"s3://{BUCKET}/baseline", f"s3://{BUCKET}/out-baseline",
                                                                 args, None))
            cpu_before = time.process_time()
            runs["pipeline"] = run_pipeline(f"pipeline on {len(s3_images)} images",
                                            pipeline_command(endpoint, f"s3://{BUCKET}/all", f"s3://{BUCKET}/{OUTPUT}",
                                                             args, args.report))
            moto_cpu = time.process_time() - cpu_before  # this process only serves S3 (and polls) meanwhile
            if runs["pipeline"]["manifest"] is None:
                print(f"FAIL  the pipeline failed (exit code {runs['pipeline']['rc']}); stdout:\n{runs['pipeline']['stdout'][-3000:]}")
                return 1
            output = read_output(fs, f"{BUCKET}/{OUTPUT}")
        finally:
            server.stop()
    checks += check_manifest(runs["pipeline"], output, s3_images, others) + check_table(output, s3_images, n_features)
    checks += check_pca(output, n_features)

    if args.local and not args.no_s3:
        runs["local"] = run_pipeline("pipeline from the local folder",
                                     pipeline_command("", str(folder), str(workdir / "out-local"), args, None))
    runs["bare"] = run_bare(args, folder, n, args.backend)
    if runs["bare"]["rc"]:
        checks.append(("bare model exit code", str(runs["bare"]["rc"]), False))
    engines = {args.backend: (runs["bare"], runs.get("local"))}
    for engine in args.engines[1:]:  # the same sitting: the bare model, then the pipeline, on each other engine
        bare_run = run_bare(args, folder, n, engine)
        local_run = run_pipeline(f"pipeline from the local folder on {engine}",
                                 pipeline_command("", str(folder), str(workdir / f"out-local-{engine}"), args, None, engine)) \
            if args.local else None
        engines[engine] = (bare_run, local_run)
        checks += check_engine(engine, bare_run, local_run, workdir / f"out-local-{engine}", output, args.backend, n_features)
    if not spark_available:
        print("PySpark peer left out (--no-spark)")
    else:
        print(f"PySpark peer on {n} images, local[{n_workers * threads}]", flush=True)
        runs["spark"] = run_watched([sys.executable, str(REPO / "benchmarks" / "spark_peer.py"), str(folder),
                                     str(workdir / "out-spark"), "--cores", str(n_workers * threads), "--model", args.model])
        runs["spark"]["result"] = last_json(runs["spark"]["stdout"])
        print(f"  finished in {runs['spark']['seconds']:.1f} s (exit code {runs['spark']['rc']})", flush=True)
        if runs["spark"]["rc"]:
            show_stderr("  PySpark", runs["spark"]["stderr"])
        checks += check_spark(runs["spark"], workdir / "out-spark", output, n_features)

    bare = runs["bare"].get("result")
    bare_speed = bare["images"] / bare["seconds"] if bare else None
    rows = []
    if bare:
        rows.append(("bare model (decoded in memory)", bare["images"], bare["seconds"], runs["bare"]["memory"]["peak_total"]))
    if not args.no_s3:
        rows.append(("pipeline, moto S3 → parquet, whole command", len(s3_images), runs["pipeline"]["seconds"],
                     runs["pipeline"]["memory"]["peak_total"]))
    if "local" in runs and runs["local"]["rc"] == 0:
        rows.append(("pipeline, local folder → parquet", n, runs["local"]["seconds"], runs["local"]["memory"]["peak_total"]))
    if "spark" in runs and runs["spark"]["rc"] == 0:
        rows.append(("PySpark peer, local folder → parquet", n, runs["spark"]["seconds"], runs["spark"]["memory"]["peak_total"]))
    if baseline:
        rows.append((f"pipeline, {'local folder' if args.no_s3 else 'moto S3'}, first {args.baseline} (memory)", args.baseline, runs["baseline"]["seconds"],
                     runs["baseline"]["memory"]["peak_total"]))
    print_table(rows, bare_speed)
    print(f"({load()} at the end; peak RSS: the process and its children, summed at the peak; "
          "the PySpark peer reads a local folder: Spark reads S3 only through the hadoop-aws jars)")

    goals = []
    for name, run, spark_goal in [("", runs["pipeline"], GOALS["vs spark"]), ("local folder: ", runs.get("local"), GOALS["local vs spark"])]:
        if not run or run["rc"] or (name == "" and args.no_s3):
            continue
        speed = (n if name else len(s3_images)) / run["seconds"]
        if bare_speed:
            goals.append((f"{name}pipeline images/s / bare model's", f"{speed / bare_speed:.2f} (goal ≥ {GOALS['vs bare']})",
                          speed / bare_speed >= GOALS["vs bare"]))
        if "spark" in runs and runs["spark"]["rc"] == 0:
            ratio = speed / (n / runs["spark"]["seconds"])
            goals.append((f"{name}pipeline images/s / PySpark peer's", f"{ratio:.2f} (goal ≥ {spark_goal})", ratio >= spark_goal))
    if not args.no_s3:
        print_breakdown(runs["pipeline"], moto_cpu)
    if "local" in runs and runs["local"]["manifest"]:
        print_breakdown(runs["local"], None, "pipeline from the local folder")
    if bare:
        print_data_path(runs, bare, n_workers * threads)
        if runs.get("local"):
            print_data_path_cpu(runs["local"], bare)
    if bare:
        print("bare model        " + ", ".join(f"{k} {v:.1f} s" for k, v in bare["timings_s"].items())
              + f", model {bare['seconds']:.1f} s; CPU seconds {runs['bare']['memory']['cpu']:.1f}")
    if len(engines) > 1:
        goals += print_engines(engines, runs.get("spark"), n)
    if "spark" in runs and runs["spark"].get("result"):
        print("PySpark peer      " + ", ".join(f"{k} {v:.1f} s" for k, v in runs["spark"]["result"]["timings_s"].items())
              + f"; CPU seconds {runs['spark']['memory']['cpu']:.1f}")
    if bare and runs.get("local", {}).get("gpu") and runs["local"]["manifest"]:
        goals += gpu_goals(runs["local"], bare)
    memory_runs = [(f"{args.baseline} images", runs["baseline"])] if baseline else []
    goals += print_processes(memory_runs + [(f"{n} images", runs["pipeline"])])

    print()
    width = max(len(name) for name, _, _ in checks + goals)
    for name, value, ok in goals:
        print(f"{'GOAL' if ok else 'MISS'}  {name:{width}}  {value}")
    for name, value, ok in checks:
        print(f"{'OK  ' if ok else 'FAIL'}  {name:{width}}  {value}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(ok for _, _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
