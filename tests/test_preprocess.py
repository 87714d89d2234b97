"""`preprocess`: camera photos → the fruit cropped square on white, 100 × 100, as Fruits-360 was made.

The pure steps are checked on photos whose answer is known: composites of benchmarks/make_photos.py
(a Fruits-360 apple pasted at a seeded place on one of scikit-image's photographs, its box kept), a
photo without any fruit, a Fruits-360 thumbnail (which must come out almost as it went in). The
command is checked end to end on a Dask cluster: layout, table, errors, a second pass that does
only what changed, `run` carrying the photos' details, `recognize` preprocessing new photos alike.
"""
import importlib.util
import io
import json
import pathlib
import shutil
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import pipeline
from pipeline.making import preprocess
from pipeline.config import SAMPLE_DIR, UsageError
from faults import interrupted_once_staged

REPO = pathlib.Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, say=lambda message: None)
RECIPE = preprocess.Recipe()
APPLES = sorted((SAMPLE_DIR / "Training").rglob("*.jpg"))


def make_photos():
    spec = importlib.util.spec_from_file_location("make_photos", REPO / "benchmarks" / "make_photos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def composite(number: int, background: str, size=(640, 480)) -> tuple[bytes, tuple[int, int, int, int]]:
    """A seeded composite JPEG of sample apple `number` on `background`, and the fruit's true box."""
    photos = make_photos()
    pixels, truth = photos.compose(photos.fruit_rgba(APPLES[number]), photos.background(background), size,
                                   np.random.default_rng([0, number]))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, exif=photos.exif_for(number, np.random.default_rng(number)).tobytes())
    return buffer.getvalue(), tuple(truth[k] for k in ("left", "top", "right", "bottom"))


