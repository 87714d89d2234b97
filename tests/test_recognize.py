"""`python -m pipeline recognize OUTPUT IMAGE...`: which fruit is in new photos, answered from a finished output."""
import io
import json
import shutil
import subprocess
import sys

import dask.config
import fsspec
import numpy as np
import pandas as pd
import pytest
from distributed import Client
from PIL import Image
from test_evaluate import fake_output

import pipeline
from pipeline import images
from pipeline.making import reduce, sink
from pipeline.reading import evaluate, index, recognize
from pipeline.config import SAMPLE_DIR, UsageError

HELD_OUT = 3  # images of each label kept out of the sample's output


def pipeline_recognize(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline", "recognize", *args], capture_output=True, text=True, timeout=300, env=env)


def blobs(n_labels=3, per_label=20, width=16, seed=0):
    """Labelled points around well-separated centres."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([f"Apple {i}" for i in range(n_labels)], per_label)
    centres = rng.normal(size=(n_labels, width)) * 4
    return centres[np.repeat(np.arange(n_labels), per_label)] + rng.normal(size=(n_labels * per_label, width)), labels


def finished(folder, rows, finished_at="2026-12-01T00:00:00+00:00"):
    """Give a hand-written output the manifest and index a run writes: what recognize reads of it."""
    fs = fsspec.filesystem("file")
    manifest = {"finished": finished_at, "counts": {"written": rows},
                "settings": {"model": "mobilenet_v2", "image_size": 224, "seed": 0},
                "weights": {"requested": "random", "used": "random", "warning": None}}
    width = reduce.Pca.load(fs, f"{folder}/{sink.PCA}").n_components
    index.build(fs, f"{folder}/{sink.INDEX}", sorted(fs.glob(f"{folder}/{sink.IMAGES}/*.parquet")), width, rows)
    sink.write_json(fs, f"{folder}/{sink.MANIFEST}", manifest)
    return folder


@pytest.fixture
def hand_made(tmp_path):
    """A finished output of 60 rows in 3 labels, written by hand (no CNN): 16 features, 5 components kept."""
    features, labels = blobs()
    return finished(fake_output(tmp_path / "out", labels, [None] * 60, features, kept=5), 60), features, labels


# --- how the label is chosen, and the nearest images -----------------------------------------------


@pytest.mark.parametrize("n_labels", [2, 3])
def test_the_classifier_answers_what_evaluates_logistic_regression_answers(n_labels):
    vectors, labels = blobs(n_labels)
    classifier = recognize.Classifier.train(vectors, labels, "v1")
    model, converged = evaluate.train(vectors, labels)

    test, _ = blobs(n_labels, seed=1)
    assert converged and np.allclose(classifier.probabilities(test), model.predict_proba(test), atol=1e-9)
    predicted, confidence = classifier.predict(test)
    assert predicted.tolist() == model.predict(test).tolist()
    assert np.allclose(confidence, model.predict_proba(test).max(axis=1))


def test_an_image_of_the_output_is_its_own_nearest_and_gets_its_label(hand_made):
    output, features, labels = hand_made
    recognizer = recognize.Recognizer.load(str(output))
    answers = recognizer.answer(features[[0, 25, 59]].astype(np.float32), 3)

    assert [a.label for a in answers] == [labels[0], labels[25], labels[59]]
    assert [a.neighbours[0].path for a in answers] == [f"{labels[i]}/{i}.jpg" for i in (0, 25, 59)]
    assert [a.neighbours[0].row for a in answers] == [0, 25, 59]  # its position in images.parquet/: the index's row id
    assert all(a.neighbours[0].distance < 1e-3 and len(a.neighbours) == 3 and a.confidence > 0.9 for a in answers)
    assert all(a.neighbours[0].distance <= a.neighbours[1].distance <= a.neighbours[2].distance for a in answers)


def test_the_classifier_is_trained_once_per_version_of_the_output(hand_made):
    output, features, labels = hand_made
    saved = output / recognize.CLASSIFIER
    first = recognize.Recognizer.load(str(output)).classifier
    assert saved.exists() and first.trained_on == "2026-12-01T00:00:00+00:00"
    written = saved.stat().st_mtime_ns
    again = recognize.Recognizer.load(str(output)).classifier
    assert saved.stat().st_mtime_ns == written and np.array_equal(again.coef, first.coef)  # read, not trained again

    finished(output, 60, finished_at="2026-12-02T00:00:00+00:00")  # a new version, as `update` commits one
    assert recognize.Recognizer.load(str(output)).classifier.trained_on == "2026-12-02T00:00:00+00:00"
    assert saved.stat().st_mtime_ns != written


def test_a_large_output_answers_from_its_approximate_index_and_exact_on_request(tmp_path):
    features, labels = blobs(per_label=400)
    output = tmp_path / "out"
    fake_output(output, labels, [None] * 1200, features, kept=5, parts=4)
    with dask.config.set({"pipeline.index.exact-below": 1000}):  # 1,200 rows: above, an IVF index
        finished(output, 1200)
    recognizer = recognize.Recognizer.load(str(output))
    assert recognizer.index.about["kind"] == "ivf-sq8" and recognizer.index.about["recall"]["@5"] >= 0.95

    queries = (features[::40] + np.random.default_rng(1).normal(size=(30, 16)) * 0.5).astype(np.float32)  # new points among the rows
    indexed, exact = recognizer.answer(queries, 5), recognizer.answer(queries, 5, exact=True)
    assert [a.label for a in indexed] == [a.label for a in exact]  # the classifier does not depend on the search
    found = [len({n.row for n in a.neighbours} & {n.row for n in e.neighbours}) / 5 for a, e in zip(indexed, exact)]
    assert np.mean(found) >= 0.9
    assert all(n.path == f"{labels[n.row]}/{n.row}.jpg" for a in exact for n in a.neighbours)
    distances = np.linalg.norm((features - features.mean(axis=0)) @ reduce.Pca.load(fsspec.filesystem("file"), f"{output}/{sink.PCA}").kept.T
                               - ((queries - features.mean(axis=0)) @ recognizer.kept.T)[0], axis=1)
    assert [n.row for n in exact[0].neighbours] == np.argsort(distances)[:5].tolist()


def test_an_array_is_read_as_the_same_image_in_a_file_would_be():
    photo = sorted((SAMPLE_DIR / "Training" / "Apple Braeburn").iterdir())[0]
    decoded = images.decode(photo.read_bytes(), 224, 10**8)
    assert recognize.from_array(decoded, 224) is decoded

    large = np.asarray(Image.fromarray(decoded).resize((600, 400)))
    png = io.BytesIO()
    Image.fromarray(large).save(png, "PNG")
    assert np.array_equal(recognize.from_array(large, 224), images.decode(png.getvalue(), 224, 10**8))
    assert recognize.from_array(decoded[:, :, 0], 224).shape == decoded.shape  # gray, as RGB
    with pytest.raises(ValueError, match="must be H × W, H × W × 3 or H × W × 4 of uint8, not \\(100, 100, 3\\) of float32"):
        recognize.from_array(decoded.astype(np.float32), 224)


def test_a_folder_that_is_no_finished_output_is_a_one_line_usage_error(tmp_path):
    result = pipeline_recognize(str(tmp_path), str(SAMPLE_DIR))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: no manifest.json in {tmp_path}: give the --output of a finished `pipeline run`"


def test_more_images_than_a_handful_must_come_as_one_folder(hand_made):
    output, _, _ = hand_made
    photos = [str(path) for path in sorted((SAMPLE_DIR / "Training" / "Apple Braeburn").iterdir())]
    with dask.config.set({"pipeline.recognize.in-process-images": 4}), pytest.raises(UsageError) as error:
        recognize.command(str(output), photos)
    assert str(error.value) == ("10 images in 10 arguments, more than `recognize.in-process-images` (4): "
                                "give them as one folder or prefix to recognize them on the cluster")


@pytest.fixture
def interrupted(hand_made, tmp_path, monkeypatch):
    """The hand-made output with an interrupted update in its _staging/, a folder of 3 photos, run from tmp_path."""
    output, _, _ = hand_made
    (output / sink.STAGING).mkdir()
    (output / sink.RUN).write_text('{"command": "update"}')
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (photos / name).write_bytes(b"not read: refused before")
    (tmp_path / "link").symlink_to(output)
    monkeypatch.chdir(tmp_path)
    recognize.Recognizer.load("out")  # its classifier trained and saved: the output as a user has it
    return output, photos


def contents(folder):
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("to", ["out", "./out", "out/", "out//", "{tmp}/out", "file://{tmp}/out", "file://{tmp}/out/",
                                "link", "link/", "{tmp}/photos/../out", "out/_staging", "out/images.parquet", "link/new"])
def test_recognize_to_the_output_however_spelled_is_refused_and_changes_nothing(interrupted, tmp_path, to):
    output, photos = interrupted
    before = contents(output)
    with dask.config.set({"pipeline.recognize.in-process-images": 1}), pytest.raises(UsageError) as error:
        recognize.command("out", [str(photos)], to=to.format(tmp=tmp_path))
    assert str(error.value).startswith(f"--to {to.format(tmp=tmp_path)} is ")
    assert f"the output {output}: give another folder" in str(error.value) or f"inside the output {output}:" in str(error.value)
    assert contents(output) == before  # the interrupted update and the output's errors.parquet are untouched


@pytest.mark.parametrize("to", ["out/predictions", "./out/predictions/", "link/predictions", "file://{tmp}/out/predictions",
                                "elsewhere", "out-2", "."])
def test_recognize_to_the_outputs_predictions_or_any_other_folder_is_allowed(interrupted, tmp_path, to):
    recognizer = recognize.Recognizer.load("out")
    assert recognize.check_destination(recognizer, to.format(tmp=tmp_path), {}) is None


def test_recognize_to_an_s3_output_however_spelled_is_refused(hand_made, s3, s3_endpoint):
    output, _, _ = hand_made
    s3.put(str(output) + "/", "fruits/out/", recursive=True)
    options = {"endpoint_url": s3_endpoint}
    recognizer = recognize.Recognizer.load("s3://fruits/out", options)
    for to in ("s3://fruits/out", "s3://fruits/out/", "s3a://fruits/out", "s3://fruits/out/_staging"):
        with pytest.raises(UsageError, match="the output s3://fruits/out: give another folder|inside the output s3://fruits/out:"):
            recognize.check_destination(recognizer, to, options)
    for to in ("s3://fruits/out/predictions", "s3://fruits/out-2", str(output)):  # the local folder is another place
        recognize.check_destination(recognizer, to, options)


# --- end to end, with the CNN -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_split(dask_cluster, tmp_path_factory):
    """An output of the shipped sample less 3 images of each label (random weights), and those 39 images apart."""
    root = tmp_path_factory.mktemp("split")
    for folder in sorted((SAMPLE_DIR / "Training").iterdir()):
        for i, image in enumerate(sorted(folder.iterdir())):
            target = root / ("held-out" if i % 3 == 0 and i < 3 * HELD_OUT else "images/Training") / folder.name
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target / image.name)
    pipeline.run(pipeline.settings(input=str(root / "images"), output=str(root / "out"), cluster=dask_cluster, weights="random"),
                 progress=False, say=lambda message: None)
    return root / "out", root / "held-out"


@pytest.mark.slow
def test_photos_kept_out_of_the_output_are_recognized_well_above_chance(sample_split, tmp_path):
    output, held_out = sample_split
    (tmp_path / "notes.jpg").write_text("not a photo")
    photos = sorted(held_out.rglob("*.jpg"))
    result = pipeline_recognize(str(output), *map(str, photos[:20]), str(tmp_path / "notes.jpg"), *map(str, photos[20:]), "--json")
    assert result.returncode == 0, result.stderr

    answers = json.loads(result.stdout)["answers"]  # stdout holds the JSON alone
    assert [a["path"] for a in answers] == [str(p) for p in photos[:20]] + [str(tmp_path / "notes.jpg")] + [str(p) for p in photos[20:]]
    bad = answers.pop(20)
    assert bad["label"] is None and bad["error"].startswith("UnidentifiedImageError: not an image Pillow can read: 11 bytes, starting b'not a ph' (formats read: ")
    right = [a["label"] == photo.parent.name for a, photo in zip(answers, photos)]
    assert len(right) == 39 and np.mean(right) > 3 / 13  # 3 × chance; measured: 0.69 (27 of 39)
    assert all(len(a["neighbours"]) == 5 and a["neighbours"][0]["path"].startswith("Training/") for a in answers)
    assert (output / recognize.CLASSIFIER).exists()


@pytest.mark.slow
def test_the_command_prints_each_label_its_neighbours_and_an_error_line_for_what_is_no_image(sample_split, tmp_path):
    output, held_out = sample_split
    photo = sorted(held_out.rglob("*.jpg"))[0]
    result = pipeline_recognize(str(output), str(photo), str(tmp_path / "missing.jpg"), "--neighbours", "2")
    assert result.returncode == 0, result.stderr

    first, *neighbours, missing = result.stdout.splitlines()
    assert first.startswith(f"{photo}: Apple ") and "(confidence 0." in first and len(neighbours) == 2
    assert all(line.strip().split("  ")[2].startswith("Training/Apple ") for line in neighbours)
    assert missing == f"{tmp_path / 'missing.jpg'}: error: FileNotFoundError: [Errno 2] No such file or directory: '{tmp_path / 'missing.jpg'}'"


@pytest.mark.slow
def test_the_api_answers_bytes_and_arrays_alike_one_call_at_a_time(sample_split):
    output, held_out = sample_split
    recognizer = recognize.Recognizer.load(str(output))
    photos = [path.read_bytes() for path in sorted(held_out.rglob("*.jpg"))[:4]]
    as_bytes = recognizer.recognize(photos)
    as_arrays = recognizer.recognize([images.decode(photo, 224, 10**8) for photo in photos])
    assert [a.label for a in as_arrays] == [a.label for a in as_bytes]
    assert [n.path for a in as_arrays for n in a.neighbours] == [n.path for a in as_bytes for n in a.neighbours]
    assert np.allclose([a.confidence for a in as_arrays], [a.confidence for a in as_bytes], atol=1e-6)

    one = recognizer.recognize([photos[1]])[0]
    assert one.label == as_bytes[1].label and one.neighbours[0].path == as_bytes[1].neighbours[0].path
    mixed = recognizer.recognize([photos[0], b"\x89PNG broken", photos[2]])
    assert [a.label for a in mixed] == [as_bytes[0].label, None, as_bytes[2].label]
    assert mixed[1].error.startswith("UnidentifiedImageError: not an image Pillow can read: 11 bytes")


@pytest.mark.slow
def test_a_folder_of_many_is_recognized_on_the_cluster_into_predictions_and_errors(sample_split, dask_cluster, tmp_path):
    output, held_out = sample_split
    folder = tmp_path / "photos"
    shutil.copytree(held_out, folder)
    (folder / "Apple Braeburn" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    expected = recognize.command(str(output), [str(folder)], say=lambda message: None)["answers"]  # 40 images: in process

    with dask.config.set({"pipeline.recognize.in-process-images": 10, "pipeline.images-per-partition": 16}):
        result = recognize.command(str(output), [str(folder)], cluster_address=dask_cluster, say=lambda message: None, progress=False)
    written = output / recognize.FOLDER
    assert result == {"images": 40, "answered": 39, "failed": 1, "skipped_non_images": 0,
                      "predictions": str(written / "predictions.parquet"), "errors": str(written / "errors.parquet")}
    assert sorted(path.name for path in written.iterdir()) == ["errors.parquet", "predictions.parquet"]  # no _staging left

    rows = pd.read_parquet(written / "predictions.parquet")
    answered = [a for a in expected if not a["error"]]
    assert rows.path.tolist() == [a["path"][len(str(folder)) + 1 :] for a in answered]  # relative to the folder
    assert rows.label.tolist() == [a["label"] for a in answered]
    assert np.allclose(rows.confidence, [a["confidence"] for a in answered], atol=1e-5)
    assert [[n["path"] for n in row] for row in rows.neighbours] == [[n["path"] for n in a["neighbours"]] for a in answered]
    errors = pd.read_parquet(written / "errors.parquet")
    assert errors[["path", "stage"]].values.tolist() == [["Apple Braeburn/broken.jpg", "decode"]]

    paths = sorted(str(path.relative_to(folder)) for path in folder.rglob("*.jpg"))  # a listing file: read by the workers
    pd.DataFrame({"path": paths}).to_parquet(folder / "listing.parquet")
    listed = recognize.command(str(output), [str(folder / "listing.parquet")], to=str(tmp_path / "listed"),
                               cluster_address=dask_cluster, say=lambda message: None, progress=False)
    assert (listed["images"], listed["answered"]) == (40, 39)
    assert pd.read_parquet(tmp_path / "listed" / "predictions.parquet").path.tolist() == rows.path.tolist()


@pytest.mark.slow
def test_an_s3_output_recognizes_photos_in_s3_and_keeps_its_classifier_there(sample_split, s3, s3_endpoint):
    output, held_out = sample_split
    s3.put(str(output) + "/", "fruits/out/", recursive=True)
    s3.rm("fruits/out/recognizer.npz")  # the local one, if an earlier test trained it: this one must be trained in S3
    photo = sorted(held_out.rglob("*.jpg"))[0]
    s3.put(str(photo), "fruits/new/photo.jpg")

    result = pipeline_recognize("s3://fruits/out", "s3://fruits/new/photo.jpg", "--endpoint-url", s3_endpoint, "--json")
    assert result.returncode == 0, result.stderr
    answer, = json.loads(result.stdout)["answers"]
    assert answer["path"] == "s3://fruits/new/photo.jpg" and answer["label"].startswith("Apple ") and answer["error"] is None
    assert s3.exists("fruits/out/recognizer.npz")
    local, = recognize.Recognizer.load(str(output)).recognize([photo.read_bytes()])
    assert answer["label"] == local.label and [n["path"] for n in answer["neighbours"]] == [n.path for n in local.neighbours]
