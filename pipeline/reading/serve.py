"""Serve: `python -m pipeline serve OUTPUT` answers photos over HTTP and takes its users' corrections.

    POST /recognize        an image (multipart field `image`, or the raw body) → label, confidence,
                           details, nearest images with thumbnail URLs, the output version answering
    GET  /thumbnails/{row} a small JPEG of a row of the output (rows only: no path from a request)
    POST /labels           a photo and its right label, stored under the output's input in
                           Contributed/<label>/<sha256>.<ext> with a JSON of its details (token needed)
    GET  /info             the output's version and labels, whether corrections are open
    GET  /healthz, /metrics (Prometheus), /docs (the framework's schema page), / (the phone page)

Concurrent photos are answered together (Batcher): each is decoded as it arrives, in a pool of
threads (`serve.decode-threads`), then waits while the model is busy; each model call takes every
photo waiting, up to `serve.max-batch`, and waits at most `serve.batch-wait-ms` for those still
being decoded. With `--update-every`, contributions not yet in the output start an
`update` in another process; the new version is loaded beside the old one and answers from then
on, the requests in flight finishing on the old. `--reload-every` only follows the output's
versions (the replicas beside the one that updates).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import os
import pathlib
import posixpath
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from datetime import datetime, timezone
from typing import Callable

import dask.config
import numpy as np
import pyarrow.compute as pc
import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import ExifTags, Image, ImageOps
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, generate_latest
from starlette.formparsers import MultiPartException, MultiPartParser

from . import recognize
from .. import config, images, source
from ..making import featurize, sink
from ..config import UsageError
from ..output import Output

log = logging.getLogger("pipeline")
PAGE = pathlib.Path(__file__).with_name("static") / "index.html"
SAMPLE_DETAILS = pathlib.Path(__file__).parent.parent / "sample" / "apple-details.yaml"  # the shipped sample's 13 apples
DETAILS_FILES = ("details.yaml", "details.json")  # looked for in the output
FORMATS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "WEBP": "webp", "TIFF": "tif"}  # stored under this extension
UNSAFE_LABEL = re.compile(r"[/\\\x00-\x1f\x7f]|\.\.")
TEXT_LIMIT = 1000  # characters of a note or a place sent with a correction
# `serve.max-batch: auto` on a CPU. On the 2-core AMD EPYC, ONNX Runtime answered 32 clients at 1.08 and 1.03 × the
# bare batch-32 rate in batches of at most 8, against 0.84 and 0.80 × in batches of 32 (docs/serve.md): large batches
# gain little on a CPU, and smaller ones keep the model busy while the last batch's answers travel.
CPU_MAX_BATCH = 8


def setting(name: str, value=None):
    """A value of pipeline.yaml's `serve` settings, or `value` when given."""
    return dask.config.get(f"pipeline.serve.{name}", override_with=value)


def positive(name: str, value=None) -> int:
    return config.positive_int(f"serve.{name}", setting(name, value))


def milliseconds(name: str) -> float:
    """A setting in milliseconds, 0 or more."""
    value = setting(name)
    try:
        if float(value) >= 0:
            return float(value)
    except (TypeError, ValueError):
        pass
    raise UsageError(f"serve.{name} must be 0 or more milliseconds, got {value!r}")


def max_batch(recognizer: recognize.Recognizer) -> int:
    """Photos in one model call at most: serve.max-batch, or for `auto` CPU_MAX_BATCH on a CPU and featurize's batch on a GPU."""
    value = setting("max-batch")
    if str(value).strip().lower() != "auto":
        return positive("max-batch")
    on_gpu = featurize.featurizer(recognizer.key, recognizer.storage_options).on_gpu
    return featurize.batch_size_for("auto", True) if on_gpu else CPU_MAX_BATCH


def seconds(text: str | None) -> float | None:
    """A duration such as 30s, 10m, 1h or 600 (seconds); None stays None."""
    if text in (None, "", "null"):
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not match or float(match[1]) <= 0:
        raise UsageError(f"a duration must be a positive number of seconds or end with s, m or h (30s, 10m, 1h), got {text!r}")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


