"""Recognize: which fruit is in a new photo, answered from a finished output.

`python -m pipeline recognize OUTPUT IMAGE...` featurizes the images with exactly the output's
model, image size and weights, projects them with its PCA, and answers for each the label of a
logistic regression trained on the output's PCA rows, with its probability, and the k nearest
images of the output in PCA space (row id, path, label, distance), found by the output's faiss
index (index.py: exact below a size, approximate above; `--exact` scans every row instead, for
checks). A handful of images is answered in this process; a folder or prefix of more runs on the
cluster as `run` does and writes predictions.parquet/ and errors.parquet.

The classifier is evaluate.py's (`evaluate.train`): what `evaluate` scores is what answers here.
It is trained once on every row of the output and saved beside it as recognizer.npz (plain
arrays, no pickle), keyed by the manifest's `finished` time: a new run or update trains it again.
Why a logistic regression rather than the neighbours' votes: on the 2,134 apples (random
weights), trained on the photos whose names start with `r_` and tested on the others, and the
other way round, it scored 35.2% and 38.2% against 31.3% and 35.2% for the best k-NN (k = 20
and 10); on a random hold-out, level (98.7% against 98.7 to 99.1%). It answers in one small
matrix product, whatever the size of the output, and gives a probability.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import posixpath
from typing import Callable, Sequence

import dask.config
import numpy as np
import pyarrow as pa
from PIL import Image

import cluster

from ..making import listings as spread_listing
from . import index
from .. import config, images, source
from ..making import featurize, finetune, job, preprocess, reduce, sink
from ..config import UsageError
from ..output import Output

log = logging.getLogger("pipeline")
CLASSIFIER = "recognizer.npz"  # beside the output's manifest
PREDICTIONS = "predictions.parquet"
FOLDER = "predictions"  # where a folder of many images is written by default: OUTPUT/predictions/


def setting(name: str, value=None) -> int:
    """A positive integer of pipeline.yaml's `recognize` settings, or `value` when given."""
    return config.positive_int(f"recognize.{name}", dask.config.get(f"pipeline.recognize.{name}", override_with=value))


@dataclasses.dataclass(frozen=True)
class Neighbour:
    """An image of the output near the one recognized."""

    path: str  # relative to the output's input, as in images.parquet
    label: str
    distance: float  # Euclidean, in PCA space (from the index's 8-bit codes where it is approximate)
    row: int  # the row's id in the output's index: its position in images.parquet/, part after part


@dataclasses.dataclass(frozen=True)
class Answer:
    """What is in one image: a label with its probability and the nearest images; or why it could not be used."""

    label: str | None
    confidence: float | None  # the classifier's probability of `label`
    neighbours: tuple[Neighbour, ...] = ()
    error: str | None = None  # "UnidentifiedImageError: not an image Pillow can read: ..."


