"""Features: the CNN registry, weights, a model cached per worker process, batched inference.

Keras and its backend (TensorFlow, JAX or PyTorch: the `backend` setting) are imported inside
functions, on the workers: the client lists, validates and reports without them. A worker that
runs ONNX Runtime imports neither: the network is exported once per machine by a child process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import glob
import hashlib
import importlib
import importlib.metadata
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from . import sink
from .. import images, source
from ..config import UsageError

KERAS_APPLICATIONS = "https://storage.googleapis.com/tensorflow/keras-applications/"
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 32, 256  # `batch-size: auto`: a GPU is filled at 256 (docs/gpu.md)
# Features of one image agree within this, relative to the largest feature of the images compared,
# whatever the batch it shared, the partitioning, the CPU or the backend (docs/how-it-works.md, "Features").
FEATURE_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A Keras application without its top, and where its ImageNet weights are published."""

    application: str  # class in keras.applications
    module: str  # module in keras.applications holding its preprocess_input
    n_features: int
    imagenet_file: str  # the no-top weights file, under KERAS_APPLICATIONS
    alpha: float | None = None  # MobileNetV2's width multiplier: every layer's channels × alpha (channel pruning)


MODELS = {
    "mobilenet_v2": ModelSpec(
        "MobileNetV2", "mobilenet_v2", 1280,
        "mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
    ),
    # MobileNetV2 pruned to half and a third of its channels (its last layer keeps 1,280 features): docs/finetune.md
    "mobilenet_v2_050": ModelSpec(
        "MobileNetV2", "mobilenet_v2", 1280,
        "mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5", alpha=0.5,
    ),
    "mobilenet_v2_035": ModelSpec(
        "MobileNetV2", "mobilenet_v2", 1280,
        "mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5", alpha=0.35,
    ),
    "resnet50": ModelSpec(
        "ResNet50", "resnet50", 2048, "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    ),
}


@dataclasses.dataclass(frozen=True)
class ModelKey:
    """Everything that makes one featurizer differ from another; the key of the per-process cache."""

    model: str
    image_size: int
    weights: str  # "imagenet", "random" or a path/URL of a weights file
    seed: int
    backend: str = "tensorflow"  # the engine: auto, onnxruntime, or Keras 3's tensorflow, jax or torch


def features_agree(a: np.ndarray, b: np.ndarray, tolerance: float = FEATURE_TOLERANCE) -> bool:
    """True if two feature matrices agree as the pipeline promises: within `tolerance` of b's largest feature.

    The same image shares its batch with other images when partitioned otherwise, and CPUs and
    backends order their sums differently: its features move in the last bits (measured: 2.6e-6
    of the largest feature, docs/how-it-works.md "Features"), never more than this.
    """
    return a.shape == b.shape and float(np.abs(a - b).max(initial=0)) <= tolerance * float(np.abs(b).max(initial=0))


def model_spec(name: str) -> ModelSpec:
    """The registry entry for `name`, or a UsageError listing the known models."""
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name]


# --- weights -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Weights:
    """The weights a run actually uses, and why (the warning shown when ImageNet was not available)."""

    used: str  # "imagenet", "random" or the weights file's URL
    warning: str | None = None  # one line: why ImageNet's were not used


def resolve_weights(model: str, weights: str, seed: int, storage_options: dict) -> Weights:
    """Decide the weights on the client, before any image is read, so that a run fails fast."""
    if weights == "random":
        return Weights("random")
    if weights in ("imagenet", "auto"):
        try:
            download_imagenet_weights(model)
            return Weights("imagenet")
        except OSError as error:  # no network, proxy, TLS, HTTP error, no room on disk
            if weights == "imagenet":
                raise UsageError(
                    f"ImageNet weights for {model} cannot be downloaded ({error}). Offline, copy "
                    f"{KERAS_APPLICATIONS}{MODELS[model].imagenet_file} to a folder or bucket and "
                    f"pass --weights PATH, or pass --weights random for seeded untrained features"
                ) from None
            return Weights("random", f"no ImageNet weights ({type(error).__name__}): seeded random weights (seed {seed}) instead")
    fs, path = source.open_url(weights, storage_options)
    if not fs.isfile(path):
        raise UsageError(f"weights file {weights} not found: give an .h5 weights file, 'imagenet' or 'random'")
    return Weights(weights)