def iou(a, b) -> float:
    inside = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    return inside / (area(a) + area(b) - inside)


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize("number, background", [
    (3, "coins.png"), (40, "rocket.jpg"), (77, "astronaut.png"), (120, "grass.png"),
    # backgrounds with fruit colours: a red saucer, a cat's nose and eyes, a red motorcycle, an orange suit
    (100, "coffee.png"), (105, "chelsea.png"), (115, "motorcycle_left.png"), (20, "astronaut.png"),
    # dark red apples on a dark or busy background, where a star or a red reflector is more fruit-coloured than they
    (84, "hubble_deep_field.jpg"), (100, "hubble_deep_field.jpg"), (90, "motorcycle_left.png"),
    # white but for a black horse or black squares: not a fruit on white, whose whiteness would cut it out
    (13, "horse.png"), (26, "chessboard_RGB.png"),
    # ambiguous: nothing looks much like a fruit at first; regions at other scales, more compared, hold it
    (12, "coffee.png"), (83, "coffee.png"),
])
def test_the_fruit_is_found_where_the_generator_put_it(number, background):
    data, truth = composite(number, background)
    done = preprocess.prepare(data, RECIPE)
    assert iou(done.fruit, truth) >= 0.85, (done.fruit, truth)
    left, top, right, bottom = done.crop
    fruit = done.fruit
    assert right - left == bottom - top and left <= fruit[0] and top <= fruit[1] and right >= fruit[2] and bottom >= fruit[3]
    assert done.pixels.shape == (100, 100, 3) and (done.width, done.height) == (640, 480)
    corners = done.pixels[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.min() >= 250  # the background is white


def disc(shape, centre, radius) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.circle(mask, centre, radius, 1, thickness=-1)
    return mask


def test_of_fruit_coloured_blobs_the_one_that_stands_out_whole_round_and_large_looks_most_like_a_fruit():
    lab = np.zeros((96, 128, 3), np.uint8)
    lab[:] = (120, 160, 150)  # a fruit-coloured scene...
    lab[20:70, 10:60] = (60, 170, 150)  # ...with a darker apple in it
    apple, same = disc(lab.shape[:2], (35, 45), 22), disc(lab.shape[:2], (95, 45), 22)
    stick = np.zeros(lab.shape[:2], np.uint8)
    stick[10:80, 90:98] = 1
    small = disc(lab.shape[:2], (35, 45), 8)
    likeness = {name: preprocess.fruit_likeness(lab, blob) for name, blob in
                {"apple": apple, "same colours as around it": same, "stick": stick, "small": small}.items()}
    assert max(likeness, key=likeness.get) == "apple" and likeness["same colours as around it"] < 0.1 * likeness["apple"]


def test_a_blob_coloured_as_a_whole_like_a_fruit_resembles_one_more_than_fruit_colours_mixed_otherwise():
    colours = preprocess.colour_prior("sample")
    thumbnail = np.asarray(Image.open(APPLES[0]).convert("RGB").resize((64, 64)))
    apple = np.clip(thumbnail * np.array([0.8, 0.8, 0.7]), 0, 255).astype(np.uint8)  # in dimmer, warmer light
    cup = np.zeros_like(apple)
    cup[:, :32], cup[:, 32:] = (250, 250, 245), (150, 80, 30)  # a white rim, coffee: each in some fruit, no fruit is both
    on_apple = (thumbnail.min(axis=2) < 230).astype(np.uint8)
    resemblance = {name: preprocess.resemblance({space: preprocess.colour_planes(rgb, space) for space in preprocess.SPACES},
                                                blob, colours.fruits)
                   for name, (rgb, blob) in {"apple": (apple, on_apple), "cup": (cup, np.ones_like(on_apple))}.items()}
    assert resemblance["apple"] > 0.8 and resemblance["cup"] < 0.6 * resemblance["apple"]


def test_the_most_fruit_like_are_chosen_measuring_resemblance_only_where_it_could_change_the_choice():
    rng = np.random.default_rng(0)
    measured = judged = 0
    for _ in range(300):
        likeness = list(rng.uniform(0, 1, rng.integers(1, 15)))
        resemblances = rng.uniform(0, 1, len(likeness))
        asked = []
        chosen = preprocess.most_fruit_like(likeness, lambda i: asked.append(i) or resemblances[i])
        scores = np.array(likeness) * resemblances
        best = np.argsort(-scores, kind="stable")[:preprocess.TRIED]
        assert [i for i, _ in chosen] == [i for i in best if scores[i] >= preprocess.CLOSE * scores[best[0]]]
        measured, judged = measured + len(asked), judged + len(likeness)
    assert measured < 0.7 * judged


def test_grabcut_grows_a_seed_of_the_fruits_lit_side_to_all_of_it():
    rng = np.random.default_rng(0)
    photo = np.clip(rng.normal(128, 12, (240, 320, 3)), 0, 255).astype(np.uint8)  # grey, noisy
    fruit = disc(photo.shape[:2], (160, 120), 60)
    lit = fruit & (1 - disc(photo.shape[:2], (190, 120), 60))  # its left crescent, where the light falls
    photo[fruit > 0], photo[lit > 0] = (110, 20, 30), (210, 70, 60)
    cut = preprocess.grabcut(photo, lit)
    assert iou(preprocess.boxes(cut, 0)[0], (100, 60, 221, 181)) >= 0.9


def test_a_photo_without_fruit_is_no_fruit_found():
    photo = np.full((480, 640, 3), 128, np.uint8)
    photo[100:300, 200:400], photo[50:120, 400:600] = 60, 200  # shapes, but only greys
    with pytest.raises(preprocess.NoFruitFound, match="no fruit found"):
        preprocess.prepare(jpeg(photo), RECIPE)


def test_a_fruits_360_thumbnail_comes_out_almost_as_it_went_in():
    changes = []
    for path in APPLES[::4]:
        original = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)
        done = preprocess.prepare(path.read_bytes(), RECIPE)
        assert done.pixels.shape == original.shape
        changes.append(np.abs(done.pixels - original).mean())
    assert np.median(changes) < 1 and max(changes) < 20  # the same, or moved by a few pixels (a shadow taken for fruit)


