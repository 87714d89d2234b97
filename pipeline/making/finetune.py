"""Fine-tuning: teach the configured CNN the labels of a folder of images; write a no-top weights file for `run --weights`.

`python -m pipeline finetune --input LABELLED --output WEIGHTS.weights.h5` trains the `model` at
`image-size` (from ImageNet's weights when they can be had, else from the seeded random ones) with a
softmax head on the labelled images, augmented to look like preprocessed camera photos, holds out a
validation set by series, stops early, re-estimates batch-norm statistics, and writes the network
without its head (WEIGHTS) and what made it (WEIGHTS.json). Interrupted, it resumes from its last
finished epoch (WEIGHTS.checkpoint/). With --cluster it runs as one task on a worker (a GPU one when
there is one): images, batches and weights go between the storage and that worker only.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import posixpath
import re
import tempfile
import time
from datetime import datetime, timezone
from typing import Callable

import numpy as np
from PIL import Image

from . import featurize
from .. import config, images, source
from ..config import Settings, UsageError, masked

log = logging.getLogger("pipeline")
SUFFIX = ".weights.h5"  # Keras 3 saves and loads weights-only files by this ending
ABOUT = ".json"  # WEIGHTS + this: what made the weights (read by run's manifest, evaluate, recognize)
CHECKPOINT = ".checkpoint"  # WEIGHTS + this: the last finished epoch, removed once the weights are written
WHITE_LEVEL = 235  # a pixel this close to white on every channel is background (as preprocess leaves it)
SERIES = re.compile(r"^(?:(?P<series>[a-z]\w*?)_)?(?P<frame>\d+)_\d+\.\w+$", re.IGNORECASE)  # r_12_100.jpg, 12_100.jpg


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The `finetune` section of pipeline.yaml: how long and how to train, and how hard to augment."""

    epochs: int
    batch_size: int
    learning_rate: float
    patience: int
    validation: float
    bn_momentum: float
    bn_batches: int
    augment: dict

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def recipe(**overrides) -> Recipe:
    """The `finetune` settings of pipeline.yaml (and DASK_PIPELINE__FINETUNE__* variables), `overrides` (None = unset) on top."""
    values = config.section(Recipe, "finetune", overrides)
    try:
        for name in ("epochs", "batch_size", "patience", "bn_batches"):
            values[name] = int(values[name])
        for name in ("learning_rate", "validation", "bn_momentum"):
            values[name] = float(values[name])
        values["augment"] = {k.replace("_", "-"): float(v) for k, v in dict(values["augment"] or {}).items()}
    except (TypeError, ValueError) as error:
        raise UsageError(f"a `finetune` setting is not a number: {error}") from None
    if values["epochs"] < 1 or values["batch_size"] < 1 or values["patience"] < 1 or values["bn_batches"] < 0:
        raise UsageError("`finetune` epochs, batch-size and patience must be ≥ 1, bn-batches ≥ 0")
    if not 0 <= values["validation"] < 1 or not 0 <= values["bn_momentum"] < 1 or values["learning_rate"] <= 0:
        raise UsageError("`finetune` validation and bn-momentum must be in [0, 1), learning-rate > 0")
    return Recipe(**values)


# --- the data ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    """The labelled images decoded to image-size squares, which are held out, and what could not be read."""

    pixels: np.ndarray  # N × size × size × 3 uint8
    labels: np.ndarray  # N label numbers, indexes of `names`
    names: list[str]
    held_out: np.ndarray  # N booleans: the validation images
    how_held_out: str
    failed: int