def keras_cache_file(model: str) -> str:
    """Where Keras keeps the model's ImageNet no-top weights once downloaded (keras.utils.get_file's place)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models", MODELS[model].imagenet_file.rsplit("/", 1)[1])


# The MD5 of the no-top ImageNet files where Keras publishes one (keras.applications.resnet's
# WEIGHTS_HASHES; MobileNetV2's has none): a download that differs is refused.
IMAGENET_MD5 = {"resnet50": "4d473c1dd8becc155b73f8504c6f6626"}


def download_imagenet_weights(model: str) -> None:
    """Download the ImageNet weights into Keras' cache unless there; without Keras, so the client starts no backend.

    The workers of this machine then find them there; other machines' workers download their own.
    A file whose published hash (IMAGENET_MD5) differs is not kept: OSError.
    """
    local = keras_cache_file(model)
    if os.path.exists(local):
        return
    os.makedirs(os.path.dirname(local), exist_ok=True)
    partial = f"{local}.{os.getpid()}.part"
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with urllib.request.urlopen(KERAS_APPLICATIONS + MODELS[model].imagenet_file, timeout=30) as response, open(partial, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
        expected = IMAGENET_MD5.get(model)
        if expected and digest.hexdigest() != expected:
            raise OSError(f"the downloaded ImageNet weights of {model} have MD5 {digest.hexdigest()}, not the published {expected}")
        os.replace(partial, local)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def imagenet_weights_file(model: str) -> str:
    """The local path of the model's ImageNet no-top weights, downloaded once into the Keras cache (its hash checked)."""
    import keras

    name = MODELS[model].imagenet_file
    return keras.utils.get_file(name.rsplit("/", 1)[1], KERAS_APPLICATIONS + name, cache_subdir="models",
                                file_hash=IMAGENET_MD5.get(model))