# --- the classifier --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Classifier:
    """evaluate's logistic regression as plain arrays: it answers without scikit-learn, and saves as .npz."""

    classes: np.ndarray  # c labels
    coef: np.ndarray  # c × k (1 × k for two labels, as scikit-learn keeps it)
    intercept: np.ndarray
    trained_on: str  # the `finished` time of the output version it was trained on

    @classmethod
    def train(cls, vectors: np.ndarray, labels: np.ndarray, trained_on: str) -> "Classifier":
        from . import evaluate  # scikit-learn is imported only to train

        names = sorted(set(labels))
        if len(names) < 2:
            raise UsageError(f"recognize needs an output of at least 2 labels to tell apart; this one has {names}: label the images by folder")
        model, converged = evaluate.train(vectors, labels)
        if not converged:
            log.warning(f"the classifier did not converge in {evaluate.MAX_ITER} iterations")
        return cls(model.classes_.astype(str), model.coef_, model.intercept_, trained_on)

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """n × c: scikit-learn's predict_proba, computed here."""
        scores = vectors.astype(np.float64) @ self.coef.T + self.intercept
        if len(self.classes) == 2:  # one score, the second label's log-odds
            second = 1 / (1 + np.exp(-scores[:, 0]))
            return np.stack([1 - second, second], axis=1)
        scores -= scores.max(axis=1, keepdims=True)
        exp = np.exp(scores)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The most probable label of each row, and its probability."""
        probabilities = self.probabilities(vectors)
        best = probabilities.argmax(axis=1)
        return self.classes[best], probabilities[np.arange(len(best)), best]

    def save(self, fs, path: str) -> None:
        sink.publish(fs, path, lambda f: np.savez(f, **dataclasses.asdict(self)))

    @classmethod
    def load(cls, fs, path: str) -> "Classifier | None":
        """The classifier saved at `path`, or None when there is none."""
        try:
            with fs.open(path, "rb") as f, np.load(f, allow_pickle=False) as saved:
                return cls(**{field.name: saved[field.name] for field in dataclasses.fields(cls)} | {"trained_on": str(saved["trained_on"])})
        except (FileNotFoundError, KeyError, ValueError):  # none, or one of another version: train again
            return None


def trained_classifier(fs, root: str, manifest: dict, rows: Callable[[], "Reference"]) -> Classifier:
    """The output's saved classifier if it was trained on this version of the output; else trained on `rows()` and saved."""
    path = f"{root}/{CLASSIFIER}"
    saved = Classifier.load(fs, path)
    if saved is not None and saved.trained_on == manifest["finished"]:
        return saved
    reference = rows()
    classifier = Classifier.train(reference.vectors, reference.labels, manifest["finished"])
    try:
        classifier.save(fs, path)
    except Exception as error:  # a read-only output (a public bucket): train again next time
        log.warning(f"cannot save the classifier to {source.full_url(fs, path)} ({type(error).__name__}: {error}): "
                    "it will be trained again at each start")
    return classifier


# --- the rows the classifier learns from --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Queries:
    """Images to recognize: their paths and PCA coordinates (n × k float32)."""

    paths: list[str]
    vectors: np.ndarray


@dataclasses.dataclass(frozen=True)
class Reference:
    """Rows of the output: label and PCA coordinates (n × k float32)."""

    labels: np.ndarray
    vectors: np.ndarray


def read_rows(fs, parts: list[str], width: int, fraction: float = 1.0) -> Reference:
    """The label and PCA coordinates of the output's rows; a seeded `fraction` of them if below 1."""
    labels, vectors = [], []
    for number, part in enumerate(parts):
        table = sink.read_parquet(fs, part, ["label", "pca"])
        if fraction < 1:
            table = table.filter(np.random.default_rng([0, number]).random(table.num_rows) < fraction)
        labels.append(table["label"].to_numpy(zero_copy_only=False))
        vectors.append(sink.matrix(table["pca"], width))
    if not labels:
        raise UsageError("the output holds no images to recognize with: every image of its run failed")
    return Reference(np.concatenate(labels), np.concatenate(vectors))


# --- the recognizer --------------------------------------------------------------------------------


