"""Features: the CNN registry, weights, a model cached per worker process, batched inference.

TensorFlow is imported inside functions: the client lists, validates and reports without it.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import os
import tempfile
import threading
import time

import numpy as np
import pandas as pd

from . import images, sink, source
from .config import UsageError

KERAS_APPLICATIONS = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A Keras application without its top, and where its ImageNet weights are published."""

    application: str  # class in keras.applications
    module: str  # module in keras.applications holding its preprocess_input
    n_features: int
    imagenet_file: str  # the no-top weights file, under KERAS_APPLICATIONS


MODELS = {
    "mobilenet_v2": ModelSpec(
        "MobileNetV2", "mobilenet_v2", 1280,
        "mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
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
    warning: str | None = None


def resolve_weights(model: str, weights: str, seed: int, storage_options: dict) -> Weights:
    """Decide the weights on the client, before any image is read, so that a run fails fast."""
    if weights == "random":
        return Weights("random")
    if weights in ("imagenet", "auto"):
        try:
            imagenet_weights_file(model)
            return Weights("imagenet")
        except Exception as error:  # any download failure: no network, proxy, TLS, HTTP error
            if weights == "imagenet":
                raise UsageError(
                    f"ImageNet weights for {model} cannot be downloaded ({error}). Offline, copy "
                    f"{KERAS_APPLICATIONS}{MODELS[model].imagenet_file} to a folder or bucket and "
                    f"pass --weights PATH, or pass --weights random for seeded untrained features"
                ) from None
            return Weights(
                "random",
                f"ImageNet weights for {model} could not be downloaded ({error}); "
                f"features come from seeded random weights (seed {seed}), not from ImageNet",
            )
    fs, path = source.open_url(weights, storage_options)
    if not fs.isfile(path):
        raise UsageError(f"weights file {weights} not found: give an .h5 weights file, 'imagenet' or 'random'")
    return Weights(weights)


def imagenet_weights_file(model: str) -> str:
    """The local path of the model's ImageNet no-top weights, downloaded once into the Keras cache."""
    import keras

    name = MODELS[model].imagenet_file
    return keras.utils.get_file(name.rsplit("/", 1)[1], KERAS_APPLICATIONS + name, cache_subdir="models")


def local_weights_file(url: str, storage_options: dict) -> str:
    """A local copy of a weights file given by path or URL, kept for the life of the machine."""
    fs, path = source.open_url(url, storage_options)
    if source.is_local(fs):
        return path
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    local = os.path.join(tempfile.gettempdir(), "pipeline-weights", digest, os.path.basename(path))
    if not os.path.exists(local):
        os.makedirs(os.path.dirname(local), exist_ok=True)
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

    On a GPU it computes in float16 with float32 weights (Keras mixed precision), which tensor
    cores run faster: features stay within 1e-2 of float32's (tests/test_featurize.py). The gain
    is unmeasured with TensorFlow; for MobileNetV2 on an H200 through Keras' jax and torch
    backends there was none (README, GPU). On a CPU, where float16 is slower, it computes in
    float32. `mixed_precision` forces either.
    """

    def __init__(self, key: ModelKey, storage_options: dict, mixed_precision: bool | None = None):
        import keras
        import tensorflow as tf

        spec = MODELS[key.model]
        size = key.image_size
        on_gpu = bool(tf.config.list_logical_devices("GPU"))
        mixed_precision = on_gpu if mixed_precision is None else mixed_precision
        self.precision = "mixed_float16" if mixed_precision else "float32"
        self.device = f"{'GPU' if on_gpu else 'CPU'}, {self.precision}"  # for the manifest
        policy = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.precision)  # read by each layer as it is built
        try:
            model = getattr(keras.applications, spec.application)(
                include_top=False, weights=None, pooling="avg", input_shape=(size, size, 3)
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

        # One trace for every batch: images arrive at any size and are resized here, batched,
        # which costs the model's cores less than resizing one by one with Pillow.
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
        def embed(batch):
            pixels = tf.image.resize(tf.cast(batch, tf.float32), (size, size))
            return tf.cast(model(preprocess(pixels), training=False), tf.float32)

        self.model = model
        self.embed = embed
        self.n_features = spec.n_features

    def __call__(self, arrays: list[np.ndarray], batch_size: int) -> tuple[np.ndarray, float]:
        """Features of each image in order, and the seconds spent in the model (not waiting for it).

        Batches hold one image size and are padded to batch_size, so the graph is traced once.
        """
        out = np.empty((len(arrays), self.n_features), dtype=np.float32)
        seconds = 0.0
        by_shape: dict[tuple, list[int]] = {}
        for i, array in enumerate(arrays):
            by_shape.setdefault(array.shape, []).append(i)
        for shape, indexes in by_shape.items():
            for start in range(0, len(indexes), batch_size):
                chunk = indexes[start : start + batch_size]
                batch = np.zeros((batch_size, *shape), dtype=np.uint8)
                batch[: len(chunk)] = [arrays[i] for i in chunk]
                with _inference_lock:
                    started = time.perf_counter()
                    out[chunk] = self.embed(batch).numpy()[: len(chunk)]
                    seconds += time.perf_counter() - started
        return out, seconds


def featurizer(key: ModelKey, storage_options: dict) -> Featurizer:
    """The process's featurizer for `key`, built on first use and kept (never shipped in the graph)."""
    with _build_lock:
        if key not in _featurizers:
            configure_tensorflow()
            _featurizers[key] = Featurizer(key, storage_options)
            # TensorFlow and the model are some 400,000 Python objects that live as long as the
            # process: out of the garbage collector's sight, the process exits in a fraction of a
            # second instead of the seconds its last collections take (LocalCluster waits for it).
            gc.freeze()
        return _featurizers[key]


def configure_tensorflow() -> None:
    """Give TensorFlow this worker's threads and its own GPU, whose memory grows instead of being grabbed.

    Call before TensorFlow's first operation. On a machine with several GPUs, local worker i (the
    LocalCluster names its workers 0, 1, ...) uses GPU i mod the number of GPUs.
    """
    import tensorflow as tf

    try:
        from distributed import get_worker

        worker = get_worker()
        threads, name = worker.state.nthreads, worker.name
    except ValueError:  # not inside a Dask worker
        threads, name = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, None
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
        gpus = tf.config.list_physical_devices("GPU")
        if len(gpus) > 1 and isinstance(name, int):
            gpus = [gpus[name % len(gpus)]]
            tf.config.set_visible_devices(gpus, "GPU")
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:  # TensorFlow already started in this process: keep its settings
        pass


# --- one partition ---------------------------------------------------------------------------------


def featurize_partition(
    rows: pd.DataFrame,
    listing_fs,
    root: str,
    key: ModelKey,
    batch_size: int,
    max_pixels: int,
    storage_options: dict,
    output_fs,
    staged_path: str,
) -> dict:
    """Read, decode and featurize one partition's images; stage the features with their errors and timings."""
    seconds = {}
    started = time.perf_counter()
    blobs = source.read_many(listing_fs, [f"{root}/{path}" for path in rows["path"]])
    seconds["read"] = time.perf_counter() - started

    started = time.perf_counter()
    arrays, kept, errors = [], [], []
    for path, identity, blob in zip(rows["path"], rows["identity"], blobs):
        if isinstance(blob, BaseException):
            errors.append(sink.error_row(path, identity, "read", blob))
            continue
        try:
            arrays.append(images.decode(blob, key.image_size, max_pixels))
            kept.append(path)
        except Exception as error:  # Pillow raises many kinds for broken files; each is recorded
            errors.append(sink.error_row(path, identity, "decode", error))
    seconds["decode"] = time.perf_counter() - started

    started = time.perf_counter()
    model = featurizer(key, storage_options)
    seconds["model load"] = time.perf_counter() - started  # includes waiting for another thread's build
    features, seconds["model"] = model(arrays, batch_size)

    good = rows[rows["path"].isin(kept)]
    return sink.stage_partition(output_fs, staged_path, good, features, errors, seconds) | {"device": model.device}