def test_the_photos_exif_details_are_read():
    data, _ = composite(5, "chelsea.png")
    details = preprocess.prepare(data, RECIPE).details
    assert details["taken"] == "2026-09-01T13:00:00" and details["camera"] == "PipelineCam Composite 1"
    assert 44 <= details["latitude"] <= 45 and -1.5 <= details["longitude"] <= -0.5  # west: negative
    assert preprocess.prepare(jpeg(np.asarray(Image.open(APPLES[0]))), RECIPE).details == {
        "taken": None, "latitude": None, "longitude": None, "camera": None}


def test_the_crop_is_a_square_around_the_fruit_with_its_margin_white_beyond_the_photo():
    mask = np.zeros((60, 80), np.uint8)
    mask[10:30, 70:80] = 1  # 10 wide, 20 high, against the right edge
    fruit, crop = preprocess.boxes(mask, margin=0.25)
    assert fruit == (70, 10, 80, 30) and crop == (60, 5, 90, 35)  # 20 + 2 × 5, centred on the box
    photo = np.full((60, 80, 3), 40, np.uint8)
    out = preprocess.thumbnail(photo, mask, crop, 30)
    assert (out[:, 21:] == 255).all() and (out[:, :9] == 255).all()  # beyond the photo, and not fruit: white
    assert (out[7:23, 11:19] == 40).all()  # the fruit as it was (its edge softened by a pixel)


def test_settings_are_checked_with_a_message_that_names_them():
    assert preprocess.recipe() == RECIPE
    with pytest.raises(UsageError, match="`preprocess.method` must be one of grabcut, colour"):
        preprocess.recipe(method="deep")
    with pytest.raises(UsageError, match="`preprocess.margin` is a fraction"):
        preprocess.recipe(margin="2")
    with pytest.raises(UsageError, match="`preprocess.quality` is a JPEG quality from 1 to 100"):
        preprocess.recipe(quality=101)


def photo_folder(root: pathlib.Path, numbers: list[int]) -> None:
    """Composites of sample apples in the Fruits-360 layout, one photo without fruit, one broken file."""
    for number in numbers:
        path = root / APPLES[number].relative_to(SAMPLE_DIR)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(composite(number, make_photos().BACKGROUNDS[number % 12])[0])
    (root / "Training" / "Apple Braeburn" / "empty field.jpg").write_bytes(jpeg(np.full((480, 640, 3), (90, 90, 200), np.uint8)))
    (root / "Training" / "Apple Braeburn" / "broken.jpg").write_bytes(b"not a photo")