class Refused(Exception):
    """A request the service will not answer: a 4xx status and one line saying why."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


# --- one version of the output ---------------------------------------------------------------------


@dataclasses.dataclass(eq=False)  # a version is itself: compared and hashed by identity
class Version:
    """A finished output's version as the service answers from it: its recognizer and its rows' paths."""

    recognizer: recognize.Recognizer
    contributed: frozenset[str]  # the paths of the contributions it holds

    @classmethod
    def load(cls, output: str, storage_options: dict) -> "Version":
        """Load the output and warm the model on a full batch of the largest photos: the first request is answered
        as fast as the others, and the engine's memory is taken at start, not grown under the first busy minutes."""
        recognizer = recognize.Recognizer.load(output, storage_options)
        side = recognizer.key.image_size  # photos are decoded to at most side × side
        recognizer.answer(recognizer.features([np.full((side, side, 3), 255, np.uint8)] * max_batch(recognizer)), 1)
        paths = recognizer.index.rows["path"]
        held = pc.filter(paths, pc.starts_with(paths, f"{setting('contributions')}/"))
        return cls(recognizer, frozenset(held.to_pylist()))

    def decode(self, data: bytes, max_pixels: int) -> np.ndarray:
        """A photo as the model is given it (the pipeline's decoding, the output's preprocessing); raises what it cannot read."""
        return self.recognizer.decoded(data, self.recognizer.key.image_size, max_pixels)

    def answer(self, photos: list[np.ndarray]) -> list[recognize.Answer]:
        """The answers for decoded photos, in one model call."""
        recognizer = self.recognizer
        return recognizer.answer(recognizer.features(photos), recognize.setting("neighbours"))

    def path(self, row: int) -> str:
        """The path of a row of the output (its id in the index), relative to the input."""
        rows = self.recognizer.index.rows
        if not 0 <= row < rows.num_rows:
            raise Refused(404, f"no row {row}: the output has rows 0 to {rows.num_rows - 1}")
        return rows["path"][row].as_py()

    @property
    def name(self) -> str:
        return self.recognizer.manifest["finished"]

    @property
    def input(self) -> str:
        return self.recognizer.manifest["input"]

    @property
    def labels(self) -> list[str]:
        return [str(label) for label in self.recognizer.classifier.classes]


# --- what comes in ----------------------------------------------------------------------------------


async def read_body(request, limit: int) -> bytes:
    """The request's body, refused (413) as soon as it is larger than `limit` bytes: never held whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"too large: {int(declared):,} bytes, more than the limit of {limit:,} (serve.max-upload-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"too large: more than the limit of {limit:,} bytes (serve.max-upload-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def upload(request, limit: int) -> tuple[bytes, dict[str, str]]:
    """The image of a request (multipart field `image`, or the raw body) and the form's text fields."""
    body = await read_body(request, limit)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        if not body:
            raise Refused(400, "no image: send it as the request body or as the multipart field `image`")
        return body, {}

    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=10, max_part_size=64 * 1024).parse()
    except MultiPartException as error:
        raise Refused(400, f"not a form this service reads: {error}") from None
    fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    image = form.get("image")
    if image is None or isinstance(image, str):
        raise Refused(400, "no image: the multipart form has no file field `image`")
    data = await image.read()
    await form.close()
    if not data:
        raise Refused(400, "no image: the field `image` is empty")
    return data, fields


def refusal(error: str) -> Refused:
    """The 4xx for an image Recognizer could not read (its answer's error, "Type: message")."""
    kind, _, message = error.partition(": ")
    if kind == "DecompressionBombError":
        return Refused(413, f"too many pixels: {message}")
    if kind == "UnidentifiedImageError":
        return Refused(415, f"not an image: {message}")
    if "format" in kind.lower() or "format" in message.lower() and ("allow" in message.lower() or "not one of" in message.lower()):
        return Refused(415, f"wrong format: {message}")
    return Refused(400, f"unreadable image: {message}")