def weights_cache_folder() -> str:
    """This user's folder of weights files copied from URLs ($XDG_CACHE_HOME or ~/.cache, then fruits-pipeline/weights)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fruits-pipeline", "weights")


def local_weights_file(url: str, storage_options: dict) -> str:
    """A local copy of a weights file given by path or URL, in this user's cache, keyed by the URL and the object's
    identity (ETag, or size and mtime): an object replaced under the same URL is copied again."""
    fs, path = source.open_url(url, storage_options)
    if source.is_local(fs):
        return path
    identity = source.identity(fs.info(path))
    digest = hashlib.sha256(f"{url}\n{identity}".encode()).hexdigest()[:16]
    local = os.path.join(weights_cache_folder(), digest, os.path.basename(path))
    if not os.path.exists(local):
        os.makedirs(os.path.dirname(local), mode=0o700, exist_ok=True)  # this user's alone
        partial = f"{local}.{os.getpid()}.part"  # worker processes of one machine may race here
        fs.get(path, partial)
        os.replace(partial, local)
    return local


def randomize(model, seed: int) -> None:
    """Seeded variance-preserving (He normal) kernels, drawn with NumPy so any machine gets the same.

    Keras' default Glorot initialisation shrinks activations layer after layer: MobileNetV2's
    features come out near 1e-12. He-normal kernels keep them informative without training.
    """
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            kernel = layer.kernel
            fan_in = int(np.prod(kernel.shape[:2] if isinstance(layer, keras.layers.DepthwiseConv2D) else kernel.shape[:-1]))
            kernel.assign(rng.normal(0.0, np.sqrt(2.0 / fan_in), kernel.shape).astype("float32"))


# --- the model, once per worker process -----------------------------------------------------------

_featurizers: dict[ModelKey, "Featurizer"] = {}
_build_lock = threading.Lock()
_inference_lock = threading.Lock()  # one inference thread per process: the others read and decode


class Featurizer:
    """A model that maps uint8 images of any size to float32 features, in fixed-size batches.

    Written once against Keras 3 (`keras.ops`, `keras.applications`): the same model, weights,
    preprocessing and in-graph resize run on TensorFlow, JAX or PyTorch, or, exported once by
    Keras to ONNX, on ONNX Runtime; only `compiled()` differs per engine. On a GPU it computes in
    float16 with float32 weights (Keras mixed precision), which tensor cores (a T4's, say) run
    faster; features stay within 1e-2 of float32's (tests/test_featurize.py). On a CPU, and on
    ONNX Runtime, it computes in float32. `mixed_precision` forces either on Keras' backends.
    """

    def __init__(self, key: ModelKey, storage_options: dict, mixed_precision: bool | None = None):
        backend = engine(key.backend)
        if backend == "onnxruntime":  # no Keras and no TensorFlow in this process
            self.model, prepare = onnx_session(key, storage_options), None
            self.on_gpu = self.model.get_providers()[0] != "CPUExecutionProvider"
            self.precision, self.to_numpy = "float32", np.asarray
        else:
            keras = import_keras(backend)
            self.on_gpu = on_gpu(backend)
            mixed_precision = self.on_gpu if mixed_precision is None else mixed_precision
            self.precision = "mixed_float16" if mixed_precision else "float32"
            self.model, prepare = keras_network(key, storage_options, self.precision)
            self.to_numpy = keras.ops.convert_to_numpy
        name = gpu_name() if self.on_gpu else None  # a plan prices GPU workers only from a run on the same GPU
        self.device = f"{'GPU' if self.on_gpu else 'CPU'}{f' ({name})' if name else ''}, {self.precision}, {backend}"
        self.embed = compiled(self.model, prepare, backend)
        self.n_features = MODELS[key.model].n_features

    def __call__(self, arrays: list[np.ndarray], batch_size: int) -> tuple[np.ndarray, float]:
        """Features of each image in order, and the seconds spent in the model (not waiting for it).

        Batches hold one image size and are padded to batch_size, so the model is compiled once
        per image size. Every batch is sent before any result is fetched, and only sending holds
        the process's model: on a GPU (which computes while Python goes on), the next partition's
        batches are queued while this one's results come back.
        """
        out = np.empty((len(arrays), self.n_features), dtype=np.float32)
        by_shape: dict[tuple, list[int]] = {}
        for i, array in enumerate(arrays):
            by_shape.setdefault(array.shape, []).append(i)
        with _inference_lock:
            started = time.perf_counter()
            sent = []
            for shape, indexes in by_shape.items():
                for start in range(0, len(indexes), batch_size):
                    chunk = indexes[start : start + batch_size]
                    batch = np.zeros((batch_size, *shape), dtype=np.uint8)
                    batch[: len(chunk)] = [arrays[i] for i in chunk]
                    sent.append((chunk, self.embed(batch)))
        for chunk, features in sent:
            out[chunk] = self.to_numpy(features)[: len(chunk)]
        return out, time.perf_counter() - started


def keras_network(key: ModelKey, storage_options: dict, precision: str = "float32") -> tuple[object, Callable]:
    """The Keras model with its weights, and `prepare`: uint8 images of any size → its resized, preprocessed input."""
    import keras

    spec = MODELS[key.model]
    size = key.image_size
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)  # read by each layer as it is built
    try:
        model = getattr(keras.applications, spec.application)(
            include_top=False, weights=None, pooling="avg", input_shape=(size, size, 3),
            **({"alpha": spec.alpha} if spec.alpha else {}),
        )
    finally:
        keras.config.set_dtype_policy(policy)
    if key.weights == "random":
        randomize(model, key.seed)
    elif key.weights == "imagenet":
        model.load_weights(imagenet_weights_file(key.model))
    else:
        model.load_weights(local_weights_file(key.weights, storage_options))
    preprocess = getattr(keras.applications, spec.module).preprocess_input

    # Images arrive at any size and are resized here, batched, which costs the model's cores
    # less than resizing one by one with Pillow.
    def prepare(batch):
        return preprocess(keras.ops.image.resize(keras.ops.cast(batch, "float32"), (size, size)))

    return model, prepare


def compiled(model, prepare: Callable | None, backend: str) -> Callable:
    """uint8 batch → float32 features, compiled by the engine's own compiler: the one step that differs per engine.

    For ONNX Runtime, `model` is the InferenceSession of the exported network, `prepare` included.
    """
    if backend == "onnxruntime":
        name = model.get_inputs()[0].name
        return lambda batch: model.run(None, {name: batch})[0]
    import keras

    def embed(batch):
        return keras.ops.cast(model(prepare(batch), training=False), "float32")

    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(embed, input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    if backend == "jax":
        import jax

        @jax.jit
        def pure(trainable, non_trainable, batch):  # the weights are arguments, not constants of the program
            features, _ = model.stateless_call(trainable, non_trainable, prepare(batch), training=False)
            return keras.ops.cast(features, "float32")

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        return lambda batch: pure(trainable, non_trainable, batch)
    import torch

    def eager(batch):
        with torch.inference_mode():
            return embed(batch)

    return eager


def featurizer(key: ModelKey, storage_options: dict) -> Featurizer:
    """The process's featurizer for `key`, built on first use and kept (never shipped in the graph)."""
    with _build_lock:
        if key not in _featurizers:
            _featurizers[key] = Featurizer(key, storage_options)
            # The backend and the model are some 400,000 Python objects that live as long as the
            # process: out of the garbage collector's sight, the process exits in a fraction of a
            # second instead of the seconds its last collections take (LocalCluster waits for it).
            gc.freeze()
        return _featurizers[key]


def use_own_gpu(name: int | str | None) -> None:
    """On a machine with several GPUs, local worker i (the LocalCluster names its workers 0, 1, ...)
    sees only GPU i mod their number; set before CUDA starts in this process."""
    gpus = visible_gpus()
    if len(gpus) > 1 and isinstance(name, int):
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[name % len(gpus)]


def import_keras(backend: str):
    """Keras on `backend`, set up for this worker before the backend's first import.

    A process runs one backend (Keras reads KERAS_BACKEND once).
    """
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = backend
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ information and warnings
        threads, name = worker_threads()
        use_own_gpu(name)
        # TensorFlow's C++ start-up lines (absl, CUDA probes on a CPU) are written before any log
        # level applies: they say nothing about the run, and a failed import still raises.
        with c_stderr_silenced():
            configure_backend(backend, threads)
            importlib.import_module("keras")
    import keras

    if keras.backend.backend() != backend:
        raise UsageError(
            f"this worker process already runs Keras on {keras.backend.backend()}, not {backend}: "
            f"start the workers with KERAS_BACKEND={backend}, or use --backend {keras.backend.backend()}"
        )
    return keras


@contextlib.contextmanager
def c_stderr_silenced():
    """Send what C/C++ code writes to the process's stderr (file descriptor 2) to /dev/null meanwhile."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def configure_backend(backend: str, threads: int) -> None:
    """Give the backend this worker's threads; TensorFlow's GPU memory grows instead of being grabbed."""
    if backend == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # TensorFlow already started in this process (without Keras): keep its settings
            pass
    elif backend == "torch":
        import torch

        torch.set_num_threads(threads)


def gpu_name(driver: str = "/proc/driver/nvidia") -> str | None:
    """The model the NVIDIA driver gives this machine's first GPU (e.g. NVIDIA H200), read without CUDA; None if none."""
    for information in sorted(glob.glob(f"{driver}/gpus/*/information")):
        with open(information) as lines:
            for line in lines:
                name, _, value = line.partition(":")
                if name.strip() == "Model" and value.strip():
                    return value.strip()
    return None


def on_gpu(backend: str) -> bool:
    """True if the backend computes on a GPU in this process."""
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))
    if backend == "jax":
        import jax

        return jax.default_backend() == "gpu"
    import torch

    return torch.cuda.is_available()


