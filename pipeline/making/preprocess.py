"""Preprocess: camera photos → thumbnails as Fruits-360 was made (the fruit, cropped square, on white, 100 × 100).

For each photo: decode at reduced scale (JPEG draft), find the fruit, crop a square around it with a
margin, set everything that is not the fruit to white, resize, encode as JPEG. Finding the fruit
needs no model: colour histograms of fruits on white (`colours`, by default the shipped sample)
say which colours of the photo are more likely fruit than the photo at large (histogram back-
projection, in two colour spaces); of the fruit-coloured blobs and the regions of a quick region
segmentation (a dark fruit's colours may be fruit-like in no space), the one that stands out from its
surroundings, whole, round, large, fruit-coloured and coloured as a whole like some fruit of `colours` is
cut out by OpenCV's GrabCut (`method: grabcut`), or taken as it is (`method: colour`, faster, rougher edges).

The pure steps (photo → mask → boxes → thumbnail) are `open_photo`, `fruit_mask`, `boxes`, `thumbnail`,
all in `prepare`. The command's flow (listing, partitions, resume, update, commit) is the pipeline's:
see `preprocess` below.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import io
import pathlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from . import featurize, sink
from .. import config, images, source
from ..config import UsageError
from .featurize import Weights
from ..output import Output, errors as output_errors

METHODS = ("grabcut", "colour")
SPACES = ("ab", "hs")  # colours compared as a × b of CIE Lab and as hue × saturation of HSV (lightness ignored):
# each finds fruits the other misses (a dark red apple has little a × b but a red hue)
BINS = 32  # the colour histograms: each plane (8-bit) in this many bins
WORK_SIDE = 128  # the fruit is first looked for at this many pixels on the photo's longer side
RATIO_SURE = 16  # a colour this many times likelier among fruits than in the background is surely fruit
WHITE = 230  # this close to white on every channel: the white of a photo on white
WHITE_BORDER = 0.25  # a photo whose border is this much white is on white: the rest of it is fruit,
ON_WHITE_RESEMBLANCE = 0.8  # if its colours resemble some fruit's this much (fruits on white: 0.74–1, most over 0.83)
BORDER = 0.1  # the background is first taken from this fraction of the photo, along its edges
ITERATIONS = 1  # of GrabCut (a second moves the fruit's box by little: 0.2 points of IoU ≥ 0.85 for 1.7 ms)
CUT_SIDE = 96  # GrabCut runs on the fruit's neighbourhood at most this many pixels across: the likely fruit and
CUT_PAD = 0.4  # this much of its size around it (0.5 at 90 px: 1.3 points fewer photos found well, on 1,320 composites)
ROUND_FRUIT = 0.9  # a fruit is round: the circle around a blob of its lit side, this much smaller, is probably fruit
CANDIDATES = 2  # fruit-coloured blobs kept of each colour space and pass
TRIED = 2  # the most fruit-like of them cut by a quick GrabCut (1 iteration, QUICK_SIDE across) and compared,
CLOSE = 0.5  # when the runner-up looks at least this much as fruit-like as the first (else the first is taken)
QUICK_SIDE = 48
REGION_SIDE = 64  # candidates whatever their colour: the regions of Felzenszwalb's segmentation of the photo at this size,
REGION_SCALE = 150  # this fine (its `scale`: larger, larger regions; a fruit is more often a region of its own than at 400),
REGIONS = 5  # the largest and most fruit-coloured this many of those that touch at most one edge and cover at most
REGION_MOST = 0.5  # this much of the photo (a region along two edges, or most of the photo, is background)
UNSURE = 0.03  # when the most fruit-like candidate is judged under this (13% of the composites, the ambiguous ones),
UNSURE_SCALES = (60, 400)  # regions at these scales (finer, coarser) are candidates too
UNSURE_TRIED = 3  # and this many of the most fruit-like cut quickly and compared (+0.9 points of IoU ≥ 0.85, ~0.3 ms a photo)
RESEMBLING = 3  # a blob's colours compared with this many fruits' of `colours`, those closest to them (`resemblance`),
RESEMBLANCE_POWER = 4  # and its likeness times that resemblance to this power (2 to 6 did alike on 880 composites)
REFERENCES = 256  # the most fruits of `colours` kept for that (evenly chosen; all of the shipped sample's)
COLOURLESS = 0.05  # a blob's fruit-coloured share counts as this much more: a fruit of no fruit colour is still judged
LAB_BINS = [8, 16, 16]  # a blob and its surroundings compared by their histograms of L, a, b in this many bins
NO_WEIGHTS = Weights("none")  # preprocess runs no model: its plan records none


class NoFruitFound(ValueError):
    """No part of the photo looks enough like a fruit: recorded in the errors table with this reason."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How photos are preprocessed: the `preprocess` section of pipeline.yaml; recorded in manifests."""

    size: int = 100
    margin: float = 0.0
    quality: int = 95
    method: str = "grabcut"
    decode_size: int = 256
    colours: str = "sample"
    min_fruit: float = 0.004

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def recipe(**overrides) -> Recipe:
    """The preprocess settings: pipeline.yaml's `preprocess` section < DASK_PIPELINE__PREPROCESS__* < `overrides`."""
    values = config.section(Recipe, "preprocess", overrides)
    for name in ("size", "quality", "decode_size"):
        values[name] = config.positive_int(f"preprocess.{name}", values[name])
    if not 1 <= values["quality"] <= 100:
        raise UsageError(f"`preprocess.quality` is a JPEG quality from 1 to 100, got {values['quality']}")
    values["method"] = str(values["method"]).strip().lower()
    if values["method"] not in METHODS:
        raise UsageError(f"`preprocess.method` must be one of {', '.join(METHODS)}, got {values['method']!r}")
    for name in ("margin", "min_fruit"):
        try:
            values[name] = float(values[name])
        except (TypeError, ValueError):
            values[name] = -1.0
        if not 0 <= values[name] < 1:
            raise UsageError(f"`preprocess.{name.replace('_', '-')}` is a fraction from 0 to 1, got {values[name]!r}")
    return Recipe(**values)