def checked_label(label: str | None, known: list[str], new_labels: bool) -> str:
    """A label a user sent, as a folder name can safely hold it: one of the output's unless new ones are allowed."""
    label = (label or "").strip()
    if not label:
        raise Refused(400, "no label: send the right label in the field `label`")
    if UNSAFE_LABEL.search(label) or label in (".", "..") or len(label) > 100:
        raise Refused(400, "not a label: at most 100 characters, no '/', '\\', '..' or control characters")
    if label not in known and not new_labels:
        raise Refused(400, f"unknown label {label!r}: one of the output's {len(known)} labels (GET /info), "
                           "or start the service with serve.new-labels: true")
    return label


def exif_details(image: Image.Image) -> dict:
    """When and where a photo was taken, and by what, as its EXIF says (what there is of it)."""
    exif = image.getexif()
    found = {}
    taken = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.DateTimeOriginal) or exif.get(ExifTags.Base.DateTime)
    if taken:
        found["taken_at"] = str(taken)
    camera = " ".join(str(exif.get(tag, "")).strip() for tag in (ExifTags.Base.Make, ExifTags.Base.Model)).strip()
    if camera:
        found["camera"] = camera
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    with contextlib.suppress(Exception):  # GPS fields as a camera writes them, or not at all
        latitude = sum(float(x) / 60 ** i for i, x in enumerate(gps[ExifTags.GPS.GPSLatitude]))
        longitude = sum(float(x) / 60 ** i for i, x in enumerate(gps[ExifTags.GPS.GPSLongitude]))
        found["where"] = {"latitude": latitude * (-1 if gps.get(ExifTags.GPS.GPSLatitudeRef) == "S" else 1),
                          "longitude": longitude * (-1 if gps.get(ExifTags.GPS.GPSLongitudeRef) == "W" else 1)}
    return found


def photo_format(data: bytes, size: int, max_pixels: int) -> tuple[str, dict]:
    """The extension to store a contributed photo under, and its EXIF details; refused unless the pipeline decodes it."""
    try:
        images.decode(data, size, max_pixels)  # the pipeline's own checks: what it could not read, it is not given
        with images.opened(data, images.Limits.configured().formats) as image:
            return FORMATS.get(image.format, ""), exif_details(image)
    except Exception as error:
        raise refusal(f"{type(error).__name__}: {error}") from None


def thumbnail(data: bytes, side: int, max_pixels: int) -> bytes:
    """A JPEG of at most side × side pixels, its aspect kept; read as the pipeline reads (its formats, its pixel limit)."""
    with images.opened(data, images.Limits.configured().formats) as image:
        image.draft("RGB", (side, side))
        if image.width * image.height > max_pixels:
            raise Image.DecompressionBombError(f"{image.width} × {image.height} pixels")
        small = images.to_rgb(ImageOps.exif_transpose(image))
        small.thumbnail((side, side))
    out = io.BytesIO()
    small.save(out, "JPEG", quality=85)
    return out.getvalue()


# --- details of labels --------------------------------------------------------------------------------


def load_details(output_fs, root: str, given: str | None, labels: list[str], storage_options: dict) -> dict[str, dict]:
    """Per label, its details: the file given, else details.yaml or .json in the output, else the shipped
    apples' when they cover every label of the output (an output of the sample or of Fruits-360's apples)."""
    if given:
        fs, path = source.open_url(given, storage_options)
        text = fs.cat_file(path).decode()
    else:
        found = [f"{root}/{name}" for name in DETAILS_FILES if output_fs.exists(f"{root}/{name}")]
        if found:
            text = output_fs.cat_file(found[0]).decode()
        elif set(labels) <= set(yaml.safe_load(SAMPLE_DETAILS.read_text())):
            text = SAMPLE_DETAILS.read_text()
        else:
            return {}
    details = yaml.safe_load(text) or {}  # YAML reads JSON too
    if not isinstance(details, dict) or not all(isinstance(value, dict) for value in details.values()):
        raise UsageError(f"a details file holds, per label, a mapping (description, season, care, link): {given or root}")
    return {str(label): value for label, value in details.items()}