def worker_threads() -> tuple[int, int | str | None]:
    """This Dask worker's threads and name; outside a worker, the process's cores and None."""
    try:
        from distributed import get_worker

        worker = get_worker()
        return worker.state.nthreads, worker.name
    except ValueError:  # not inside a Dask worker
        return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1), None


def visible_gpus() -> list[str]:
    """The NVIDIA GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (found without a backend)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # "" or "-1": none; "0,2": those two
        return list(itertools.takewhile(lambda d: d not in ("", "-1"), (d.strip() for d in visible.split(","))))
    found = len(glob.glob("/proc/driver/nvidia/gpus/*"))
    if not found and os.path.exists("/dev/nvidiactl"):  # a sandbox may hide the driver's /proc folder
        try:
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
            found = sum(line.startswith("GPU ") for line in listed.splitlines())
        except (OSError, subprocess.SubprocessError):
            pass
    return [str(i) for i in range(found)]


def batch_size_for(setting: int | str, gpu: bool) -> int:
    """Images per model call: the setting, or for `auto` one that fills a GPU and keeps a CPU's features."""
    if setting == "auto":
        return GPU_BATCH_SIZE if gpu else CPU_BATCH_SIZE
    return setting


# --- ONNX Runtime: the same network, exported once per machine ------------------------------------