# --- the pure steps --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Photo:
    """A photo decoded at reduced scale, with its size as taken and what its EXIF says."""

    pixels: np.ndarray  # H × W × 3 uint8, EXIF rotation applied
    width: int  # as taken (after EXIF rotation)
    height: int
    details: dict  # taken (ISO time), latitude, longitude, camera: None where the EXIF has none


def open_photo(data: bytes, decode_size: int, max_pixels: int) -> Photo:
    """Decode at the smallest JPEG scale that keeps both sides ≥ decode_size (other formats at full size)."""
    try:
        opened = images.opened(data, images.Limits.configured().formats)  # only the formats `extensions` names
    except Image.UnidentifiedImageError:
        raise Image.UnidentifiedImageError(f"not an image Pillow can read: {len(data):,} bytes, starting {data[:8]!r}") from None
    with opened as image:
        width, height = image.size
        details = exif_details(image.getexif())
        turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientation: a quarter turn
        image.draft(image.mode, (decode_size, decode_size))
        if image.width * image.height > max_pixels:
            raise Image.DecompressionBombError(
                f"{image.width} × {image.height} pixels to decode, more than the limit of {max_pixels:,} "
                "(setting max-image-pixels); raise it if this image is expected")
        pixels = images.plain_jpeg(data, image)  # OpenCV's decode at the draft's scale, as the featurize stage's
        if pixels is None:
            pixels = np.asarray(images.to_rgb(ImageOps.exif_transpose(image)))
    return Photo(pixels, *((height, width) if turned else (width, height)), details)


def exif_details(exif: Image.Exif) -> dict:
    """Time taken (ISO 8601, as the camera wrote it: no time zone), GPS latitude and longitude, camera make and model."""
    taken = exif.get_ifd(0x8769).get(0x9003) or exif.get(0x0132)  # DateTimeOriginal, else DateTime
    try:
        taken = datetime.datetime.strptime(str(taken).strip("\x00 "), "%Y:%m:%d %H:%M:%S").isoformat() if taken else None
    except ValueError:
        taken = None
    gps = exif.get_ifd(0x8825)
    camera = " ".join(str(exif[tag]).strip("\x00 ") for tag in (0x010F, 0x0110) if exif.get(tag)) or None
    return {"taken": taken, "latitude": degrees(gps.get(2), gps.get(1), "S"),
            "longitude": degrees(gps.get(4), gps.get(3), "W"), "camera": camera}


def degrees(dms, ref, negative: str) -> float | None:
    """EXIF's (degrees, minutes, seconds) and its N/S or E/W as signed decimal degrees; None if absent or broken."""
    try:
        value = float(dms[0]) + float(dms[1]) / 60 + float(dms[2]) / 3600
    except (TypeError, ValueError, IndexError, ZeroDivisionError):
        return None
    return round(-value if str(ref).strip("\x00 ").upper() == negative else value, 7)


@dataclasses.dataclass(frozen=True)
class Colours:
    """What fruits on white say of fruits' colours, in each of SPACES (`colour_prior`)."""

    prior: dict[str, np.ndarray]  # P(colour | fruit): BINS × BINS, summing to 1
    fruits: dict[str, np.ndarray]  # each fruit's own histogram (at most REFERENCES of them), as `resemblance` compares them


@functools.cache
def colour_prior(colours: str) -> Colours:
    """The colours of the fruit pixels of white-background photos under `colours`: all together, and each fruit's.

    `colours`: a folder (or fsspec URL) of such photos, "sample" for the shipped Fruits-360 sample.
    Cached per process: it is read once per worker.
    """
    url = str(config.SAMPLE_DIR) if colours == "sample" else colours
    listing = source.list_images(url, {}, ("jpg", "jpeg", "png"))
    histograms = {space: np.zeros((BINS, BINS), np.float64) for space in SPACES}
    fruits: dict[str, list[np.ndarray]] = {space: [] for space in SPACES}
    paths = [f"{listing.root}/{path}" for path in listing.rows["path"]][:2000]
    every = -(-len(paths) // REFERENCES)  # each fruit's histogram kept of every this many photos
    for number, data in enumerate(source.read_many(listing.fs, paths)):
        if isinstance(data, BaseException):
            continue
        rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        fruit = rgb.min(axis=2) < 230
        for space in SPACES:
            histogram = colour_histogram(rgb, space, fruit)
            histograms[space] += histogram
            if number % every == 0 and histogram.sum():
                fruits[space].append(root_histogram(histogram))
    if not histograms[SPACES[0]].sum():
        raise UsageError(f"no fruit pixels in the photos under {url} (`preprocess.colours`): give photos of fruits on white")
    blurred = {space: smoothed(h) for space, h in histograms.items()}
    return Colours({space: h / h.sum() for space, h in blurred.items()},
                   {space: np.stack(rows) if rows else np.zeros((0, BINS * BINS), np.float32) for space, rows in fruits.items()})


def root_histogram(histogram: np.ndarray) -> np.ndarray:
    """A colour histogram `smoothed`, made a distribution and square-rooted, flat: the dot product of two is their
    Bhattacharyya coefficient (1: the same colours in the same shares, 0: none in common)."""
    blurred = smoothed(histogram).ravel()
    return np.sqrt(blurred / max(float(blurred.sum()), 1e-9))


def colour_planes(rgb: np.ndarray, space: str) -> np.ndarray:
    """The two 8-bit colour planes of an RGB image in `space` (H × W × 2): Lab's a, b or HSV's hue, saturation."""
    import cv2

    if space == "ab":
        return np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[..., 1:])
    return np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)[..., :2])


def colour_histogram(rgb: np.ndarray, space: str, where: np.ndarray | None = None) -> np.ndarray:
    """The BINS × BINS histogram of an RGB image's pixels (those of `where`) in `space`."""
    return planes_histogram(colour_planes(rgb, space), where)