@pytest.mark.slow
def test_preprocess_then_run_then_recognize(tmp_path, dask_cluster):
    raw, prepared, output = tmp_path / "raw", tmp_path / "prepared", tmp_path / "output"
    photo_folder(raw, [0, 11, 22, 33, 44, 55, 66, 77])
    s = pipeline.settings(input=str(raw), output=str(prepared), cluster=dask_cluster, images_per_partition=3)
    first = preprocess.preprocess(s, RECIPE, **QUIET)
    table = pd.read_parquet(prepared / "photos.parquet")
    errors = pd.read_parquet(prepared / "errors.parquet").set_index("path")
    assert first["counts"] == {"listed": 10, "preprocessed": 8, "written": 8, "no_fruit": 1, "failed": 2, "unchanged": 0,
                               "removed": 0, "skipped_non_images": 0, "partitions_resumed": 0}
    assert errors.loc["Training/Apple Braeburn/empty field.jpg", "error"] == "NoFruitFound"
    assert errors.loc["Training/Apple Braeburn/broken.jpg", "stage"] == "decode"
    assert list(table.path) == sorted(table.path) and (table.width == 640).all() and table.taken.notna().all()
    for image in table.image:
        with Image.open(prepared / image) as thumbnail:
            assert thumbnail.size == (100, 100)

    (raw / APPLES[0].relative_to(SAMPLE_DIR)).unlink()  # one photo deleted, one new
    new = raw / "Training" / "Apple Red 1" / "new.jpg"
    new.parent.mkdir(parents=True, exist_ok=True)
    new.write_bytes(composite(90, "coffee.png")[0])
    again = preprocess.preprocess(pipeline.settings(output=str(prepared), cluster=dask_cluster, input=str(raw)), RECIPE, **QUIET)
    assert again["counts"]["preprocessed"] == 1 and again["counts"]["unchanged"] == 7 and again["counts"]["removed"] == 1
    assert not (prepared / APPLES[0].relative_to(SAMPLE_DIR)).exists() and (prepared / "Training/Apple Red 1/new.jpg").exists()
    assert len(pd.read_parquet(prepared / "photos.parquet")) == 8 and len(again["history"]) == 2
    with pytest.raises(UsageError, match="was preprocessed with other settings \\(method 'grabcut' there, 'colour' now\\)"):
        preprocess.preprocess(s, preprocess.recipe(method="colour"), **QUIET)

    manifest = pipeline.run(pipeline.settings(input=str(prepared), output=str(output), cluster=dask_cluster, weights="random",
                                              n_components=4), **QUIET)
    assert manifest["preprocess"]["recipe"] == RECIPE.as_dict() and manifest["counts"]["written"] == 8
    rows = pd.read_parquet(output / "images.parquet")
    assert rows.source.tolist() == rows.path.tolist() and rows.camera.eq("PipelineCam Composite 1").all()

    from pipeline.reading import recognize

    said = []
    photo = raw / APPLES[77].relative_to(SAMPLE_DIR)
    result = recognize.command(str(output), [str(photo), str(raw / "Training/Apple Braeburn/empty field.jpg")],
                               say=said.append, progress=False)
    assert result["preprocessed"] and any("photos preprocessed as" in line for line in said)
    hit, miss = result["answers"]
    # the photo is seen as its thumbnail in the output was: its own row is its nearest, by far (features differ by
    # their batch's rounding alone)
    nearest, second = hit["neighbours"][:2]
    assert nearest["path"] == APPLES[77].relative_to(SAMPLE_DIR).as_posix() and nearest["distance"] < 0.05 * second["distance"]
    assert miss["error"].startswith("NoFruitFound: no fruit found")


@pytest.mark.slow
def test_an_interrupted_preprocess_is_finished_by_running_it_again_each_photo_once(faulty_s3, s3, tmp_path, dask_cluster):
    numbers = [0, 11, 22, 33, 44, 55]
    for number in numbers:
        s3.pipe(f"fruits/raw/{APPLES[number].relative_to(SAMPLE_DIR).as_posix()}", composite(number, "grass.png")[0])
    last = f"fruits/raw/{APPLES[numbers[-1]].relative_to(SAMPLE_DIR).as_posix()}"
    held = faulty_s3.hold("GET", last)  # the last partition cannot finish: the command is stopped mid-way
    prepared = tmp_path / "prepared"
    command = [sys.executable, "-m", "pipeline", "preprocess", "--input", "s3://fruits/raw", "--output", str(prepared),
               "--endpoint-url", faulty_s3.endpoint, "--cluster", dask_cluster, "--images-per-partition", "1", "--quiet"]
    returncode, stderr = interrupted_once_staged(command, prepared / "_staging" / "photos", 3, held, "preprocess")
    assert returncode == 130 and "again" in stderr.splitlines()[-1]
    assert not (prepared / "preprocess.json").exists()  # nothing committed

    said = []
    s = pipeline.settings(input="s3://fruits/raw", output=str(prepared), cluster=dask_cluster, images_per_partition=1,
                          storage_options={"endpoint_url": faulty_s3.endpoint})
    done = preprocess.preprocess(s, RECIPE, progress=False, say=said.append)
    assert f"finishing the interrupted preprocess of {prepared}" in said
    table = pd.read_parquet(prepared / "photos.parquet")
    assert done["counts"]["preprocessed"] == len(numbers) == len(table) and table.path.is_unique
    assert done["counts"]["partitions_resumed"] >= 3  # those staged before the interruption were not done again
    assert sorted(p.relative_to(prepared).as_posix() for p in prepared.rglob("*.jpg")) == sorted(table.image)