def engine(backend: str) -> str:
    """What runs the model in this worker for the `backend` setting: `auto` is ONNX Runtime on a CPU
    worker (the fastest engine measured there, docs/performance.md), TensorFlow on a GPU worker."""
    if backend != "auto":
        return backend
    return "tensorflow" if visible_gpus() else "onnxruntime"


def onnx_session(key: ModelKey, storage_options: dict):
    """The process's ONNX Runtime session of `key`'s exported network, given this worker's threads once.

    Its CUDA provider (the onnxruntime-gpu wheel, docs/gpu.md) runs it on the worker's GPU where
    there is one; otherwise the CPU's. Idle threads sleep rather than spin: the worker's other
    threads decode meanwhile, and a spinning thread took their cores (docs/performance.md).
    """
    import onnxruntime

    threads, name = worker_threads()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers() and visible_gpus():
        use_own_gpu(name)
        providers.insert(0, "CUDAExecutionProvider")
    return onnxruntime.InferenceSession(onnx_file(key, storage_options), options, providers=providers)


def onnx_cache_folder() -> str:
    """This user's folder of exported networks ($XDG_CACHE_HOME or ~/.cache, then fruits-pipeline/onnx)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fruits-pipeline", "onnx")


def onnx_file(key: ModelKey, storage_options: dict) -> str:
    """`key`'s network as an ONNX file on this machine, exported on first use by a process of its own.

    Cached by the model key, the weights file's bytes and the exporter's versions; the worker
    processes of one machine wait for the one that exports (a lock file), then all read the file.
    """
    weights = key.weights if key.weights in ("random", "imagenet") else local_weights_file(key.weights, storage_options)
    identity = {"model": key.model, "image-size": key.image_size, "weights": key.weights, "seed": key.seed,
                "weights-sha256": None if weights in ("random", "imagenet") else file_sha256(weights),
                "keras": package_version("keras"), "tf2onnx": package_version("tf2onnx")}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(onnx_cache_folder(), f"{key.model}-{key.image_size}-{digest}.onnx")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.exists(path):
                export_in_child(key.model, key.image_size, weights, key.seed, path)
    return path


def export_in_child(model: str, image_size: int, weights: str, seed: int, path: str) -> None:
    """Run export_onnx in a new Python process, so that only it imports TensorFlow (on its CPU)."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = os.environ | {"KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": "",
                        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    code = "import json, sys; from pipeline.making.featurize import export_onnx; export_onnx(*json.loads(sys.argv[1]))"
    child = subprocess.run([sys.executable, "-c", code, json.dumps([model, image_size, weights, seed, path])],
                           env=env, capture_output=True, text=True, timeout=1800)
    if child.returncode or not os.path.exists(path):
        raise RuntimeError(f"exporting {model} to ONNX failed (exit code {child.returncode}); its last lines:\n"
                           + "\n".join(child.stderr.strip().splitlines()[-15:]))