def planes_histogram(planes: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    import cv2

    mask = None if where is None else where.astype(np.uint8)
    return cv2.calcHist([planes], [0, 1], mask, [BINS, BINS], [0, 256, 0, 256])


def smoothed(histogram: np.ndarray) -> np.ndarray:
    """A colour histogram blurred over neighbouring bins (float32): a colour next to a fruit's, under other light, is a
    fruit's too."""
    import cv2

    return cv2.GaussianBlur(histogram.astype(np.float32), (3, 3), 0)


def fruitness(planes: np.ndarray, prior: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """How much likelier each pixel's colour (`colour_planes` of the photo in the prior's space) is among fruits
    than in the photo's background (0–1, smoothed). `background`: where the background is thought to be
    (default: the whole photo)."""
    import cv2

    own = smoothed(planes_histogram(planes, background)) + 1e-3
    ratio = prior / (own / own.sum())
    score = np.clip(np.log(np.maximum(ratio, 1e-9)) / np.log(RATIO_SURE), 0, 1).astype(np.float32)
    bins = planes // (256 // BINS)
    return cv2.GaussianBlur(score[bins[..., 0], bins[..., 1]], (5, 5), 0)


def fruit_mask(rgb: np.ndarray, colours: Colours, method: str = Recipe.method, min_fruit: float = Recipe.min_fruit) -> np.ndarray:
    """The fruit's mask (H × W uint8, 1 = fruit) of an RGB photo.

    A photo on white (most of its border) is cut by whiteness, as Fruits-360's were. Otherwise the
    fruit-coloured blobs of the photo (`candidates`) and its largest, most fruit-coloured regions
    (`region_candidates`) are the candidates; the most fruit-like (`fruit_likeness`, times its colours'
    `resemblance` to some fruit's to the RESEMBLANCE_POWER) is cut out by GrabCut, unless the runner-up
    comes CLOSE: then each is cut by a quick GrabCut on the small photo, and the one whose cut looks most
    like a fruit is cut again at full size (`method: colour`: the most fruit-like blob as it is). When
    none looks much like a fruit (UNSURE), regions at other scales join and more are compared. Raises
    NoFruitFound when no blob of at least `min_fruit` of the photo is fruit-coloured.
    """
    import cv2

    height, width = rgb.shape[:2]
    scale = min(1.0, WORK_SIDE / max(height, width))
    small = cv2.resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    planes = {space: colour_planes(small, space) for space in SPACES}
    if (small[border(small.shape[:2])].min(axis=1) >= WHITE).mean() >= WHITE_BORDER:  # on white (a studio photo, a thumbnail)
        blob = best_blob((rgb.min(axis=2) < WHITE).astype(np.uint8), np.ones((height, width), np.float32), min_fruit)
        if blob is None:
            raise NoFruitFound(f"no fruit found: the photo is white but for less than {min_fruit:.1%} of it")
        on_small = cv2.resize(blob, small.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        if resemblance(planes, on_small, colours.fruits) >= ON_WHITE_RESEMBLANCE:
            return blob  # else what is not white is no fruit (a drawing, a chessboard): the fruit is looked for as in any photo
    found, colour = candidates(planes, colours.prior, min_fruit)
    if not found:
        raise NoFruitFound(f"no fruit found: no part of the photo is fruit-coloured over {min_fruit:.1%} of it")
    found += region_candidates(small, colour, min_fruit)
    lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB)

    def likeness(blob: np.ndarray) -> float:
        return fruit_likeness(lab, blob, colour) if blob.any() else 0.0

    def resembling(blob: np.ndarray) -> float:
        return resemblance(planes, blob, colours.fruits) ** RESEMBLANCE_POWER

    hulls = [convex_hull(blob) for blob in found]  # judged as GrabCut will start from them
    plain = [likeness(hull) for hull in hulls]
    resembling_hull = functools.cache(lambda i: resembling(hulls[i]))
    best = most_fruit_like(plain, resembling_hull)
    if best[0][1] < UNSURE:  # nothing looks much like a fruit: other segmentations may hold it; more are compared
        for fineness in UNSURE_SCALES:
            found += region_candidates(small, colour, min_fruit, fineness)
        hulls += [convex_hull(blob) for blob in found[len(hulls):]]
        plain += [likeness(hull) for hull in hulls[len(plain):]]
        best = most_fruit_like(plain, resembling_hull, UNSURE_TRIED)
    tried = [found[i] for i, _ in best]
    if method == "grabcut" and len(tried) > 1:  # each cut quickly on the small photo: the best cut's blob is cut again
        quick = [grabcut(small, blob, QUICK_SIDE, 1) for blob in tried]
        tried = [tried[int(np.argmax([likeness(cut) * resembling(cut) for cut in quick]))]]
    seed = cv2.resize(tried[0], (width, height), interpolation=cv2.INTER_LINEAR)
    return seed if method == "colour" else grabcut(rgb, seed)


def most_fruit_like(plain: list[float], resembling: Callable[[int], float], tried: int = TRIED) -> list[tuple[int, float]]:
    """The `tried` candidates most like a fruit (their likeness, `plain`, times `resembling(index)`), those at least
    CLOSE to the first, best first: (index, how fruit-like).

    A candidate's resemblance (at most 1) is measured only while its likeness could still place it among them: the
    same choice, ~0.7 ms less a photo.
    """
    scores: dict[int, float] = {}
    for i in sorted(range(len(plain)), key=lambda i: -plain[i]):
        if len(scores) >= tried and plain[i] < sorted(scores.values())[-tried]:
            break
        scores[i] = plain[i] * resembling(i) if plain[i] else 0.0
    best = sorted(scores, key=lambda i: -scores[i])[:tried]
    return [(i, scores[i]) for i in best if scores[i] >= CLOSE * scores[best[0]]]


def border(shape: tuple[int, int]) -> np.ndarray:
    """The BORDER of a photo of this shape, along its edges (True there)."""
    ring = max(2, round(min(shape) * BORDER))
    edges = np.ones(shape, bool)
    edges[ring:-ring, ring:-ring] = False
    return edges


def candidates(planes: dict[str, np.ndarray], priors: dict[str, np.ndarray], min_fruit: float) -> tuple[list[np.ndarray], np.ndarray]:
    """The fruit-coloured blobs of a small photo (its `colour_planes` in each of SPACES): what could be the fruit;
    and each pixel's fruitness (the mean of the spaces'), against the colours of the photo's border.

    In each space the blobs are looked for twice: first with the colours of the photo's border as
    the background's, then with those of the photo less the first pass's best blob's neighbourhood;
    the CANDIDATES best of each pass are kept (blobs boxed like one already kept are not kept twice).
    """
    import cv2

    found: list[np.ndarray] = []
    shape = planes[SPACES[0]].shape[:2]
    colour = np.zeros(shape, np.float32)
    for space in SPACES:
        background, blob = border(shape), None
        for _ in range(2):
            if blob is not None:
                background = cv2.dilate(blob, np.ones((9, 9), np.uint8)) == 0
            score = fruitness(planes[space], priors[space], background if background.any() else None)
            if blob is None:
                colour += score / len(SPACES)
            level, _ = cv2.threshold((score * 255).astype(np.uint8), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            coloured = cv2.morphologyEx((score > max(level / 255, 0.15)).astype(np.uint8), cv2.MORPH_OPEN,
                                        cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
            blobs = ranked_blobs(coloured, score, min_fruit)[:CANDIDATES]
            if not blobs:
                break
            blob = blobs[0]
            found += [b for b in blobs if all(box_iou(cv2.boundingRect(b), cv2.boundingRect(kept)) < 0.8 for kept in found)]
    return found, colour


def region_candidates(small: np.ndarray, colour: np.ndarray, min_fruit: float, fineness: float = REGION_SCALE) -> list[np.ndarray]:
    """Regions of a quick segmentation of the small photo (Felzenszwalb's graph-based one, at REGION_SIDE px, its `scale`
    `fineness`): candidates whatever their colour, for a dark or dull fruit whose colours are fruit-like in no space.

    Of the regions at least `min_fruit` and at most REGION_MOST of the photo, touching at most one of
    its edges, the REGIONS largest across times most fruit-coloured (`colour`: each pixel's fruitness).
    """
    import cv2
    from scipy import ndimage
    from skimage.segmentation import felzenszwalb

    height, width = small.shape[:2]
    scale = REGION_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    labels = felzenszwalb(cv2.resize(small, size, interpolation=cv2.INTER_AREA), scale=fineness, sigma=0.5,
                          min_size=REGION_SIDE // 8)
    areas = np.bincount(labels.ravel())
    coloured = np.bincount(labels.ravel(), weights=cv2.resize(colour, size, interpolation=cv2.INTER_AREA).ravel())
    ranked = []
    for index, (rows, columns) in enumerate(ndimage.find_objects(labels + 1)):
        edges = (rows.start == 0) + (columns.start == 0) + (rows.stop == size[1]) + (columns.stop == size[0])
        if max(1, min_fruit * labels.size) <= areas[index] <= REGION_MOST * labels.size and edges <= 1:
            across = max(rows.stop - rows.start, columns.stop - columns.start)
            ranked.append((across * (coloured[index] / areas[index] + COLOURLESS), index))
    return [fill_holes(cv2.resize((labels == index).astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST))
            for _, index in sorted(ranked, reverse=True)[:REGIONS]]


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (x, y, width, height) boxes."""
    inside = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])) * max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return inside / max(a[2] * a[3] + b[2] * b[3] - inside, 1)


def fruit_likeness(lab: np.ndarray, blob: np.ndarray, colour: np.ndarray | None = None) -> float:
    """How much a blob of a (small, Lab) photo looks like a fruit: its colours unlike those of a ring around it
    (1 − the Bhattacharyya coefficient of their L × a × b histograms), times its roundness cubed, times its
    size across (of the photo's shorter side), times how fruit-coloured it is (`colour`: each pixel's
    fruitness, its mean plus COLOURLESS): the subject of a photo stands out, whole, round, large and fruit-coloured."""
    import cv2

    x, y, w, h = cv2.boundingRect(blob)
    band = max(2, max(w, h) // 4)
    near = (slice(max(0, y - band), y + h + band), slice(max(0, x - band), x + w + band))  # all the ring can reach
    inner = np.ascontiguousarray(blob[near])
    ring = cv2.dilate(inner, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))) - inner
    around_lab = np.ascontiguousarray(lab[near])
    inside, around = (cv2.calcHist([around_lab], [0, 1, 2], m, LAB_BINS, [0, 256, 0, 256, 0, 256]).ravel() for m in (inner, ring))
    contrast = 1 - float(np.sqrt(inside / max(inside.sum(), 1) * around / max(around.sum(), 1)).sum())
    fruit_coloured = 1.0 if colour is None else float(colour[near][inner > 0].mean()) + COLOURLESS
    return contrast * roundness(inner) ** 3 * max(w, h) / min(blob.shape) * fruit_coloured


def resemblance(planes: dict[str, np.ndarray], blob: np.ndarray, fruits: dict[str, np.ndarray]) -> float:
    """How much a blob's colours, all together, look like some fruit's on white: the Bhattacharyya coefficient of their
    histogram with those of the RESEMBLING closest `fruits`, its mean, in each of SPACES (their geometric mean).
    A coffee cup's white and brown, or a cat's eye's black and green, each fruit-coloured, together are no apple's."""
    closeness = 1.0
    for space, references in fruits.items():
        if not len(references):
            continue
        own = planes_histogram(planes[space], blob)
        if not own.sum():
            return 0.0
        closeness *= float(np.sort(references @ root_histogram(own))[-RESEMBLING:].mean())
    return closeness ** (1 / len(fruits))


def roundness(blob: np.ndarray) -> float:
    """A blob's area over that of its smallest enclosing circle: a disc 1, a stick near 0."""
    import cv2

    contours, _ = cv2.findContours(blob, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return 0.0
    _, radius = cv2.minEnclosingCircle(max(contours, key=cv2.contourArea))
    return float(blob.sum()) / max(np.pi * radius * radius, 1.0)


def ranked_blobs(candidate: np.ndarray, score: np.ndarray, min_fruit: float) -> list[np.ndarray]:
    """The blobs of `candidate` at least `min_fruit` of the photo, holes filled, most fruit-like first (most
    fruitness in all, times roundness)."""
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(candidate.astype(np.uint8), connectivity=8)
    totals = np.bincount(labels.ravel(), weights=score.ravel(), minlength=count)
    ranked = []
    for index in range(1, count):
        if stats[index, cv2.CC_STAT_AREA] >= max(4, min_fruit * candidate.size):
            x, y, w, h = stats[index, :4]  # the blob worked on in its box: the same, faster
            blob = fill_holes((labels[y : y + h, x : x + w] == index).astype(np.uint8))
            ranked.append((totals[index] * roundness(blob), index, (x, y, blob)))
    found = []
    for _, _, (x, y, blob) in sorted(ranked, key=lambda item: (-item[0], item[1])):
        whole = np.zeros(candidate.shape, np.uint8)
        whole[y : y + blob.shape[0], x : x + blob.shape[1]] = blob
        found.append(whole)
    return found


def best_blob(candidate: np.ndarray, score: np.ndarray, min_fruit: float) -> np.ndarray | None:
    """The blob of `candidate` most like a fruit, holes filled; None if none is `min_fruit` of the photo."""
    ranked = ranked_blobs(candidate, score, min_fruit)
    return ranked[0] if ranked else None


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every hole inside its outer contours filled (a glint, a stalk's shadow)."""
    import cv2

    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled


def convex_hull(mask: np.ndarray) -> np.ndarray:
    """The smallest convex mask around all of `mask` (a fruit is convex: a blob of its lit side grows to all of it)."""
    import cv2

    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = np.zeros_like(mask)
    if contours:
        cv2.fillPoly(hull, [cv2.convexHull(np.vstack(contours))], 1)
    return hull


def enclosing_disc(mask: np.ndarray, shrink: float) -> np.ndarray:
    """The disc of the smallest circle around a mask, its radius times `shrink` (an empty mask: none)."""
    import cv2

    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    disc = np.zeros_like(mask)
    if contours:
        (x, y), radius = cv2.minEnclosingCircle(np.vstack(contours))
        cv2.circle(disc, (round(x), round(y)), round(radius * shrink), 1, thickness=-1)
    return disc


def grabcut(rgb: np.ndarray, seed: np.ndarray, side: int = CUT_SIDE, iterations: int = ITERATIONS) -> np.ndarray:
    """GrabCut's fruit around the `seed` blob's convex hull, run on its neighbourhood at ≤ `side` pixels across.

    The hull's core is fruit, the rest of it (and of the circle around it, ROUND_FRUIT as large)
    probably fruit, a band around it CUT_PAD of its size wide probably background and what lies further
    (the band's outer edge) surely background, unless it is the photo's edge: GrabCut learns both
    colour models from there and moves the edge. The piece of its cut that holds the core is kept.
    """
    import cv2

    height, width = rgb.shape[:2]
    hull = convex_hull(seed)
    likely = hull | enclosing_disc(hull, ROUND_FRUIT)
    x, y, w, h = cv2.boundingRect(likely)
    pad = round(max(w, h) * CUT_PAD) + 4
    area = (max(0, x - pad), max(0, y - pad), min(width, x + w + pad), min(height, y + h + pad))
    patch, near, likely = (image[area[1] : area[3], area[0] : area[2]] for image in (rgb, hull, likely))
    scale = min(1.0, side / max(patch.shape[:2]))
    size = (max(1, round(patch.shape[1] * scale)), max(1, round(patch.shape[0] * scale)))
    if scale < 1:
        patch = cv2.resize(patch, size, interpolation=cv2.INTER_AREA)
        near, likely = (cv2.resize(image, size, interpolation=cv2.INTER_NEAREST) for image in (near, likely))
    reach = max(1, round(max(w, h) * scale / 8))
    core = cv2.erode(near, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1)))
    core = core if core.any() else near
    mask = np.full(near.shape, cv2.GC_PR_BGD, np.uint8)
    mask[likely > 0] = cv2.GC_PR_FGD
    mask[core > 0] = cv2.GC_FGD
    for edge, inside in (((slice(None), 0), area[0] > 0), ((0, slice(None)), area[1] > 0),
                         ((slice(None), -1), area[2] < width), ((-1, slice(None)), area[3] < height)):
        if inside:  # the band's outer edge, where it is not the photo's (the fruit may reach that)
            mask[edge][mask[edge] == cv2.GC_PR_BGD] = cv2.GC_BGD
    if (mask == cv2.GC_PR_BGD).any() or (mask == cv2.GC_BGD).any():
        cv2.setRNGSeed(0)  # GrabCut's k-means starts from this thread's random numbers: the same photo, the same cut
        cv2.grabCut(np.ascontiguousarray(patch[..., ::-1]), mask, None, np.zeros((1, 65), np.float64),
                    np.zeros((1, 65), np.float64), iterations, cv2.GC_INIT_WITH_MASK)
    cut = np.isin(mask, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)
    count, labels, _, _ = cv2.connectedComponentsWithStats(cut, connectivity=8)
    if count > 2:  # GrabCut may keep specks of background of the fruit's colours: the piece holding the core
        cut = (labels == 1 + int(np.argmax(np.bincount(labels.ravel(), weights=core.ravel().astype(np.float64),
                                                        minlength=count)[1:]))).astype(np.uint8)
    full = np.zeros((height, width), np.uint8)
    full[area[1] : area[3], area[0] : area[2]] = cv2.resize(cut, (area[2] - area[0], area[3] - area[1]),
                                                            interpolation=cv2.INTER_LINEAR) if scale < 1 else cut
    return fill_holes(full)


def boxes(mask: np.ndarray, margin: float) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """The fruit's box and the square crop around it (left, top, right, bottom; right and bottom excluded).

    The square's side is the fruit box's longer side plus `margin` of it on each side, centred on the
    box; it may reach out of the photo (that part is white).
    """
    import cv2

    x, y, w, h = cv2.boundingRect(mask)
    if not w:
        raise NoFruitFound("no fruit found: the fruit-coloured part of the photo was cut away as background")
    fruit = (x, y, x + w, y + h)
    side = max(fruit[2] - fruit[0], fruit[3] - fruit[1]) * (1 + 2 * margin)
    cx, cy = (fruit[0] + fruit[2]) / 2, (fruit[1] + fruit[3]) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    return fruit, (left, top, left + round(side), top + round(side))


def thumbnail(rgb: np.ndarray, mask: np.ndarray, crop: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The square `crop` of the photo at size × size, everything but the fruit white (soft-edged)."""
    import cv2

    left, top, right, bottom = crop
    height, width = rgb.shape[:2]
    pad = max(0, -left, -top, right - width, bottom - height)
    if pad:
        rgb = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(255, 255, 255))
        mask = cv2.copyMakeBorder(mask, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    window = (slice(top + pad, bottom + pad), slice(left + pad, right + pad))
    shrink = cv2.INTER_AREA if right - left > size else cv2.INTER_LINEAR
    pixels = cv2.resize(rgb[window], (size, size), interpolation=shrink).astype(np.float32)
    alpha = cv2.resize(mask[window].astype(np.float32), (size, size), interpolation=shrink)
    alpha = cv2.GaussianBlur(alpha, (3, 3), 0)[..., None]  # a soft edge, as a photo on white has
    return np.clip(pixels * alpha + 255 * (1 - alpha) + 0.5, 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One photo preprocessed: the thumbnail, and the table's details (boxes in the photo's pixels as taken)."""

    pixels: np.ndarray
    crop: tuple[int, int, int, int]
    fruit: tuple[int, int, int, int]
    fruit_fraction: float  # of the photo's area
    width: int
    height: int
    details: dict
    seconds: dict


def prepare(data: bytes, r: Recipe, max_pixels: int = images.Image.MAX_IMAGE_PIXELS or 89478485) -> Prepared:
    """A photo's bytes → its thumbnail and details; raises NoFruitFound, or Pillow's error for a bad image."""
    started = time.perf_counter()
    photo = open_photo(data, r.decode_size, max_pixels)
    decoded = time.perf_counter()
    return prepare_photo(photo, r, {"decode": decoded - started})


def prepare_array(rgb: np.ndarray, r: Recipe) -> np.ndarray:
    """A decoded photo (H × W × 3 uint8) → its thumbnail: what recognize does to a new photo given as an array."""
    return prepare_photo(Photo(rgb, rgb.shape[1], rgb.shape[0], {}), r, {}).pixels


def prepare_photo(photo: Photo, r: Recipe, seconds: dict) -> Prepared:
    started = time.perf_counter()
    mask = fruit_mask(photo.pixels, colour_prior(r.colours), r.method, r.min_fruit)
    fruit, crop = boxes(mask, r.margin)
    pixels = thumbnail(photo.pixels, mask, crop, r.size)
    height, width = photo.pixels.shape[:2]
    sx, sy = photo.width / width, photo.height / height
    seconds["segment"] = time.perf_counter() - started
    return Prepared(pixels, scaled(crop, sx, sy), scaled(fruit, sx, sy), float(mask.mean()), photo.width, photo.height,
                    photo.details, seconds)


def scaled(box: tuple[int, int, int, int], sx: float, sy: float) -> tuple[int, int, int, int]:
    """A box of the decoded pixels in the pixels of the photo as taken."""
    return (round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy))


def encode(pixels: np.ndarray, quality: int) -> bytes:
    """A thumbnail as JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# --- the command: every photo under --input, on the cluster, incremental and exactly once ---------------

PHOTOS = "photos.parquet"  # the table: one row per photo preprocessed, in parts sorted by source path
MANIFEST = "preprocess.json"  # written last: what was preprocessed, how, when; marks the folder finished
STAGED = f"{sink.STAGING}/photos"  # each partition's rows, errors and timings; there = done
DETAILS = ["source", "source_identity", "crop", "fruit_box", "fruit_fraction", "width", "height", "taken", "latitude",
           "longitude", "camera"]  # the columns `run` carries into images.parquet, as images.parquet names them


def image_name(path: str) -> str:
    """Where a photo's thumbnail goes, relative to the output: its own path, as a .jpg."""
    return path if path.lower().endswith((".jpg", ".jpeg")) else f"{path}.jpg"


def preprocess_partition(partitions: str, byte_range: tuple[int, int], listing_fs, root: str, r: Recipe, max_pixels: int,
                         output_fs, out: str, staged_path: str) -> dict:
    """Preprocess one partition's photos: write each thumbnail in place, stage the table's rows and the errors.

    A thumbnail is written whole under its final name (rewritten the same if a retry does it again); the
    partition is done when its staged file is there.
    """
    started = time.perf_counter()
    rows = sink.partition_rows(output_fs, partitions, byte_range)
    blobs = source.read_many(listing_fs, [f"{root}/{path}" for path in rows["path"]])
    seconds = {"read": time.perf_counter() - started, "decode": 0.0, "segment": 0.0, "write": 0.0}

    def one(row, blob) -> tuple[dict | None, dict | None, dict]:
        """(the table's row, None) or (None, the error's row), and the seconds spent."""
        if isinstance(blob, BaseException):
            return None, sink.error_row(row.path, row.identity, "read", blob), {}
        try:
            done = prepare(blob, r, max_pixels)
        except NoFruitFound as error:
            return None, sink.error_row(row.path, row.identity, "segment", error), {}
        except Exception as error:  # Pillow raises many kinds for broken files; each is recorded
            return None, sink.error_row(row.path, row.identity, "decode", error), {}
        started = time.perf_counter()
        data = encode(done.pixels, r.quality)
        target = f"{out}/{image_name(row.path)}"
        sink.make_folder(output_fs, target.rsplit("/", 1)[0])
        sink.publish(output_fs, target, lambda f: f.write(data))
        return ({"path": row.path, "label": row.label, "split": row.split, "identity": row.identity,
                 "image": image_name(row.path), "crop": list(done.crop), "fruit_box": list(done.fruit),
                 "fruit_fraction": done.fruit_fraction, "width": done.width, "height": done.height, **done.details},
                None, done.seconds | {"write": time.perf_counter() - started})

    with ThreadPoolExecutor(featurize.worker_threads()[0]) as pool:  # Pillow and OpenCV let go of the GIL
        results = list(pool.map(one, rows.itertuples(index=False), blobs))
    kept = [row for row, _, _ in results if row]
    errors = [error for _, error, _ in results if error]
    for _, _, spent in results:
        for step, value in spent.items():
            seconds[step] += value
    summary = {"rows": len(kept), "errors": errors, "seconds": seconds}
    sink.write_parquet(output_fs, staged_path, photos_table(kept).replace_schema_metadata({"pipeline": json.dumps(summary)}))
    return summary


def photos_table(rows: list[dict]) -> pa.Table:
    """The table's rows, with its columns and types even when empty."""
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("path", pa.string()), ("label", pa.string()), ("split", pa.string()), ("identity", pa.string()), ("image", pa.string()),
        ("crop", pa.list_(pa.int32())), ("fruit_box", pa.list_(pa.int32())), ("fruit_fraction", pa.float32()),
        ("width", pa.int32()), ("height", pa.int32()), ("taken", pa.string()), ("latitude", pa.float64()),
        ("longitude", pa.float64()), ("camera", pa.string()),
    ]))


def preprocess(s: "config.Settings", r: Recipe, *, say: Callable[[str], None] = print, progress: bool = True, client=None) -> dict:
    """Preprocess every photo under s.input into s.output, or only what changed since the last time; returns its manifest.

    An output preprocessed before is brought up to date: new and replaced photos are preprocessed,
    deleted ones' thumbnails removed, the others left as they are. An interrupted preprocess is
    finished by running it again. The table and errors are committed last, like a run's.
    """
    from . import incremental, job
    import cluster

    cluster.check_reachable(s.cluster)
    started = datetime.datetime.now(datetime.timezone.utc)
    out = Output.at(s.output, s.storage_options)
    timings: dict[str, float] = {}
    with output_errors(out.url):
        base = sink.read_json(out.fs, out / MANIFEST) if out.holds(MANIFEST) else None
        if out.holds(sink.MANIFEST) or out.holds(sink.IMAGES):
            raise UsageError(f"{out.url} holds the output of a run, not preprocessed photos: choose another --output")
    if base and base["recipe"] != r.as_dict():
        raise UsageError(f"{out.url} was preprocessed with other settings ({differences(base['recipe'], r.as_dict())}): "
                         "preprocess into another --output, or use the same settings")
    if out.holds(sink.RUN):
        listing, _ = out.resume_plan(s, command="preprocess")
        plan = sink.read_json(out.fs, out / sink.RUN)
        if plan.get("recipe") != r.as_dict():
            raise UsageError(f"the interrupted preprocess in {out.url} had other settings ({differences(plan['recipe'], r.as_dict())}): "
                             f"finish it with the same, or delete {out.url}/{sink.STAGING} to give it up")
        say(f"finishing the interrupted preprocess of {out.url}")
    else:
        with job.stopwatch(timings, "list"):
            listing = source.list_images(s.input, s.storage_options, s.extensions)
        out.check_writable()
        out.save_plan(s, listing, NO_WEIGHTS, command="preprocess", recipe=r.as_dict())
    changes = incremental.compare(listing.rows, out.parts(PHOTOS) if base else iter(()),
                                  out.errors() if base else empty_errors())
    listed, todo = len(listing.rows), dataclasses.replace(listing, rows=changes.featurize.reset_index(drop=True))
    say(f"{listed} photos under {s.input}: {changes.added} new, {changes.replaced} replaced, {changes.removed} removed, "
        f"{len(todo.rows)} to preprocess")
    if base and changes.nothing:
        sink.remove(out.fs, out.path, sink.STAGING)
        say(f"{out.url} is up to date")
        return base
    colour_prior(r.colours)  # a missing colours folder fails here, not on every worker
    s = dataclasses.replace(s, images_per_partition=config.partition_size(s.images_per_partition, listed))
    with job.on_cluster(s, client, say, timings) as client:
        with job.stopwatch(timings, "preprocess"):
            staged = stage_photos(client, todo, r, s, out, progress)
        errors = list(changes.kept_errors.to_dict("records")) + [error for part in staged for error in part["errors"]]
        sink.write_parquet(out.fs, out / f"{sink.STAGING}/{sink.ERRORS}", sink.errors_table(errors))
        with job.stopwatch(timings, "write"):
            parts = incremental.partitions(out.path, changes, staged, s.images_per_partition, table=PHOTOS)
            written = write_table(client, parts, out)
            failed = {error["path"] for part in staged for error in part["errors"]}
            remove_thumbnails(out, changes.drop - (set(todo.rows["path"]) - failed))
        workers = cluster.size(client)
    done = sum(part["images"] for part in staged)
    manifest = {
        "input": s.input, "output": out.url, "started": started.isoformat(),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(), "recipe": r.as_dict(),
        "counts": {"listed": listed, "preprocessed": done - sum(len(part["errors"]) for part in staged), "written": written,
                   "no_fruit": sum(e["stage"] == "segment" for e in errors), "failed": len(errors),
                   "unchanged": listed - done - len(changes.kept_errors), "removed": changes.removed,
                   "skipped_non_images": listing.skipped, "partitions_resumed": sum(part["resumed"] for part in staged)},
        "timings_s": timings, "worker_seconds": job.worker_seconds(staged),
        "images_per_s": done / timings["preprocess"] if done and timings.get("preprocess") else 0.0,
        "cluster": workers,
    }
    manifest["history"] = (base or {}).get("history", []) + [
        {key: manifest[key] for key in ("input", "started", "finished", "counts", "images_per_s", "cluster")}]
    commit(out, manifest)
    return manifest


def empty_errors() -> "pd.DataFrame":
    return sink.errors_table([]).to_pandas(types_mapper=pd.ArrowDtype)


def differences(then: dict, now: dict) -> str:
    return "; ".join(f"{key} {then.get(key)!r} there, {now[key]!r} now" for key in now if then.get(key) != now[key])


def stage_photos(client, listing: source.Listing, r: Recipe, s, out: Output, progress: bool) -> list[dict]:
    """Preprocess every partition of the listing on the workers; partitions already staged are read back, not redone."""
    from distributed import as_completed

    from . import job

    sink.make_folder(out.fs, out / STAGED)
    done = set(out.fs.find(out / STAGED))
    size, todo = s.images_per_partition, out / sink.PARTITIONS
    ranges = sink.write_partitions(out.fs, todo, listing.rows, size)
    futures = {}
    for index, byte_range in enumerate(ranges):
        staged = out / f"{STAGED}/{sink.part_name(index)}"
        if staged in done:
            future = client.submit(sink.staged_summary, out.fs, staged, key=f"resume-{index}-{client.id}")
        else:
            future = client.submit(preprocess_partition, todo, byte_range, listing.fs, listing.root, r, s.max_image_pixels,
                                   out.fs, out.path, staged, key=f"preprocess-{index}-{client.id}")
        futures[future] = (index, staged, min(size, len(listing.rows) - index * size))
    results: list[dict] = [{}] * len(ranges)
    with job.progress_bar("preprocess", len(listing.rows), progress) as bar:
        for future, result in as_completed(list(futures), with_results=True):
            index, staged, n_images = futures.pop(future)
            results[index] = result | {"staged": staged, "images": n_images, "resumed": staged in done}
            bar.update(n_images)
    return results


def write_table(client, parts: list[sink.OutputPart], out: Output) -> int:
    """Write each part of the new table (old rows kept, dropped ones left out, new ones sorted in); returns its rows."""
    final = out / f"{sink.STAGING}/{PHOTOS}"
    sink.make_folder(out.fs, final)
    futures = [client.submit(sink.finish_partition, out.fs, part, final, None, key=f"write-{part.name}-{client.id}") for part in parts]
    return sum(client.gather(futures))


def remove_thumbnails(out: Output, paths) -> None:
    """Remove the thumbnails of photos deleted, replaced or failed since (a replaced one written again is not among them)."""
    for path in paths:
        target = out / image_name(path)
        if out.fs.exists(target):
            out.fs.rm_file(target)


def commit(out: Output, manifest: dict) -> None:
    """Replace the previous table and errors by the staged ones; the manifest, written last, marks it finished."""
    sink.remove(out.fs, out.path, MANIFEST, PHOTOS, sink.ERRORS)
    for name in (PHOTOS, sink.ERRORS):
        sink.move(out.fs, out / f"{sink.STAGING}/{name}", out / name)
    sink.write_json(out.fs, out / MANIFEST, manifest)
    sink.remove(out.fs, out.path, sink.RUN, sink.STAGING)


# --- what run and recognize read of it ---------------------------------------------------------------


def last_input(output: str, storage_options: dict) -> str:
    """The input an output was last preprocessed from, or a usage error asking for --input."""
    out = Output.at(output, storage_options)
    with output_errors(out.url):
        if out.holds(MANIFEST):
            return sink.read_json(out.fs, out / MANIFEST)["input"]
    raise UsageError(f"{out.url} holds no preprocessed photos yet: give --input, the folder or URL of the photos")


def recorded(fs, root: str) -> dict | None:
    """What the preprocess that made the images under `root` recorded (its input and recipe), or None if none did."""
    try:
        manifest = sink.read_json(fs, f"{root}/{MANIFEST}")
    except FileNotFoundError:
        return None
    return {"input": manifest["input"], "recipe": manifest["recipe"], "finished": manifest["finished"]}


def recipe_of(manifest: dict) -> Recipe | None:
    """The preprocessing an output's images went through (its manifest's `preprocess`), or None."""
    made = manifest.get("preprocess")
    return Recipe(**made["recipe"]) if made else None


def details_index(fs, root: str) -> list[tuple[str, str, str]] | None:
    """(first image, last image, part file) of each part of the table of the preprocessed images under `root`,
    from the parts' statistics: each output part then reads only the parts that hold its rows. None if no table."""
    if not fs.exists(f"{root}/{MANIFEST}"):
        return None
    index = []
    for path in sorted(fs.find(f"{root}/{PHOTOS}")):
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        column = meta.schema.names.index("image")
        for group in range(meta.num_row_groups):
            stats = meta.row_group(group).column(column).statistics
            if stats is not None and stats.has_min_max:
                index.append((stats.min, stats.max, path))
    return sorted(set(index))


def details(fs, root: str) -> Callable[[pa.Table], pa.Table] | None:
    """What adds the photos' details to staged rows of the images under `root`, if a preprocess made them; else None."""
    index = details_index(fs, root)
    return None if index is None else functools.partial(with_details, fs, index)


def with_details(fs, index: list[tuple[str, str, str]], table: pa.Table) -> pa.Table:
    """A staged table of images with the details columns of their photos (null where a photo has none)."""
    paths = table["path"]
    low, high = (value.as_py() for value in pc.min_max(paths).values()) if len(table) else ("", "")
    files = sorted({path for first, last, path in index if first <= high and last >= low})
    photos = pa.concat_tables([sink.read_parquet(fs, path) for path in files]) if files else photos_table([])
    at = pc.index_in(paths, value_set=photos["image"])
    found = photos.rename_columns({"path": "source", "identity": "source_identity"})
    return pa.table({**{name: table[name] for name in table.column_names},
                     **{name: found[name].take(at) for name in DETAILS}}, metadata=table.schema.metadata)