# --- photos answered together --------------------------------------------------------------------------


class Batcher:
    """Photos answered together: each model call takes every photo waiting (up to `max_batch`), and waits
    at most `wait` seconds for the photos still being decoded, so that photos arriving together share a call.

    A lone photo is never held back (nothing else is on its way); under load, photos queue while the
    model is busy and the next call takes them all. `answer` runs on one thread at a time: the model
    has the cores to itself, one batch after the other, while the event loop and the decoders go on.
    """

    def __init__(self, answer: Callable[[list], list], max_batch: int, wait: float):
        self.answer, self.max_batch, self.wait = answer, max_batch, wait
        self.queue: asyncio.Queue = asyncio.Queue()
        self.changed = asyncio.Event()  # a photo was queued, or one being decoded will not come
        self.decoding = 0  # photos read and being decoded: on their way to the queue

    @contextlib.contextmanager
    def arriving(self):
        """Count a photo as on its way while it is decoded (the batch being taken waits for it)."""
        self.decoding += 1
        try:
            yield
        finally:
            self.decoding -= 1
            self.changed.set()

    async def submit(self, item):
        """The answer for one item, from the call of `answer` its batch went into."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((item, future))
        self.changed.set()
        return await future

    async def take(self) -> list:
        """The next batch: what waits, and what arrives while photos are being decoded, for at most `wait` seconds."""
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if not self.decoding or left <= 0:
                break
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return batch

    async def run(self, observe: Callable[[int], None] = lambda size: None) -> None:
        """Answer batch after batch, forever; a failure of `answer` is each of its requests' failure, not the loop's."""
        while True:
            batch = await self.take()
            observe(len(batch))
            try:
                answers = await asyncio.to_thread(self.answer, [item for item, _ in batch])
            except Exception as error:
                log.exception("the model failed on a batch")
                answers = [error] * len(batch)
            for (_, future), answer in zip(batch, answers):
                if not future.done():
                    (future.set_exception if isinstance(answer, Exception) else future.set_result)(answer)


# --- the service ------------------------------------------------------------------------------------


class Service:
    """What the endpoints share: the version answering, the batcher, the contributions, the metrics."""

    def __init__(self, output: str, storage_options: dict, details: str | None = None, token: str | None = None,
                 update_every: float | None = None, reload_every: float | None = None):
        self.output, self.storage_options = output, storage_options
        self.update_every, self.reload_every = update_every, reload_every
        self.version = Version.load(output, storage_options)
        self.previous: Version | None = None  # its rows still give thumbnails to answers of the version before
        self.details = load_details(self.version.recognizer.fs, self.version.recognizer.root, details, self.version.labels, storage_options)
        self.token = None if token in (None, "") else str(token)
        self.new_labels = bool(setting("new-labels"))
        self.max_bytes, self.max_batch = positive("max-upload-bytes"), max_batch(self.version.recognizer)
        self.wait = milliseconds("batch-wait-ms") / 1000
        threads = setting("decode-threads")
        if threads is None:  # one per core
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.decoders = concurrent.futures.ThreadPoolExecutor(positive("decode-threads", threads), "decode")
        self.max_pixels = dask.config.get("pipeline.max-image-pixels")
        self.thumbnail_side = positive("thumbnail-size")
        self.thumbnails: dict[tuple[str, int], bytes] = {}  # (version, row) → JPEG, the oldest dropped first
        self.batcher: Batcher | None = None  # made in the event loop (app's lifespan)
        self.updating = threading.Event()
        self.stopped = threading.Event()
        self.metrics = Metrics()
        self.metrics.version.info({"version": self.version.name})

    # answering

    @staticmethod
    def answer_batch(items: list[tuple[Version, np.ndarray]]) -> list[tuple[Version, recognize.Answer]]:
        """Each photo answered by the version that decoded it: one model call per version (one, but across a switch)."""
        answers = [None] * len(items)
        for version in dict.fromkeys(version for version, _ in items):
            numbers = [number for number, (v, _) in enumerate(items) if v is version]
            for number, answer in zip(numbers, version.answer([items[number][1] for number in numbers])):
                answers[number] = (version, answer)
        return answers

    async def recognize(self, data: bytes) -> dict:
        """A photo's answer: decoded in the pool as it arrives, then answered with the photos of its batch."""
        version = self.version  # answers it whole, even if a new version comes meanwhile
        with self.batcher.arriving():
            try:
                pixels = await asyncio.get_running_loop().run_in_executor(self.decoders, version.decode, data, self.max_pixels)
            except Exception as error:  # Pillow raises many kinds for broken files
                raise refusal(f"{type(error).__name__}: {error}") from None
        version, answer = await self.batcher.submit((version, pixels))
        quoted = urllib.parse.quote(version.name)
        return {
            "label": answer.label, "confidence": answer.confidence, "details": self.details.get(answer.label),
            "neighbours": [dataclasses.asdict(n) | {"thumbnail": f"/thumbnails/{n.row}?version={quoted}"}
                           for n in answer.neighbours],
            "version": version.name,
        }

    def thumbnail(self, row: int, version: str | None) -> bytes:
        chosen = next((v for v in (self.version, self.previous) if v is not None and v.name == version), self.version)
        return self.cached_thumbnail(chosen, row)

    @staticmethod
    def input_file(version: Version, path: str) -> tuple:
        fs, root = source.open_url(version.input, version.recognizer.storage_options)
        return fs, posixpath.join(root, path)

    def cached_thumbnail(self, version: Version, row: int) -> bytes:
        key, cache = (version.name, row), self.thumbnails
        if key not in cache:
            fs, path = self.input_file(version, version.path(row))
            try:
                data = fs.cat_file(path)
            except FileNotFoundError:
                raise Refused(404, f"row {row} is no longer in the input") from None
            try:
                small = thumbnail(data, self.thumbnail_side, self.max_pixels)
            except Exception as error:
                raise Refused(404, f"row {row} cannot be read as an image now: {type(error).__name__}") from None
            if len(cache) >= 4096:
                cache.pop(next(iter(cache)))
            cache[key] = small
        return cache[key]

    # corrections

    def authorize(self, header: str | None) -> None:
        if self.token is None:
            raise Refused(403, "labels are off: the service was started without a token (set DASK_PIPELINE__SERVE__TOKEN)")
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise Refused(401, "a correction needs the service's token: header `Authorization: Bearer <token>`")

    def contribute(self, data: bytes, fields: dict[str, str]) -> dict:
        """Store a photo and its label under the output's input, where the next update finds it."""
        version = self.version
        label = checked_label(fields.get("label"), version.labels, self.new_labels)
        extension, exif = photo_format(data, version.recognizer.key.image_size, self.max_pixels)
        if not extension:
            raise Refused(415, "wrong format: a correction is stored only as JPEG, PNG, GIF, BMP, WEBP or TIFF")
        digest = hashlib.sha256(data).hexdigest()
        given = {name: fields[name][:TEXT_LIMIT] for name in ("note", "taken_at", "where") if fields.get(name)}
        about = {"label": label, "sha256": digest, "bytes": len(data), "received": datetime.now(timezone.utc).isoformat(),
                 "answered_by": version.name, **({"exif": exif} if exif else {}), **given}
        fs, folder = self.input_file(version, posixpath.join(setting("contributions"), label))
        sink.make_folder(fs, folder)
        fs.pipe_file(f"{folder}/{digest}.{extension}", data)
        fs.pipe_file(f"{folder}/{digest}.json", json.dumps(about, indent=2, ensure_ascii=False).encode())
        self.metrics.contributions.inc()
        return {"stored": f"{posixpath.join(setting('contributions'), label)}/{digest}.{extension}", **about}

    # the loop that takes contributions in

    def waiting_contributions(self) -> int:
        """Contributed images under the input that the version answering does not hold."""
        version = self.version
        fs, folder = self.input_file(version, setting("contributions"))
        extensions = tuple(f".{e}" for e in config.settings().extensions)
        try:
            found = fs.find(folder)
        except FileNotFoundError:
            return 0
        root = self.input_file(version, "")[1].rstrip("/") + "/"
        relative = [path[len(root):] for path in found if path.startswith(root)]
        return sum(path.lower().endswith(extensions) and path not in version.contributed for path in relative)

    def update_once(self) -> bool:
        """Run `update` in another process if contributions wait; True when it made a new version."""
        if not self.waiting_contributions():
            return False
        self.updating.set()
        try:
            command = [sys.executable, "-m", "pipeline", "update", "--output", self.output, "--quiet"]
            if self.storage_options.get("endpoint_url"):
                command += ["--endpoint-url", self.storage_options["endpoint_url"]]
            if self.storage_options.get("anon"):
                command.append("--anon")
            log.warning("contributions arrived: updating %s", self.output)
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                self.metrics.updates.labels("failed").inc()
                log.error("update failed, still answering from %s:\n%s", self.version.name, result.stderr[-2000:])
                return False
            self.metrics.updates.labels("done").inc()
            return True
        finally:
            self.updating.clear()

    def follow(self) -> bool:
        """Answer from the output's newest version, if it is not the one answering: loaded beside it, then switched to."""
        if Output.at(self.output, self.storage_options).manifest()["finished"] == self.version.name:
            return False
        started = time.perf_counter()
        fresh = Version.load(self.output, self.storage_options)
        self.previous, self.version = self.version, fresh  # a batch answers from the one it took, whole
        self.metrics.version.info({"version": fresh.name})
        log.warning("now answering from version %s (loaded in %.0f s)", fresh.name, time.perf_counter() - started)
        return True

    def watch(self) -> None:
        """Every `update_every` seconds: update when contributions wait, and follow the output's versions (or only
        follow them, every `reload_every` seconds: the replicas beside the one that updates)."""
        while not self.stopped.wait(self.update_every or self.reload_every):
            try:
                if self.update_every:
                    self.update_once()
                self.follow()
            except Exception:  # keep answering from the version there is
                self.metrics.updates.labels("failed").inc()
                log.exception("watching the output failed; trying again in %s s", self.update_every or self.reload_every)


