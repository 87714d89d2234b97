"""`python -m pipeline evaluate OUTPUT`: a logistic regression on a finished run's PCA features, scored against chance."""
import json
import shutil
import subprocess
import sys

import dask.config
import fsspec
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import pipeline
from pipeline import cli
from pipeline.making import reduce, sink
from pipeline.reading import evaluate
from pipeline.config import SAMPLE_DIR

FILES = ["evaluation.html", "evaluation.json", "accuracy-vs-k.png", "confusion-matrix.png"]


def pipeline_evaluate(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", "evaluate", *args], capture_output=True, text=True, timeout=120)


def run_pipeline(images, output, cluster):
    pipeline.run(pipeline.settings(input=str(images), output=str(output), cluster=cluster, weights="random"),
                 progress=False, say=lambda message: None)
    return output


@pytest.fixture(scope="module")
def sample_run(dask_cluster, tmp_path_factory):
    """The output of a real run on the shipped sample (129 images, 13 apple labels, Training only), random weights."""
    return run_pipeline(SAMPLE_DIR, tmp_path_factory.mktemp("run") / "out", dask_cluster)


def fake_output(folder, labels, splits, features, kept, parts=1, names=None):
    """A finished output written by hand in the documented format (pca.npz holds every fitted component),
    its rows in `parts` parts of about equal size, in order; `names`: the images' file names (default i.jpg)."""
    mean = features.mean(axis=0)
    _, singular, axes = np.linalg.svd(features - mean, full_matrices=False)
    variance = singular**2 / (len(features) - 1)
    pca = reduce.Pca(components=axes, singular_values=singular, explained_variance=variance,
                     explained_variance_ratio=variance / variance.sum(), mean=mean, var=features.var(axis=0),
                     n_samples=len(features), n_components=kept)
    paths = [f"{label}/{name}" for label, name in zip(labels, names or [f"{i}.jpg" for i in range(len(labels))])]
    rows = pd.DataFrame({"path": paths, "label": labels, "split": splits, "identity": ["100@0"] * len(paths)})
    table = sink.rows_table(rows, features=features.astype(np.float32), pca=(features - mean) @ axes[:kept].T)
    fs = fsspec.filesystem("file")
    fs.makedirs(f"{folder}/{sink.IMAGES}")
    for index, rows in enumerate(np.array_split(np.arange(len(paths)), parts)):
        sink.write_parquet(fs, f"{folder}/{sink.IMAGES}/{sink.part_name(index)}", table.take(rows))
    sink.write_parquet(fs, f"{folder}/{sink.ERRORS}", sink.errors_table([]))
    pca.save(fs, f"{folder}/{sink.PCA}")
    manifest = {"weights": {"requested": "imagenet", "used": "imagenet", "warning": None}, "pca": {"n_components": kept}}
    sink.write_json(fs, f"{folder}/{sink.MANIFEST}", manifest)
    return folder


def check_pictures(folder):
    """Each picture is a valid PNG with something drawn on it."""
    for name in FILES[2:]:
        with Image.open(folder / name) as picture:
            assert picture.format == "PNG", name
            picture.verify()
        with Image.open(folder / name) as picture:
            assert len(picture.convert("RGB").getcolors(maxcolors=1 << 20)) > 20, f"{name} looks blank"


@pytest.fixture(scope="module")
def evaluated(sample_run):
    """`pipeline evaluate` on the sample's output, as a user runs it."""
    result = pipeline_evaluate(str(sample_run))
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_random_weights_separate_the_sample_apples_well_above_chance(sample_run, evaluated):
    result = evaluated
    scores = json.loads((sample_run / "evaluation" / "evaluation.json").read_text())

    assert scores["labels"] == 13 and scores["chance"]["uniform"] == pytest.approx(1 / 13)
    assert scores["accuracy"] > 3 * scores["chance"]["uniform"]  # measured: 0.66 against 0.077
    assert scores["accuracy"] > 3 * scores["chance"]["majority"]
    assert scores["split"] == {"method": "a random hold-out of 25% of each label's images (seed 0), as the output has no Test "
                                         "split", "train": 91, "test": 38}
    assert scores["notes"][-1].startswith("the hold-out is random: where images come in series")  # and the sample's
    assert "Fruits-360's series of frames in 13 labels: `--holdout series`" in scores["notes"][-1]  # names have both
    assert scores["weights"] == {"requested": "random", "used": "random", "warning": None, "seed": 0, "finetuned": None}

    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"accuracy   {scores['accuracy']:.3f} on 38 test images, k = {scores['k']} components; chance 0.077")
    assert "weights    random, seed 0: an untrained CNN; these figures are not ImageNet's" in lines
    folder = sample_run / "evaluation"
    assert lines[-4:] == [f"written    {folder / FILES[0]}", *(f"           {folder / name}" for name in FILES[1:])]