def load(s: Settings, r: Recipe, say: Callable[[str], None]) -> Data:
    """List the input as `run` does, read and decode every Training image (`run`'s readers and decoders), hold out validation."""
    listing = source.list_images(s.input, s.storage_options, s.extensions)
    rows = listing.rows[listing.rows["split"].astype(object) != "Test"].reset_index(drop=True)
    if len(rows) < len(listing.rows):
        say(f"{len(listing.rows) - len(rows)} images of the Test split left out of training")
    limits = images.Limits.of(s)
    pixels, kept, failed = [], [], 0
    for start in range(0, len(rows), 256):  # a chunk of bytes at a time
        paths = list(rows["path"].iloc[start : start + 256].astype(str))
        blobs = source.read_many(listing.fs, [f"{listing.root}/{p}" for p in paths], limits.max_bytes)
        for i, (stage, result) in enumerate(featurize.decode_all(blobs, s.image_size, limits, os.cpu_count() or 1)):
            if stage:
                failed += 1
            else:
                pixels.append(square(result, s.image_size))
                kept.append(start + i)
    rows = rows.iloc[kept].reset_index(drop=True)
    names = sorted(set(rows["label"].astype(str)))
    if len(names) < 2:
        raise UsageError(f"{s.input} holds {len(names)} label(s): fine-tuning needs images in at least 2 label folders")
    labels = np.array([names.index(label) for label in rows["label"].astype(str)], dtype=np.int32)
    held_out, how = validation_split(list(rows["path"].astype(str)), labels, r.validation, s.seed)
    return Data(np.stack(pixels), labels, names, held_out, how, failed)


def square(array: np.ndarray, size: int) -> np.ndarray:
    """A decoded image as the model's size × size input (decode leaves smaller images at their size)."""
    if array.shape[:2] == (size, size):
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), Image.Resampling.BILINEAR))


def validation_split(paths: list[str], labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, str]:
    """Which images are held out for validation, and how: by series where the names say them, else at random.

    Fruits-360 photographs a fruit turning: 12_100.jpg, 13_100.jpg... are neighbouring frames of one
    series (r_, r2_: other series), near copies of each other. A frame held out beside its neighbours
    in training would flatter the validation, so each series gives a contiguous run of its frames
    (a `fraction` of them, at a seeded place): whole arcs of the rotation, not neighbouring frames.
    Names without frame numbers are held out at random, a `fraction` of each label.
    """
    held = np.zeros(len(paths), dtype=bool)
    if fraction <= 0:
        return held, "none"
    rng = np.random.default_rng(seed)
    matches = [SERIES.match(posixpath.basename(p)) for p in paths]
    if all(matches):
        series: dict[tuple, list[tuple[int, int]]] = {}
        for i, (path, match) in enumerate(zip(paths, matches)):
            series.setdefault((posixpath.dirname(path), match["series"] or ""), []).append((int(match["frame"]), i))
        for frames in series.values():
            frames.sort()
            n = round(len(frames) * fraction)
            if n and n < len(frames):
                start = int(rng.integers(len(frames) - n + 1))
                held[[i for _, i in frames[start : start + n]]] = True
        how = f"by series: a contiguous {fraction:.0%} of the frames of each of {len(series)} series"
    else:
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            n = round(len(members) * fraction)
            if n and n < len(members):
                held[rng.choice(members, n, replace=False)] = True
        how = f"at random: {fraction:.0%} of each label (the names carry no series)"
    for label in np.unique(labels):  # every label keeps an image to train on
        members = np.flatnonzero(labels == label)
        if held[members].all():
            held[members[0]] = False
    return held, how


# --- augmentation: preprocessed camera photos ---------------------------------------------------------