class Recognizer:
    """A finished output opened for answering, to recognize images one call at a time: the one place
    that loads what answering needs (model key, PCA, classifier, nearest-images index).

        recognizer = Recognizer.load("s3://bucket/out", {"endpoint_url": ...})
        answer, = recognizer.recognize([jpeg_bytes])      # or H × W × 3 uint8 arrays

    The model is built on the first call (seconds), then kept by the process. The index is
    memory-mapped (copied to a local cache first from an object store): loading holds little
    memory at any size.
    """

    def __init__(self, fs, root: str, manifest: dict, pca: reduce.Pca, parts: list[str], storage_options: dict, client=None):
        self.fs, self.root, self.manifest, self.parts, self.client = fs, root, manifest, parts, client
        self.url = source.full_url(fs, root)
        self.key = model_key(manifest)
        self.recipe = preprocess.recipe_of(manifest)  # new photos are preprocessed as the output's images were
        self.storage_options = storage_options
        self.mean, self.kept = pca.mean.astype(np.float32), pca.kept  # as the run projects (sink.finish_partition)
        self.index = index.SearchIndex.load(fs, root, manifest["finished"])
        fraction = min(1.0, setting("classifier-rows") / max(1, manifest["counts"]["written"]))
        self.classifier = trained_classifier(fs, root, manifest, lambda: self.rows(fraction))

    @classmethod
    def load(cls, output: str, storage_options: dict | None = None, *, client=None) -> "Recognizer":
        """Read what recognizing needs of a finished output; the classifier is trained here the first time."""
        storage_options = dict(storage_options or {})
        out = Output.at(output, storage_options)
        fs, root, manifest = out.fs, out.path, out.manifest()
        key = model_key(manifest)
        featurize.resolve_weights(key.model, key.weights, key.seed, storage_options)  # ImageNet's or the file: there, or say how
        pca = reduce.Pca.load(fs, f"{root}/{sink.PCA}")
        return cls(fs, root, manifest, pca, sorted(fs.glob(f"{root}/{sink.IMAGES}/*.parquet")), storage_options, client)

    def rows(self, fraction: float = 1.0) -> Reference:
        return read_rows(self.fs, self.parts, len(self.kept), fraction)

    def recognize(self, items: Sequence[np.ndarray | bytes], neighbours: int | None = None, *, exact: bool = False) -> list[Answer]:
        """An answer for each image (encoded bytes, or a decoded H × W × 3 uint8 array), in order.

        An image that cannot be decoded gets an answer with its error; the others are answered.
        `exact`: the nearest images by a scan of every row instead of the index (slow at scale: for checks).
        """
        k = setting("neighbours", neighbours)
        size, max_pixels = self.key.image_size, dask.config.get("pipeline.max-image-pixels")
        arrays, errors = {}, {}
        for index, item in enumerate(items):
            try:
                arrays[index] = self.decoded(item, size, max_pixels)
            except Exception as error:  # Pillow raises many kinds for broken files
                errors[index] = f"{type(error).__name__}: {error}"
        answered = dict(zip(arrays, self.answer(self.features(list(arrays.values())), k, exact=exact)))
        return [answered.get(index) or Answer(None, None, error=errors[index]) for index in range(len(items))]

    def decoded(self, item: np.ndarray | bytes, size: int, max_pixels: int) -> np.ndarray:
        """An image as the model is given it; a photo preprocessed first (fruit cropped on white) if the output's images were."""
        if self.recipe is None:
            return from_array(item, size) if isinstance(item, np.ndarray) else images.decode(bytes(item), size, max_pixels)
        if isinstance(item, np.ndarray):
            pixels = preprocess.prepare_array(from_array(item, max(item.shape[:2])), self.recipe)
        else:
            pixels = preprocess.prepare(bytes(item), self.recipe, max_pixels).pixels
        return images.decode(preprocess.encode(pixels, self.recipe.quality), size, max_pixels)  # as `run` read it

    def features(self, arrays: list[np.ndarray]) -> np.ndarray:
        """The CNN features of decoded images, by the output's own featurizer, built once per process."""
        if not arrays:
            return np.zeros((0, len(self.mean)), np.float32)
        model = featurize.featurizer(self.key, self.storage_options)
        batch = featurize.batch_size_for(config.settings().batch_size, model.on_gpu)
        features, _ = model(arrays, min(len(arrays), batch))
        return features

    def answer(self, features: np.ndarray, k: int, *, exact: bool = False) -> list[Answer]:
        """Label, probability and k nearest images for each row of features.

        On one BLAS thread: OpenBLAS's threads spin for a while after each product, on the cores
        TensorFlow needs next (measured: one image per call in 22 ms instead of 29 to 48).
        """
        with blas().limit(limits=1, user_api="blas"):
            queries = Queries([], (features - self.mean) @ self.kept.T)
            labels, confidences = self.classifier.predict(queries.vectors)
            nearest = self.nearest(queries.vectors, k, exact)
        return [
            Answer(str(label), float(confidence), neighbours_of(nearest, i))
            for i, (label, confidence) in enumerate(zip(labels, confidences))
        ]

    def nearest(self, vectors: np.ndarray, k: int, exact: bool = False) -> index.Nearest:
        """The k nearest rows of the output: from its index, or by a scan of every part if `exact`."""
        return self.index.exact(self.fs, self.parts, vectors, k) if exact else self.index.search(vectors, k)