@pytest.mark.slow
def test_the_evaluation_holds_the_per_label_table_accuracy_by_k_and_pictures(sample_run, evaluated):
    folder = sample_run / "evaluation"
    scores = json.loads((folder / "evaluation.json").read_text())

    assert [entry["k"] for entry in scores["accuracy_vs_k"]] == [2, 5, 10, 20, 50, scores["k"]]
    assert scores["accuracy_vs_k"][-1]["accuracy"] == scores["accuracy"]
    table = scores["per_label"]
    assert [row["label"] for row in table] == sorted(path.name for path in (SAMPLE_DIR / "Training").iterdir())
    assert sum(row["support"] for row in table) == 38 and all(row["support"] >= 2 for row in table)  # stratified
    assert all(0 <= row[name] <= 1 for row in table for name in ("precision", "recall", "f1"))
    counts = np.array(scores["confusion"]["counts"])
    assert counts.sum() == 38 and np.trace(counts) / 38 == pytest.approx(scores["accuracy"])

    check_pictures(folder)
    page = (folder / "evaluation.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "these figures are not ImageNet&#x27;s" in page
    assert "<td>Apple Red Delicious</td>" in page


@pytest.mark.slow
def test_a_training_and_test_layout_is_used_as_given(dask_cluster, tmp_path):
    images = tmp_path / "images"
    for folder in sorted((SAMPLE_DIR / "Training").iterdir()):
        for i, image in enumerate(sorted(folder.iterdir())):
            split = "Test" if i < 3 else "Training"
            (images / split / folder.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, images / split / folder.name / image.name)
    output = run_pipeline(images, tmp_path / "out", dask_cluster)

    scores = evaluate.evaluate(evaluate.load(str(output)))
    assert scores["split"] == {"method": "the output's Training and Test splits", "train": 129 - 39, "test": 39}
    assert [row["support"] for row in scores["per_label"]] == [3] * 13
    assert scores["accuracy"] > 3 * scores["chance"]["uniform"] and scores["notes"] == []


@pytest.mark.slow
def test_an_s3_output_is_evaluated_in_place_or_into_a_local_folder(sample_run, s3, s3_endpoint, tmp_path):
    s3.put(str(sample_run) + "/", "fruits/out/", recursive=True)
    s3.rm("fruits/out/evaluation", recursive=True)  # the local one: this one must come from S3

    result = pipeline_evaluate("s3://fruits/out", "--endpoint-url", s3_endpoint, "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)  # stdout holds the JSON alone
    assert scores["output"] == "s3://fruits/out"
    s3.get("fruits/out/evaluation/", str(tmp_path / "from-s3") + "/", recursive=True)
    assert json.loads((tmp_path / "from-s3" / "evaluation.json").read_text()) == scores
    check_pictures(tmp_path / "from-s3")

    result = pipeline_evaluate("s3://fruits/out", "--endpoint-url", s3_endpoint, "--to", str(tmp_path / "local"))
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in (tmp_path / "local").iterdir()) == sorted(FILES)


def test_k_beyond_the_components_kept_projects_the_features_with_every_fitted_component(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(["Apple", "Pear", "Plum"], 20)
    centres = rng.normal(size=(3, 64)) * 3
    features = centres[np.repeat([0, 1, 2], 20)] + rng.normal(size=(60, 64))
    output = fake_output(tmp_path / "out", labels, [None] * 60, features, kept=5)

    images = evaluate.load(str(output))
    assert images.kept == 5 and images.k_values == [2, 5, 10, 20, 50]
    pca = reduce.Pca.load(fsspec.filesystem("file"), str(output / "pca.npz"))
    assert np.allclose(images.vectors, (features - pca.mean) @ pca.components[:50].T, atol=1e-4)
    scores = evaluate.evaluate(images)
    assert [entry["k"] for entry in scores["accuracy_vs_k"]] == [2, 5, 10, 20, 50] and scores["k"] == 5
    assert scores["accuracy"] == 1.0 and scores["weights_note"] == "imagenet"


def three_fruits(per_label, dims=16, seed=0):
    """Labels and features of 3 well-separated fruits, `per_label` images of each, in label order as sorted paths are."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(["Apple", "Pear", "Plum"], per_label)
    return labels, np.repeat(rng.normal(size=(3, dims)) * 3, per_label, axis=0) + rng.normal(size=(len(labels), dims))


def test_an_output_of_more_images_than_max_images_is_evaluated_on_a_sample_of_exactly_that_many_and_says_so(tmp_path):
    labels, features = three_fruits(40)
    output = fake_output(tmp_path / "out", labels, [None] * 120, features, kept=4, parts=4)

    images = evaluate.load(str(output), max_images=50)
    assert (len(images.labels), len(images.vectors), images.n_images) == (50, 50, 120) and images.sampled
    scores = evaluate.evaluate(images)
    assert scores["notes"][0] == "evaluated on a sample of 50 of 120 images (evaluate.max-images)"
    assert scores["sample"] == {"images": 50, "of": 120, "max_images": 50, "method": evaluate.SAMPLE_METHOD}
    assert scores["split"]["train"] + scores["split"]["test"] == 50  # the hold-out is drawn from the sample
    assert scores["labels"] == 3 and scores["accuracy"] == 1.0  # it still scores: the fruits are far apart
    page = evaluate.page(scores, {})
    assert "evaluated on a sample of 50 of 120 images (evaluate.max-images)" in page
    assert "note       evaluated on a sample of 50 of 120 images (evaluate.max-images)" in evaluate.summary(scores)


def test_the_sample_is_the_same_every_time_and_its_coordinates_are_those_of_its_own_rows(tmp_path):
    labels, features = three_fruits(40)
    output = fake_output(tmp_path / "out", labels, [None] * 120, features, kept=4, parts=4)

    first, again = evaluate.load(str(output), max_images=50), evaluate.load(str(output), max_images=50)
    assert first.labels.tolist() == again.labels.tolist() and np.array_equal(first.vectors, again.vectors)
    # k up to 10 > 4 kept: the sampled rows' features were projected, each onto its own row's coordinates
    pca = reduce.Pca.load(fsspec.filesystem("file"), str(output / "pca.npz"))
    every = (features - pca.mean) @ pca.components[: first.k_values[-1]].T
    nearest = np.linalg.norm(first.vectors[:, None, :] - every[None], axis=2).argmin(axis=1)
    assert np.allclose(first.vectors, every[nearest], atol=1e-4) and len(set(nearest)) == 50
    assert labels[nearest].tolist() == first.labels.tolist()


def test_a_sample_keeps_the_output_s_training_and_test_splits(tmp_path):
    labels, features = three_fruits(40)
    splits = np.tile(["Training"] * 30 + ["Test"] * 10, 3)
    output = fake_output(tmp_path / "out", labels, splits, features, kept=4, parts=4)

    scores = evaluate.evaluate(evaluate.load(str(output), max_images=60))
    assert scores["split"]["method"] == "the output's Training and Test splits"
    assert scores["split"]["train"] + scores["split"]["test"] == 60 and scores["split"]["test"] > 0
    assert scores["notes"] == ["evaluated on a sample of 60 of 120 images (evaluate.max-images)"]


def test_max_images_comes_from_the_settings_and_at_or_above_the_images_reads_every_one(tmp_path):
    labels, features = three_fruits(40)
    output = fake_output(tmp_path / "out", labels, [None] * 120, features, kept=4, parts=4)

    assert evaluate.load(str(output)).max_images == 100_000  # pipeline.yaml's evaluate.max-images
    with dask.config.set({"pipeline.evaluate.max-images": 30}):
        assert len(evaluate.load(str(output)).labels) == 30
    with dask.config.set({"pipeline.evaluate.max-images": None}):  # null: every image
        assert len(evaluate.load(str(output)).labels) == 120
    whole = evaluate.load(str(output), max_images=120)
    assert len(whole.labels) == 120 and not whole.sampled and evaluate.evaluate(whole)["sample"] is None


def test_the_command_takes_max_images_and_refuses_a_bad_one_in_one_line(tmp_path):
    labels, features = three_fruits(40)
    output = fake_output(tmp_path / "out", labels, [None] * 120, features, kept=4, parts=4)

    result = pipeline_evaluate(str(output), "--max-images", "50")
    assert result.returncode == 0, result.stderr
    assert "note       evaluated on a sample of 50 of 120 images (evaluate.max-images)" in result.stdout.splitlines()
    result = pipeline_evaluate(str(output), "--max-images", "0")
    assert result.returncode == 2 and result.stderr.strip() == "error: `evaluate.max-images` must be a positive integer, got '0'"


def test_labels_of_a_single_image_are_left_out_of_a_hold_out_with_a_note():
    labels = np.array(["Apple"] * 8 + ["Pear"] * 2 + ["Plum"])
    rows = evaluate.split(labels, np.array([None] * 11))
    assert sorted(labels[rows.test]) == ["Apple", "Apple", "Pear"] and sorted(labels[rows.train]) == ["Apple"] * 6 + ["Pear"]
    assert rows.notes[0] == "left out the labels with a single image (a hold-out needs one to train on and one to test): Plum"
    assert rows.notes[1] == ("the hold-out is random: where images come in series (frames of one fruit turning, as in "
                             "Fruits-360), it tests on near-copies of training images and flatters the features; for a fair "
                             "figure, give the output a Test split (a Test/ folder beside Training/)")  # no r_* names here
    again = evaluate.split(labels, np.array([None] * 11))
    assert rows.train.tolist() == again.train.tolist() and rows.test.tolist() == again.test.tolist()  # seeded


def fruits_in_two_series(per_series):
    """3 fruits whose images are named as two of Fruits-360's series of frames (12_100.jpg, r_12_100.jpg), and a Quince in one."""
    labels, features = three_fruits(2 * per_series)
    names = [f"{'r_' if i % 2 else ''}{i // 2}_100.jpg" for i in range(len(labels))]
    labels = np.concatenate([labels, ["Quince"] * 3])
    features = np.concatenate([features, features[:3] * -1])
    return labels, features, names + [f"{i}_100.jpg" for i in range(3)]


def evaluate_command(capsys, *args) -> str:
    """`python -m pipeline evaluate ARGS` in this process (no Python to start): what it printed."""
    assert cli.main(["evaluate", *args]) == 0
    return capsys.readouterr().out


def test_a_random_hold_out_says_so_and_offers_the_series_where_the_file_names_have_them(tmp_path, capsys):
    labels, features, names = fruits_in_two_series(10)
    output = fake_output(tmp_path / "out", labels, [None] * len(labels), features, kept=4, names=names)

    printed = evaluate_command(capsys, str(output), "--to", str(tmp_path / "random"))
    assert "split      47 train / 16 test, a random hold-out of 25% of each label's images (seed 0), as the output has " \
           "no Test split" in printed
    note = ("note       the hold-out is random: where images come in series (frames of one fruit turning, as in "
            "Fruits-360), it tests on near-copies of training images and flatters the features; these file names hold "
            "Fruits-360's series of frames in 3 labels: `--holdout series` trains on the first and tests on the others")
    assert note in printed.splitlines()
    page = (tmp_path / "random" / "evaluation.html").read_text()
    assert "a random hold-out of 25%" in page and "`--holdout series` trains on the first and tests on the others" in page


def test_the_series_hold_out_trains_on_one_series_and_tests_on_the_other(tmp_path, capsys):
    labels, features, names = fruits_in_two_series(10)
    output = fake_output(tmp_path / "out", labels, [None] * len(labels), features, kept=4, names=names)
    images = evaluate.load(str(output))
    assert images.series.tolist() == [name.startswith("r_") for name in names]

    rows = evaluate.split(images.labels, images.splits, series=images.series, holdout="series")
    assert all(not names[i].startswith("r_") for i in rows.train) and all(names[i].startswith("r_") for i in rows.test)
    assert (len(rows.train), len(rows.test)) == (30, 30) and "Quince" not in images.labels[np.r_[rows.train, rows.test]]
    assert rows.notes == ["left out the labels with images of one series only: Quince"]
    printed = evaluate_command(capsys, str(output), "--holdout", "series", "--to", str(tmp_path / "series"))
    assert ("split      30 train / 30 test, Fruits-360's series: trained on the first series of frames (12_100.jpg), "
            "tested on the others (r_12_100.jpg, r2_12_100.jpg: other turns of the same fruits)") in printed
    assert "the hold-out is random" not in printed


def test_a_series_hold_out_without_series_is_a_one_line_usage_error_and_a_test_split_goes_first(tmp_path, capsys):
    labels, features = three_fruits(10)
    output = fake_output(tmp_path / "out", labels, [None] * 30, features, kept=4)
    with pytest.raises(SystemExit) as exit:
        cli.main(["evaluate", str(output), "--holdout", "series"])
    assert exit.value.code == 2 and capsys.readouterr().err.strip() == (
        "error: --holdout series needs 2 labels with images of both Fruits-360 series (file names r_12_100.jpg and "
        "12_100.jpg); this output has 0: use --holdout random, or give it a Test/ folder")
    assert not (output / "evaluation").exists()
    rows = evaluate.split(labels, np.tile(["Training"] * 7 + ["Test"] * 3, 3), holdout="series")
    assert len(rows.test) == 9 and rows.notes == [
        "holdout series not used: the output's Training and Test splits are scored as they are"]
    with dask.config.set({"pipeline.evaluate.holdout": "frames"}):
        with pytest.raises(evaluate.UsageError, match="`evaluate.holdout` must be random or series, got 'frames'"):
            evaluate.evaluate(evaluate.load(str(output)))


def test_training_and_test_splits_say_what_they_leave_out():
    labels = np.array(["Apple", "Pear", "Apple", "Pear", "Plum", "Apple"])
    splits = np.array(["Training", "Training", "Test", "Test", "Test", None])
    rows = evaluate.split(labels, splits)
    assert rows.train.tolist() == [0, 1] and rows.test.tolist() == [2, 3, 4]
    assert rows.notes == ["left out the images in neither Training nor Test: 1", "labels in Test only, so never predicted: Plum"]


def test_a_label_found_only_in_test_is_scored_as_missed_and_chance_counts_the_labels_trained_on(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(["Apple", "Pear", "Plum"], 10)
    splits = np.tile(["Training"] * 7 + ["Test"] * 3, 3)
    splits[20:27] = "Test"  # every Plum is in Test
    features = np.repeat(rng.normal(size=(3, 16)) * 3, 10, axis=0) + rng.normal(size=(30, 16))
    scores = evaluate.evaluate(evaluate.load(str(fake_output(tmp_path / "out", labels, splits, features, kept=4))))

    assert scores["split"]["train"] == 14 and scores["split"]["test"] == 16
    assert scores["chance"]["uniform"] == 0.5 and scores["labels"] == 3
    assert {row["label"]: (row["recall"], row["support"]) for row in scores["per_label"]}["Plum"] == (0.0, 10)
    assert scores["notes"] == ["labels in Test only, so never predicted: Plum"]


def test_a_folder_without_a_finished_run_is_a_one_line_usage_error(tmp_path):
    result = pipeline_evaluate(str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: no manifest.json in {tmp_path}: give the --output of a finished `pipeline run`"


def test_an_interrupted_run_is_a_one_line_usage_error_saying_how_to_finish_it(tmp_path):
    (tmp_path / "_staging").mkdir()
    (tmp_path / "_staging" / "run.json").write_text("{}")
    result = pipeline_evaluate(str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {tmp_path} holds an unfinished run: finish it with "
                                     f"`python -m pipeline run --resume --output {tmp_path}` and the same options")


def test_a_single_label_is_a_one_line_usage_error(tmp_path):
    output = fake_output(tmp_path / "out", ["Apple"] * 6, ["Training"] * 6, np.random.default_rng(0).normal(size=(6, 8)), kept=3)
    result = pipeline_evaluate(str(output))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: evaluate needs images of at least 2 labels; the output has only 'Apple': label the images by folder"
    assert not (output / "evaluation").exists()


def test_a_new_output_drops_the_old_evaluation(tmp_path):
    fs, out = fsspec.filesystem("file"), str(tmp_path)
    for name in (f"{sink.STAGING}/{sink.IMAGES}/{sink.part_name(0)}", f"{sink.STAGING}/{sink.ERRORS}", f"{sink.STAGING}/{sink.PCA}",
                 f"{sink.STAGING}/{sink.INDEX}/index.json", "evaluation/evaluation.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    sink.commit(fs, out, {})
    assert sorted(fs.ls(out, detail=False)) == [f"{out}/{name}" for name in sorted(sink.FINAL + (sink.MANIFEST,))]