def export_onnx(model: str, image_size: int, weights: str, seed: int, path: str) -> None:
    """Write the network, `prepare` included (uint8 images of any size → features), to `path` as ONNX.

    Keras' own export, on TensorFlow (it converts with tf2onnx); the weights are "random",
    "imagenet" or a local file.
    """
    keras = import_keras("tensorflow")
    network, prepare = keras_network(ModelKey(model, image_size, weights, seed), {})
    images = keras.Input((None, None, 3), dtype="uint8", name="images")
    whole = keras.Model(images, network(keras.layers.Lambda(prepare)(images)))
    whole(np.zeros((1, image_size, image_size, 3), np.uint8))  # the export reads a called model's input signature
    partial = f"{path}.{os.getpid()}.part"
    try:
        whole.export(partial, format="onnx", verbose=False)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- one partition ---------------------------------------------------------------------------------


def featurize_partition(
    partitions: str,
    byte_range: tuple[int, int],
    listing_fs,
    root: str,
    key: ModelKey,
    batch_size: int | str,
    limits: images.Limits,
    storage_options: dict,
    output_fs,
    staged_path: str,
) -> dict:
    """Read, decode and featurize the partition at `byte_range` in the `partitions` file (sink.write_partitions);
    stage its features with their errors and timings."""
    seconds = {}
    started = time.perf_counter()
    rows = sink.partition_rows(output_fs, partitions, byte_range)
    blobs = source.read_many(listing_fs, [f"{root}/{path}" for path in rows["path"]], limits.max_bytes)
    seconds["read"] = time.perf_counter() - started

    started = time.perf_counter()
    decoded = decode_all(blobs, key.image_size, limits, worker_threads()[0])
    arrays, kept, errors = [], [], []
    for path, identity, (stage, result) in zip(rows["path"], rows["identity"], decoded):
        if stage:
            errors.append(sink.error_row(path, identity, stage, result))
        else:
            arrays.append(result)
            kept.append(path)
    seconds["decode"] = time.perf_counter() - started

    started = time.perf_counter()
    model = featurizer(key, storage_options)
    seconds["model load"] = time.perf_counter() - started  # includes waiting for another thread's build
    features, seconds["model"] = model(arrays, batch_size_for(batch_size, model.on_gpu))

    good = rows[rows["path"].isin(kept)]
    return sink.stage_partition(output_fs, staged_path, good, features, errors, seconds) | {"device": model.device}


def decode_all(blobs: list, size: int, limits: images.Limits, threads: int) -> list[tuple[str | None, object]]:
    """decode_one of every blob, in order, on `threads` threads (decoders let go of the GIL): one task a
    thread, each a contiguous slice, as a future per image would cost about as much as decoding a thumbnail."""
    step = -(-len(blobs) // max(threads, 1)) or 1
    slices = [blobs[start : start + step] for start in range(0, len(blobs), step)]
    if len(slices) < 2:
        return [decode_one(blob, size, limits) for blob in blobs]
    with ThreadPoolExecutor(len(slices)) as pool:
        done = pool.map(lambda part: [decode_one(blob, size, limits) for blob in part], slices)
        return [result for part in done for result in part]


def decode_one(blob: bytes | BaseException, size: int, limits: images.Limits) -> tuple[str | None, object]:
    """(None, the decoded array), or the failed stage ("read" or "decode") and its exception."""
    if isinstance(blob, BaseException):
        return "read", blob
    try:
        return None, images.decode(blob, size, limits.max_pixels, limits.formats)
    except Exception as error:  # Pillow raises many kinds for broken files; each is recorded
        return "decode", error