def neighbours_of(nearest: index.Nearest, i: int) -> tuple[Neighbour, ...]:
    """Query `i`'s nearest rows as Neighbours, nearest first."""
    return tuple(Neighbour(str(p), str(l), float(d), int(r)) for p, l, d, r in
                 zip(nearest.paths[i], nearest.labels[i], nearest.distances[i], nearest.rows[i]))


@functools.cache
def blas():
    """This process's BLAS thread pools, to limit."""
    import threadpoolctl

    return threadpoolctl.ThreadpoolController()


def model_key(manifest: dict) -> featurize.ModelKey:
    """The featurizer that made the output's features: its model, image size, weights, seed and backend."""
    s = manifest["settings"]
    return featurize.ModelKey(s["model"], s["image_size"], manifest["weights"]["used"], s["seed"], s.get("backend", "tensorflow"))


def from_array(array: np.ndarray, size: int) -> np.ndarray:
    """A decoded image (H × W gray, H × W × 3 RGB or × 4 RGBA, uint8) as decoding a file leaves it: RGB, at most size × size."""
    if array.dtype != np.uint8 or not (array.ndim == 2 or array.ndim == 3 and array.shape[2] in (3, 4)):
        raise ValueError(f"an image array must be H × W, H × W × 3 or H × W × 4 of uint8, not {array.shape} of {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 3 and max(array.shape[:2]) <= size:
        return array
    image = images.to_rgb(Image.fromarray(array))
    if image.width > size or image.height > size:  # as images.decode reduces a large image
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(image)


# --- a folder of many images, on the cluster ---------------------------------------------------------


def staged_queries(fs, path: str, projection: tuple[np.ndarray, np.ndarray]) -> Queries:
    """A staged partition's paths and features, projected as the run projects."""
    mean, kept = projection
    table = sink.read_parquet(fs, path, ["path", "features"])
    return Queries(table["path"].to_pylist(), (sink.matrix(table["features"], len(mean)) - mean) @ kept.T)


def write_predictions(fs, path: str, queries: Queries, classifier: Classifier, searched: tuple, k: int, exact: bool) -> int:
    """Write one partition's predictions: path, label, confidence, neighbours (path, label, distance, row); returns its rows.

    `searched`: the output's filesystem, path, version and parts, whose index the worker loads once (memory-mapped).
    """
    fs_index, root, version, parts = searched
    labels, confidences = classifier.predict(queries.vectors)
    found = index.SearchIndex.load(fs_index, root, version)
    nearest = found.exact(fs_index, parts, queries.vectors, k) if exact else found.search(queries.vectors, k)
    n, width = nearest.distances.shape
    neighbours = pa.StructArray.from_arrays(
        [pa.array(nearest.paths.ravel().tolist(), pa.string()), pa.array(nearest.labels.ravel().tolist(), pa.string()),
         pa.array(nearest.distances.ravel().astype(np.float32)), pa.array(nearest.rows.ravel(), pa.int64())],
        names=["path", "label", "distance", "row"])
    table = pa.table({
        "path": pa.array(queries.paths, pa.string()),
        "label": pa.array(labels.tolist(), pa.string()),
        "confidence": pa.array(confidences.astype(np.float32)),
        "neighbours": pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32)), neighbours),
    })
    sink.write_parquet(fs, path, table)
    return n