def textures(size: int, count: int = 64, seed: int = 0) -> np.ndarray:
    """count × size × size × 3 uint8 backgrounds to paste where preprocessing left white, made once.

    Crops of photographs shipped with scikit-learn (china.jpg, flower.jpg) and matplotlib
    (grace_hopper.jpg) — not scikit-image's, which benchmarks/make_photos.py pastes the fruits on —
    and generated textures: smooth coloured noise at several scales (foliage, soil, cloth, wood).
    """
    rng = np.random.default_rng(seed)
    photos = []
    for path in photo_files():
        with Image.open(path) as image:
            photos.append(np.asarray(image.convert("RGB")))
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        if photos and i % 2 == 0:
            photo = photos[rng.integers(len(photos))]
            side = int(rng.integers(min(photo.shape[:2]) // 8, min(photo.shape[:2]) // 2))
            top, left = rng.integers(photo.shape[0] - side), rng.integers(photo.shape[1] - side)
            crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.Resampling.BILINEAR)
            out[i] = np.asarray(crop)
        else:
            out[i] = generated_texture(size, rng)
    return out


def photo_files() -> list[pathlib.Path]:
    """The photographs other libraries ship (no download), for backgrounds; those not installed are left out."""
    found = []
    for module, name in (("sklearn.datasets", "images/china.jpg"), ("sklearn.datasets", "images/flower.jpg"),
                         ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg")):
        try:
            package = __import__(module, fromlist=["__file__"])
        except ImportError:
            continue
        path = pathlib.Path(package.__file__).with_name(name.split("/")[0]) / name.split("/", 1)[1]
        if path.exists():
            found.append(path)
    return found


def generated_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth coloured noise: random grids at a few scales, upsampled and summed, mapped between two random colours."""
    field = np.zeros((size, size), np.float32)
    for cells in rng.choice([2, 4, 8, 16, 32], size=3, replace=False):
        grid = rng.random((int(cells), int(cells))).astype(np.float32)
        field += np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)) * rng.uniform(0.3, 1.0)
    field = (field - field.min()) / max(float(np.ptp(field)), 1e-6)
    low, high = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    return (low + field[..., None] * (high - low)).clip(0, 255).astype(np.uint8)


def augmenter(size: int, strengths: dict, bank: np.ndarray, seed: int):
    """A tf function: a uint8 batch of images on white → the same fruits re-framed as preprocessed camera photos are.

    Geometry (Keras' random layers, filling with white: position, scale, a full turn, flips), then
    backgrounds where preprocessing leaves white (a ring around the fruit, or patches: what an
    imperfect segmentation keeps), then lighting (exposure and a colour cast) and sensor noise on
    what is not white. Returns float32 in 0–255.
    """
    import keras
    import tensorflow as tf

    get = lambda name: float(strengths.get(name, 0.0))  # noqa: E731
    layers = [keras.layers.RandomFlip("horizontal_and_vertical", seed=seed)]
    if get("rotation"):
        layers.append(keras.layers.RandomRotation(get("rotation") / 2, fill_mode="constant", fill_value=255.0, seed=seed + 1))
    if get("scale"):
        layers.append(keras.layers.RandomZoom((-get("scale"), get("scale")), fill_mode="constant", fill_value=255.0, seed=seed + 2))
    if get("shift"):
        layers.append(keras.layers.RandomTranslation(get("shift"), get("shift"), fill_mode="constant", fill_value=255.0, seed=seed + 3))
    geometry = keras.Sequential(layers)
    bank = tf.constant(bank, tf.float32)
    rows = tf.range(size, dtype=tf.float32)[None, :, None]
    columns = tf.range(size, dtype=tf.float32)[None, None, :]

    def backgrounds(x):
        n = tf.shape(x)[0]
        white = tf.reduce_min(x, axis=-1) >= WHITE_LEVEL  # n × size × size
        fruit = tf.cast(~white, tf.float32)[..., None]
        narrow = tf.nn.max_pool2d(fruit, ksize=int(size * 0.08) | 1, strides=1, padding="SAME")[..., 0] > 0
        wide = tf.nn.max_pool2d(fruit, ksize=int(size * 0.25) | 1, strides=1, padding="SAME")[..., 0] > 0
        ring = tf.where(tf.random.uniform([n, 1, 1]) < 0.5, narrow, wide)  # of 4% or 12% of the side around the fruit
        patches = tf.zeros_like(white)
        for _ in range(3):
            centre = tf.random.uniform([n, 2], 0, size)
            half = tf.random.uniform([n, 2], 0.05, 0.25) * size
            inside = (tf.abs(rows - centre[:, 0, None, None]) < half[:, 0, None, None]) & \
                     (tf.abs(columns - centre[:, 1, None, None]) < half[:, 1, None, None])
            patches |= inside & (tf.random.uniform([n, 1, 1]) < 0.5)
        kind = tf.random.uniform([n, 1, 1])
        where = tf.where(kind < 0.5, ring, tf.where(kind < 0.8, patches, ring | patches))
        apply = tf.random.uniform([n, 1, 1]) < get("background")
        where = where & white & apply
        texture = tf.gather(bank, tf.random.uniform([n], 0, bank.shape[0], dtype=tf.int32))
        texture = tf.image.random_flip_left_right(tf.image.rot90(texture, tf.random.uniform([], 0, 4, tf.int32)))
        return tf.where(where[..., None], texture, x)

    def light_and_noise(x):
        n = tf.shape(x)[0]
        lit = ~(tf.reduce_min(x, axis=-1, keepdims=True) >= 254.5)  # pure white stays white, as preprocessing writes it
        gain = tf.random.uniform([n, 1, 1, 1], 1 - get("light"), 1 + get("light")) * \
            tf.random.uniform([n, 1, 1, 3], 1 - get("light") / 3, 1 + get("light") / 3)
        sigma = tf.random.uniform([n, 1, 1, 1], 0, get("noise") * 255)
        changed = x * gain + tf.random.normal(tf.shape(x)) * sigma
        return tf.clip_by_value(tf.where(lit, changed, x), 0, 255)

    @tf.function
    def augment(batch):
        x = geometry(tf.cast(batch, tf.float32), training=True)
        if get("background"):
            x = backgrounds(x)
        return light_and_noise(x)

    return augment


# --- the model ---------------------------------------------------------------------------------------


def networks(s: Settings, starting: featurize.Weights, n_labels: int, r: Recipe, steps: int = 1):
    """(the featurizer's own network with its starting weights, a trainable classifier around it: uint8-range float
    images → label probabilities). Batch norm's moving averages follow the batches faster (bn-momentum): Keras'
    0.99 (MobileNetV2's 0.999) would leave them near their starting values after a few hundred steps. Adam's rate
    falls from learning-rate to 0 along a cosine over the `steps` of all the epochs: a short budget still converges."""
    import keras

    backbone, prepare = featurize.keras_network(featurize.ModelKey(s.model, s.image_size, starting.used, s.seed), s.storage_options)
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = r.bn_momentum
    pixels = keras.Input((s.image_size, s.image_size, 3), dtype="float32")
    features = backbone(keras.layers.Lambda(prepare)(pixels))
    probabilities = keras.layers.Dense(n_labels, activation="softmax", name="labels")(keras.layers.Dropout(0.2)(features))
    classifier = keras.Model(pixels, probabilities)
    classifier.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(r.learning_rate, steps)), loss="sparse_categorical_crossentropy",
                       metrics=["accuracy"])
    return backbone, prepare, classifier


def reestimate_batch_norm(backbone, prepare, batches) -> int:
    """Set every batch-norm layer's moving mean and variance to their average over `batches` (training images as
    augmented): the statistics inference uses, now those of the trained network. Returns the batches seen."""
    import keras

    norms = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [layer.momentum for layer in norms]
    seen = 0
    try:
        for seen, batch in enumerate(batches, start=1):
            for layer in norms:  # a running mean: batch k weighs 1/k
                layer.momentum = 1.0 - 1.0 / seen
            backbone(prepare(batch), training=True)
    finally:
        for layer, momentum in zip(norms, saved):
            layer.momentum = momentum
    return seen


# --- training, with progress, early stopping and a checkpoint per epoch ----------------------------------


class Checkpoint:
    """WEIGHTS.checkpoint/: the classifier (and its optimizer) after the last finished epoch, the best epoch's
    weights and the history, on any fsspec URL; read back to resume, removed once the weights are written."""

    def __init__(self, weights_url: str, storage_options: dict):
        self.fs, self.path = source.open_url(weights_url + CHECKPOINT, storage_options)

    def state(self) -> dict | None:
        """The history and best epoch of the last finished epoch, or None without a checkpoint."""
        try:
            return json.loads(self.fs.cat_file(f"{self.path}/state.json"))
        except FileNotFoundError:
            return None

    def save(self, model, best: list | None, state: dict) -> None:
        """Write the model's weights (optimizer included), the best weights, then the state that names them complete."""
        self.fs.makedirs(self.path, exist_ok=True)
        put(self.fs, f"{self.path}/last{SUFFIX}", lambda path: model.save_weights(path))
        if best is not None:
            put(self.fs, f"{self.path}/best.npz", lambda path: np.savez(path, *best))
        self.fs.pipe_file(f"{self.path}/state.json", json.dumps(state).encode())

    def restore(self, model) -> list | None:
        """Load the last epoch's weights into `model` (its optimizer built first); return the best epoch's weights."""
        model.optimizer.build(model.trainable_variables)
        get(self.fs, f"{self.path}/last{SUFFIX}", model.load_weights)
        if not self.fs.exists(f"{self.path}/best.npz"):
            return None
        return get(self.fs, f"{self.path}/best.npz", lambda path: list(np.load(path).values()))

    def remove(self) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)


def put(fs, path: str, write: Callable[[str], None]) -> None:
    """Write a file with a function that writes local files (Keras, NumPy), then copy it to `path` on `fs`."""
    with tempfile.TemporaryDirectory() as folder:
        local = os.path.join(folder, posixpath.basename(path))
        write(local)
        fs.put_file(local, path)


def get(fs, path: str, read: Callable[[str], object]):
    """Read a file on `fs` with a function that reads local files, through a local copy."""
    with tempfile.TemporaryDirectory() as folder:
        local = os.path.join(folder, posixpath.basename(path))
        fs.get_file(path, local)
        return read(local)


def progress_callback(checkpoint: Checkpoint, state: dict, patience: int, say: Callable[[str], None]):
    """A Keras callback: one line per epoch, the best validation accuracy's weights kept, early stopping, a checkpoint."""
    import keras

    class Progress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            entry = {"epoch": epoch + 1, "loss": logs.get("loss"), "accuracy": logs.get("accuracy"),
                     "val_accuracy": logs.get("val_accuracy", logs.get("accuracy")),
                     "seconds": time.perf_counter() - self.started}
            state["history"].append(entry)
            # A tie goes to the later epoch: further along the schedule, it has learned more (clean validation
            # frames saturate near 1.0 long before the camera-like photos do).
            improved = state["best"] is None or entry["val_accuracy"] >= state["best"]["val_accuracy"]
            if improved:
                state["best"] = entry
                self.best = self.model.get_weights()
            state["epochs"] = epoch + 1
            stop = epoch + 1 - state["best"]["epoch"] >= patience
            state["stopped_early"] = state["stopped_early"] or stop
            checkpoint.save(self.model, self.best if improved else None, state)  # before it is said: an epoch said is kept
            say(f"epoch {epoch + 1:3d}  loss {entry['loss']:.4f}  accuracy {entry['accuracy']:.3f}  "
                f"val accuracy {entry['val_accuracy']:.3f}{' *' if improved else '  '}  {entry['seconds']:.1f} s")
            if stop:
                self.model.stop_training = True
                say(f"no better validation accuracy in {patience} epochs: stopping, keeping epoch {state['best']['epoch']}")

    return Progress()


def train(s: Settings, r: Recipe, weights_url: str, say: Callable[[str], None]) -> dict:
    """Fine-tune where this runs (this process or a worker): read, train, write WEIGHTS and WEIGHTS.json; return the JSON."""
    keras = featurize.import_keras("tensorflow")
    import tensorflow as tf

    started = time.perf_counter()
    starting = featurize.resolve_weights(s.model, s.weights, s.seed, s.storage_options)
    if starting.warning:
        say(starting.warning)
    data = load(s, r, say)
    train_x, train_y = data.pixels[~data.held_out], data.labels[~data.held_out]
    val_x, val_y = data.pixels[data.held_out], data.labels[data.held_out]
    say(f"{len(data.labels)} images, {len(data.names)} labels ({data.failed} unreadable): {len(train_y)} to train on, "
        f"{len(val_y)} held out {data.how_held_out}")
    keras.utils.set_random_seed(s.seed)
    backbone, prepare, classifier = networks(s, starting, len(data.names), r, r.epochs * -(-len(train_y) // r.batch_size))
    augment = augmenter(s.image_size, r.augment, textures(s.image_size, seed=s.seed), s.seed)
    training = (tf.data.Dataset.from_tensor_slices((train_x, train_y)).shuffle(len(train_y), seed=s.seed)
                .batch(r.batch_size).map(lambda x, y: (augment(x), y)).prefetch(2))
    validation = (tf.data.Dataset.from_tensor_slices((val_x.astype(np.float32), val_y)).batch(r.batch_size)
                  if len(val_y) else None)

    checkpoint = Checkpoint(weights_url, s.storage_options)
    state = checkpoint.state() or {"history": [], "best": None, "epochs": 0, "stopped_early": False}
    progress = progress_callback(checkpoint, state, r.patience, say)
    progress.best = None
    if state["epochs"]:
        progress.best = checkpoint.restore(classifier)
        say(f"resuming after epoch {state['epochs']} from {source.full_url(checkpoint.fs, checkpoint.path)}")
    device = featurize.gpu_name() if featurize.on_gpu("tensorflow") else None
    say(f"training {s.model} at {s.image_size} px from {starting.used} weights on the {'GPU ' + device if device else 'CPU'}, "
        f"at most {r.epochs} epochs of {-(-len(train_y) // r.batch_size)} batches")
    if state["epochs"] < r.epochs and not state["stopped_early"]:
        classifier.fit(training, validation_data=validation, epochs=r.epochs, initial_epoch=state["epochs"],
                       callbacks=[progress], verbose=0, shuffle=False)  # shuffled by the dataset
    if progress.best is not None:
        classifier.set_weights(progress.best)
    batches = reestimate_batch_norm(backbone, prepare, (x for x, _ in training.repeat().take(r.bn_batches)))
    val_accuracy = float(classifier.evaluate(validation, verbose=0)[1]) if validation is not None else None
    say(f"batch norm re-estimated over {batches} training batches; validation accuracy {val_accuracy if val_accuracy is None else round(val_accuracy, 3)}")

    fs, path = source.open_url(weights_url, s.storage_options)
    put(fs, path, lambda local: backbone.save_weights(local))
    about = masked({
        "weights": weights_url, "model": s.model, "image_size": s.image_size, "features": int(backbone.output.shape[-1]),
        "starting_weights": {"used": starting.used, "seed": s.seed if starting.used == "random" else None,
                             "warning": starting.warning},
        "data": {"input": s.input, "images": int(len(data.labels)), "unreadable": data.failed, "trained_on": int(len(train_y)),
                 "validation": int(len(val_y)), "held_out": data.how_held_out},
        "labels": data.names,
        "epochs": state["epochs"], "best_epoch": state["best"]["epoch"] if state["best"] else None,
        "stopped_early": state["stopped_early"], "validation_accuracy": val_accuracy,
        "batch_norm": {"momentum": r.bn_momentum, "reestimated_over_batches": batches},
        "history": state["history"], "seconds": time.perf_counter() - started,
        "device": f"GPU ({device})" if device else "CPU", "finished": datetime.now(timezone.utc).isoformat(),
        "settings": r.as_dict(), "versions": {"keras": keras.__version__, "tensorflow": tf.__version__},
    })
    fs.pipe_file(path + ABOUT, (json.dumps(about, indent=2) + "\n").encode())
    checkpoint.remove()
    return about


# --- the command -------------------------------------------------------------------------------------


def check_output(weights_url: str) -> None:
    """The weights file must end in .weights.h5: Keras 3 saves and loads weights-only files by that ending."""
    if not weights_url.endswith(SUFFIX):
        raise UsageError(f"--output {weights_url}: name the weights file WEIGHTS{SUFFIX} (Keras 3 reads weights files by "
                         f"this ending), e.g. {posixpath.splitext(weights_url)[0]}{SUFFIX}")


def finetune(s: Settings, r: Recipe, weights_url: str, say: Callable[[str], None] = print) -> dict:
    """`python -m pipeline finetune`: train in this process, or with `s.cluster` given, as one task on a worker
    of that cluster (a GPU worker when there is one); returns WEIGHTS.json's content."""
    check_output(weights_url)
    featurize.model_spec(s.model)
    if s.cluster is None:
        return train(s, r, weights_url, say)
    import cluster
    from distributed import get_worker

    def on_worker(s, r, weights_url):
        worker = get_worker()
        return train(s, r, weights_url, lambda line: worker.log_event("finetune", line))

    with cluster.connect(s.cluster, s.local_cluster, say) as client:
        gpu = cluster.featurize_resources(client, "auto")
        say(f"dashboard: {client.dashboard_link}; training on {'a GPU worker' if gpu else 'a worker'}")
        client.subscribe_topic("finetune", lambda event: say(event[1]))
        future = client.submit(on_worker, s, r, weights_url, resources={"GPU": 1} if gpu else None, pure=False,
                               key=f"finetune-{client.id}")
        return future.result()


def about(weights_url: str, storage_options: dict) -> dict | None:
    """The WEIGHTS.json beside a weights file that `finetune` wrote; None for ImageNet's, random ones, or any other file."""
    if weights_url in ("imagenet", "random", "auto"):
        return None
    try:
        fs, path = source.open_url(weights_url, storage_options)
        return json.loads(fs.cat_file(path + ABOUT))
    except (OSError, ValueError):  # none beside it (FileNotFoundError), unreadable, not JSON: not ours to describe
        return None


def check_fits(made: dict | None, model: str, image_size: int) -> None:
    """Refuse fine-tuned weights for another model (Keras would fail on the first image, in a worker, saying only
    that shapes differ); warn for another image size, which loads but gives features unlike those trained."""
    if not made:
        return
    fix = f"pass --model {made['model']} --image-size {made['image_size']}"
    if made["model"] != model:
        raise UsageError(f"{made['weights']} was fine-tuned for {made['model']} at {made['image_size']} px, not {model}: {fix}")
    if made["image_size"] != image_size:
        log.warning(f"{made['weights']} was fine-tuned at {made['image_size']} px, not {image_size}: the features differ from "
                    f"those it learnt; {fix}")


def summary(made: dict | None) -> str | None:
    """One line on fine-tuned weights: on what, how many labels, when, validation accuracy; None if not fine-tuned."""
    if not made:
        return None
    start = made["starting_weights"]
    began = "random weights (seed {})".format(start["seed"]) if start["used"] == "random" else start["used"]
    accuracy = made.get("validation_accuracy")
    return (f"fine-tuned on {made['data']['input']} ({made['data']['trained_on']} images, {len(made['labels'])} labels) "
            f"from {began}, {made['finished'][:16].replace('T', ' ')} UTC, {made['epochs']} epochs, validation accuracy "
            + (f"{accuracy:.3f}" if accuracy is not None else "not measured"))


def weights_note(manifest: dict) -> str:
    """Which weights made an output's features, from its manifest: ImageNet's, random ones (their seed), or fine-tuned
    (on what, when, validation accuracy: WEIGHTS.json as the run found it), said plainly when they were random."""
    weights = manifest.get("weights", {})
    used, seed = weights.get("used", "?"), manifest.get("settings", {}).get("seed")
    if used == "random":
        asked = f" (asked for {weights.get('requested')}: ImageNet's could not be downloaded)" if weights.get("warning") else ""
        return f"random, seed {seed}{asked}: an untrained CNN; these figures are not ImageNet's"
    if used == "imagenet":
        return "imagenet"
    return summary(weights.get("finetuned")) or f"{used} (a weights file)"