class Metrics:
    """The service's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("pipeline_serve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("pipeline_serve_request_seconds", "HTTP request latency by endpoint", ["endpoint"],
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10), registry=self.registry)
        self.batch = Histogram("pipeline_serve_batch_size", "images per model call", buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                               registry=self.registry)
        self.version = Info("pipeline_serve_output", "the output version answering", registry=self.registry)
        self.contributions = Counter("pipeline_serve_contributions", "corrections stored", registry=self.registry)
        self.updates = Counter("pipeline_serve_updates", "updates run by --update-every", ["result"], registry=self.registry)


class Measured:
    """ASGI middleware: each request counted by route and status and timed; an unexpected failure is a 500 with one
    line (logged), never a dropped connection. Plain ASGI, not Starlette's BaseHTTPMiddleware: nothing between the
    endpoint and the socket but this (no extra task, no re-streamed body per request)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), []

        async def sent(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sent)
        except Exception:
            log.exception("unexpected failure answering %s", scope.get("path"))
            if not status:  # nothing sent yet: say so in one line
                await JSONResponse({"error": "the service failed on this request; see its log"}, status_code=500)(scope, receive, sent)
        endpoint = getattr(scope.get("route"), "path", "other")
        self.metrics.requests.labels(endpoint, str(status[0] if status else 500)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


def app(service: Service) -> FastAPI:
    """The FastAPI application of a service."""

    @contextlib.asynccontextmanager
    async def lifespan(_):
        service.batcher = Batcher(service.answer_batch, service.max_batch, service.wait)
        batcher = asyncio.create_task(service.batcher.run(service.metrics.batch.observe))
        if service.update_every or service.reload_every:
            threading.Thread(target=service.watch, name="watch", daemon=True).start()
        yield
        service.stopped.set()
        batcher.cancel()
        service.decoders.shutdown(wait=False, cancel_futures=True)

    api = FastAPI(title="Fruit recognition", lifespan=lifespan,
                  description="Recognize a fruit in a photo from a finished pipeline output; take corrections.")

    api.add_middleware(Measured, metrics=service.metrics)

    @api.exception_handler(Refused)
    async def refused(_, error: Refused):
        return JSONResponse({"error": error.reason}, status_code=error.status)

    @api.exception_handler(RequestValidationError)
    async def invalid(_, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())[1:])
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    image_body = {"requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {"image": {"type": "string", "format": "binary"}}}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}}

    @api.post("/recognize", openapi_extra=image_body, summary="Recognize the fruit in a photo")
    async def recognize_photo(request: Request):
        """The label, its confidence and details, the nearest images of the output, the version answering."""
        data, _ = await upload(request, service.max_bytes)
        return JSONResponse(await service.recognize(data))  # plain JSON types: no encoder pass

    @api.get("/thumbnails/{row}", summary="A small JPEG of a row of the output", response_class=Response)
    async def thumbnails(row: int, version: str | None = None):
        data = await asyncio.to_thread(service.thumbnail, row, version)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})

    label_body = {"requestBody": {"content": {"multipart/form-data": {"schema": {"type": "object", "required": ["image", "label"], "properties": {
        "image": {"type": "string", "format": "binary"}, "label": {"type": "string"}, "note": {"type": "string"},
        "taken_at": {"type": "string"}, "where": {"type": "string"}}}}}}}

    @api.post("/labels", status_code=201, openapi_extra=label_body, summary="Send the right label of a photo (token needed)")
    async def labels(request: Request):
        """Stored under the output's input in Contributed/<label>/, so that the next `update` takes it in."""
        service.authorize(request.headers.get("authorization"))
        data, fields = await upload(request, service.max_bytes)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise Refused(400, "send a correction as a multipart form: fields `image` and `label` (note, taken_at, where)")
        return await asyncio.to_thread(service.contribute, data, fields)

    @api.get("/info", summary="The output answering: version, labels, whether corrections are taken")
    async def info():
        return {"version": service.version.name, "labels": service.version.labels, "corrections": service.token is not None,
                "new_labels": service.new_labels, "updating": service.updating.is_set(), "max_upload_bytes": service.max_bytes,
                "max_batch": service.max_batch}

    @api.get("/healthz", summary="Alive, and answering from which version")
    async def healthz():
        return {"status": "ok", "version": service.version.name}

    @api.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text())

    return api


def serve(output: str, storage_options: dict, *, host: str | None = None, port: int | None = None, details: str | None = None,
          update_every: str | None = None, reload_every: str | None = None, say=print) -> None:
    """`python -m pipeline serve OUTPUT`: load the output, then answer until interrupted."""
    import uvicorn

    host = setting("host", host)
    port = config.positive_int("serve.port", setting("port", port))
    service = Service(output, storage_options, details=details or setting("details"), token=setting("token"),
                      update_every=seconds(setting("update-every", update_every)),
                      reload_every=seconds(setting("reload-every", reload_every)))
    say(f"answering from {service.version.recognizer.url} (version {service.version.name}) on http://{host}:{port}/ "
        f"(corrections {'on' if service.token else 'off: no serve.token'}; at most {service.max_batch} photos a model call)")
    uvicorn.run(app(service), host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)