def recognize_folder(recognizer: Recognizer, listing: source.Listing, to: str, s: config.Settings, client, k: int,
                     progress: bool, exact: bool = False) -> dict:
    """Featurize a folder's images on the cluster as `run` does; write predictions.parquet/ and errors.parquet to `to`.

    Written under `to`/_staging/ and moved into place at the end, like an output.
    """
    out_fs, out = source.open_url(to, s.storage_options)
    url = source.full_url(out_fs, out)
    Output(out_fs, out, url).check_writable()
    sink.remove(out_fs, out, sink.STAGING)
    staged, listed = job.stage_features(client, listing, recognizer.key, s, out_fs, out, progress,
                                        cluster.featurize_resources(client, s.gpu))
    errors = [error for part in staged for error in part["errors"]]
    sink.write_parquet(out_fs, f"{out}/{sink.STAGING}/{sink.ERRORS}", sink.errors_table(errors))
    final = f"{out}/{sink.STAGING}/{PREDICTIONS}"
    sink.make_folder(out_fs, final)
    projection = client.submit(reduce.projection, recognizer.fs, f"{recognizer.root}/{sink.PCA}")
    searched = (recognizer.fs, recognizer.root, recognizer.manifest["finished"], recognizer.parts)
    futures = []
    for number, part in enumerate(p for p in staged if p["rows"]):
        queries = client.submit(staged_queries, out_fs, part["staged"], projection)
        futures.append(client.submit(write_predictions, out_fs, f"{final}/{sink.part_name(number)}", queries,
                                     recognizer.classifier, searched, k, exact))
    with job.progress_bar("recognize", sum(p["rows"] for p in staged), progress) as bar:
        for future in futures:
            bar.update(future.result())
    sink.remove(out_fs, out, PREDICTIONS, sink.ERRORS)
    for name in (PREDICTIONS, sink.ERRORS):
        sink.move(out_fs, f"{out}/{sink.STAGING}/{name}", f"{out}/{name}")
    sink.remove(out_fs, out, sink.STAGING)
    return {"images": listed.images, "answered": sum(p["rows"] for p in staged), "failed": len(errors),
            "skipped_non_images": listed.skipped, "predictions": f"{url}/{PREDICTIONS}", "errors": f"{url}/{sink.ERRORS}"}


# --- the command ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Item:
    """One image asked about: as the user named it, and where to read it."""

    name: str
    fs: object
    path: str


def listed(inputs: Sequence[str], storage_options: dict) -> tuple[list[Item], list[source.Listing]]:
    """The images the arguments name: files as they are, folders and prefixes listed as `run` lists them; an
    inventory's manifest.json or a listing file is left to the workers to read (recognized on the cluster)."""
    items, listings = [], []
    extensions = config.settings().extensions
    for given in inputs:
        fs, path = source.open_url(given, storage_options)
        if spread_listing.is_listing(given) and not fs.isdir(path):
            listings.append(spread_listing.open_listing(given, storage_options, extensions, None))
        elif fs.isdir(path):
            listing = source.list_images(given, storage_options, extensions)
            listings.append(listing)
            items += [Item(posixpath.join(given, name), fs, f"{listing.root}/{name}") for name in listing.rows.path]
        else:
            items.append(Item(given, fs, path))
    return items, listings


def command(output: str, inputs: Sequence[str], *, to: str | None = None, neighbours=None, storage_options: dict | None = None,
            cluster_address: str | None = None, say: Callable[[str], None] = print, progress: bool = True,
            exact: bool = False) -> dict:
    """`python -m pipeline recognize`: a handful of images answered here, a folder of more on the cluster.

    `exact`: the nearest images by a scan of every row of the output rather than its index, for checks.

    Returns {"answers": [...]} (each Answer with its image's name as "path"), or, for a folder
    recognized on the cluster, what was written where.
    """
    storage_options = dict(storage_options or {})
    k = setting("neighbours", neighbours)
    items, listings = listed(inputs, storage_options)
    many = len(items) > setting("in-process-images") or any(isinstance(listing, spread_listing.Spread) for listing in listings)
    if many and not (len(inputs) == 1 and listings):
        raise UsageError(f"{len(items):,} images in {len(inputs)} arguments, more than `recognize.in-process-images` "
                         f"({setting('in-process-images')}): give them as one folder or prefix to recognize them on the cluster")
    recognizer = Recognizer.load(output, storage_options)
    say(f"features by {recognizer.key.model} at {recognizer.key.image_size} px, weights: {finetune.weights_note(recognizer.manifest)}")
    if recognizer.recipe is not None:
        if many:
            raise UsageError(f"{recognizer.url} was made from preprocessed photos: preprocess the folder first (python -m "
                             f"pipeline preprocess --input {inputs[0]} --output FOLDER), then recognize FOLDER")
        say(f"photos preprocessed as {recognizer.url}'s were: the fruit found ({recognizer.recipe.method}), cropped square "
            f"on white, {recognizer.recipe.size} × {recognizer.recipe.size}")
    s = config.settings(input=inputs[0], output=to or f"{recognizer.url}/{FOLDER}", cluster=cluster_address,
                        storage_options=storage_options)
    if many:
        check_destination(recognizer, s.output, storage_options)
    with contextlib.ExitStack() as stack:
        if many:
            recognizer.client = stack.enter_context(cluster.connect(s.cluster, s.local_cluster, say))
            say(f"dashboard: {recognizer.client.dashboard_link}")
            return recognize_folder(recognizer, listings[0], s.output, s, recognizer.client, k, progress, exact)
        return {"answers": [{"path": item.name} | dataclasses.asdict(answer)
                            for item, answer in zip(items, answers(recognizer, items, k, exact))],
                "preprocessed": recognizer.recipe is not None, "weights": finetune.weights_note(recognizer.manifest)}


def check_destination(recognizer: Recognizer, to: str, storage_options: dict) -> None:
    """Refuse a --to that is the output or inside it (however spelled: ./out, out/, file://, a link), but for its predictions/.

    recognize_folder replaces `to`'s _staging/ and errors.parquet: in the output, an interrupted
    update's work and the output's own errors.
    """
    protocol, path = source.real_location(*source.open_url(to, storage_options))
    output = source.real_location(recognizer.fs, recognizer.root)
    if protocol == output[0] and path != f"{output[1]}/{FOLDER}" and (path + "/").startswith(output[1] + "/"):
        raise UsageError(f"--to {to} is {'the output' if path == output[1] else 'inside the output'} {recognizer.url}: "
                         f"give another folder for the predictions, or no --to to write them to {recognizer.url}/{FOLDER}")


def answers(recognizer: Recognizer, items: list[Item], k: int, exact: bool = False) -> list[Answer]:
    """Read the items (concurrently, where each filesystem can) and recognize those that could be read."""
    blobs = []
    for fs, group in itertools.groupby(items, key=lambda item: item.fs):
        blobs += source.read_many(fs, [item.path for item in group], images.Limits.configured().max_bytes)
    readable = [blob for blob in blobs if not isinstance(blob, BaseException)]
    found = iter(recognizer.recognize(readable, k, exact=exact))
    return [Answer(None, None, error=f"{type(blob).__name__}: {blob}") if isinstance(blob, BaseException) else next(found)
            for blob in blobs]


def summary(result: dict) -> list[str]:
    """The lines a user reads: each image's label and neighbours, or what a folder's recognition wrote."""
    if "answers" not in result:
        lines = [f"images     {result['images']:,}  (non-image files skipped: {result['skipped_non_images']})",
                 f"answered   {result['answered']:,}", f"failed     {result['failed']:,}"]
        return lines + [f"written    {result['predictions']}", f"           {result['errors']}"]
    lines = []
    for answer in result["answers"]:
        if answer["error"]:
            lines.append(f"{answer['path']}: error: {answer['error']}")
            continue
        lines.append(f"{answer['path']}: {answer['label']} (confidence {answer['confidence']:.2f})")
        lines += [f"    {n['distance']:8.3f}  {n['label']}  {n['path']}" for n in answer["neighbours"]]
    return lines
