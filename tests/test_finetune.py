"""`python -m pipeline finetune`: a tiny MobileNetV2 (32 px, 2 epochs) taught three apples of the shipped sample."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import pipeline
from pipeline.making import featurize, finetune
from pipeline.reading import evaluate
from pipeline.config import SAMPLE_DIR, UsageError

LABELS = ("Apple Golden 1", "Apple Granny Smith", "Apple Red 1")  # three the eye tells apart
SIZE = 32
QUICK = {"epochs": 2, "batch_size": 8, "bn_batches": 4}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Three labels of the shipped sample (about 10 images each), in the Training/<label>/ layout."""
    root = tmp_path_factory.mktemp("labelled")
    for label in LABELS:
        shutil.copytree(SAMPLE_DIR / "Training" / label, root / "Training" / label)
    return root


def settings(input, **overrides):
    return pipeline.settings(input=str(input), image_size=SIZE, **{"weights": "random"} | overrides)


def subprocess_env():
    return os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def trained(labelled, tmp_path_factory):
    """The command, run once: the weights file and the JSON it printed."""
    weights = tmp_path_factory.mktemp("weights") / f"apples{finetune.SUFFIX}"
    command = [sys.executable, "-m", "pipeline", "finetune", "--input", str(labelled), "--output", str(weights),
               "--image-size", str(SIZE), "--weights", "random", "--epochs", "2", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return weights, json.loads(done.stdout), done.stderr


def test_finetune_writes_a_no_top_weights_file_and_says_what_made_it(trained, labelled):
    weights, made, log = trained
    assert weights.exists() and not os.path.exists(f"{weights}{finetune.CHECKPOINT}")  # the checkpoint is gone
    assert json.loads(open(f"{weights}{finetune.ABOUT}").read()) == made
    assert made["labels"] == sorted(LABELS) and made["model"] == "mobilenet_v2" and made["image_size"] == SIZE
    assert made["starting_weights"] == {"used": "random", "seed": 0, "warning": None}
    assert made["epochs"] == 2 and len(made["history"]) == 2 and made["device"] == "CPU"
    assert made["data"]["trained_on"] + made["data"]["validation"] == made["data"]["images"] > 25
    assert "by series" in made["data"]["held_out"]
    assert [line for line in log.splitlines() if line.startswith("epoch ")][0].split()[:2] == ["epoch", "1"]


def test_run_uses_the_weights_and_its_manifest_evaluate_and_recognize_say_they_are_fine_tuned(trained, labelled, tmp_path):
    weights, made, _ = trained
    s = settings(labelled, weights=str(weights), output=str(tmp_path / "out"), backend="tensorflow")
    manifest = pipeline.run(s, progress=False, say=lambda m: None)
    assert manifest["weights"]["used"] == str(weights)
    assert manifest["weights"]["finetuned"]["validation_accuracy"] == made["validation_accuracy"]
    note = evaluate.evaluate(evaluate.load(str(tmp_path / "out"), {}))["weights_note"]
    assert note.startswith("fine-tuned on ") and str(labelled) in note and "3 labels" in note
    from pipeline.reading.recognize import command

    answer = command(str(tmp_path / "out"), [str(next((labelled / "Training" / LABELS[0]).iterdir()))], say=lambda m: None)
    assert answer["weights"] == note


def test_batch_norm_statistics_are_re_estimated_from_the_training_batches():
    """Trained from scratch with a slow momentum, inference would normalise by the initial statistics (mean 0,
    variance 1): its outputs far from training's. Re-estimated over batches (each weighing 1/k of the running
    average), inference computes what training computed with those batches' statistics."""
    import keras

    backbone, prepare = featurize.keras_network(featurize.ModelKey("mobilenet_v2", SIZE, "random", 0), {})
    batch = np.random.default_rng(0).integers(0, 256, (64, SIZE, SIZE, 3)).astype("float32")
    as_trained = keras.ops.convert_to_numpy(backbone(prepare(batch), training=True))

    def gap():
        inferred = keras.ops.convert_to_numpy(backbone(prepare(batch), training=False))
        return np.abs(inferred - as_trained).mean() / np.abs(as_trained).mean()

    before = gap()
    assert finetune.reestimate_batch_norm(backbone, prepare, [batch, batch[::-1]]) == 2  # the same statistics twice
    assert gap() < 1e-3 and before > 0.5


def test_run_refuses_fine_tuned_weights_of_another_model_before_any_work(trained, labelled, tmp_path):
    weights, _, _ = trained
    s = settings(labelled, weights=str(weights), output=str(tmp_path / "out"), model="mobilenet_v2_050")
    with pytest.raises(UsageError, match="pass --model mobilenet_v2 --image-size 32"):
        pipeline.run(s, progress=False, say=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_the_weights_file_gives_inference_the_trained_networks_features(tmp_path):
    """What `finetune` writes is the network as trained, its re-estimated statistics included: the featurizer that
    `run` uses, loading the file, computes the same features as the network did at inference."""
    import keras

    s = pipeline.settings(image_size=SIZE, weights="random")
    backbone, prepare, classifier = finetune.networks(s, featurize.Weights("random"), 3, finetune.recipe())
    batch = np.random.default_rng(1).integers(0, 256, (16, SIZE, SIZE, 3)).astype("float32")
    classifier.fit(batch, np.arange(16) % 3, epochs=1, verbose=0)
    finetune.reestimate_batch_norm(backbone, prepare, [batch])
    expected = keras.ops.convert_to_numpy(backbone(prepare(batch), training=False))
    backbone.save_weights(tmp_path / f"w{finetune.SUFFIX}")
    model = featurize.Featurizer(featurize.ModelKey("mobilenet_v2", SIZE, str(tmp_path / f"w{finetune.SUFFIX}"), 0, "tensorflow"), {})
    features, _ = model(list(batch.astype(np.uint8)), 16)
    assert featurize.features_agree(features, expected, 1e-3)


def test_validation_holds_out_contiguous_frames_of_each_series():
    paths = [f"Training/A/{prefix}{frame}_100.jpg" for prefix in ("", "r_") for frame in range(0, 100, 2)]
    paths += [f"Training/B/{frame}_100.jpg" for frame in range(40)]
    labels = np.array([0] * 100 + [1] * 40)
    held, how = finetune.validation_split(paths, labels, 0.2, seed=1)
    assert how.startswith("by series") and held.sum() == 10 + 10 + 8
    for first in (0, 50, 100):  # each series: one run of frames
        series = held[first : first + (50 if first < 100 else 40)]
        assert np.flatnonzero(np.diff(series.astype(int))).size <= 2


def test_validation_is_random_per_label_when_names_carry_no_series():
    paths = [f"A/photo-{i}.jpg" for i in range(20)] + [f"B/img{i}.png" for i in range(10)]
    held, how = finetune.validation_split(paths, np.array([0] * 20 + [1] * 10), 0.2, seed=0)
    assert how.startswith("at random") and held[:20].sum() == 4 and held[20:].sum() == 2


@pytest.mark.slow
def test_an_interrupted_finetune_resumes_from_its_last_finished_epoch(labelled, tmp_path):
    weights = str(tmp_path / f"w{finetune.SUFFIX}")
    s = settings(labelled)
    r = finetune.recipe(**QUICK | {"epochs": 3, "patience": 10})

    def interrupt_after_epoch_1(line):
        if line.startswith("epoch   1"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune.train(s, r, weights, interrupt_after_epoch_1)
    state = finetune.Checkpoint(weights, {}).state()
    assert state["epochs"] == 1 and not os.path.exists(weights)
    said = []
    made = finetune.train(s, r, weights, said.append)
    assert any(line.startswith("resuming after epoch 1") for line in said)
    assert [entry["epoch"] for entry in made["history"]] == [1, 2, 3] and made["epochs"] == 3
    assert made["history"][0] == state["history"][0]
    assert not os.path.exists(weights + finetune.CHECKPOINT)


def test_finetune_refuses_a_name_keras_cannot_load_and_a_single_label(labelled, tmp_path):
    with pytest.raises(UsageError, match=r"\.weights\.h5"):
        finetune.finetune(settings(labelled), finetune.recipe(), str(tmp_path / "w.h5"))
    one = tmp_path / "one"
    shutil.copytree(labelled / "Training" / LABELS[0], one / LABELS[0])
    with pytest.raises(UsageError, match="at least 2 label"):
        finetune.finetune(settings(one), finetune.recipe(**QUICK), str(tmp_path / f"w{finetune.SUFFIX}"))


@pytest.mark.slow
def test_on_a_cluster_the_task_reads_the_images_and_writes_the_weights_by_url(s3, s3_endpoint, tmp_path):
    """--cluster: one task on a worker of a LocalCluster started by the project's cluster code, input and weights on S3."""
    storage = {"endpoint_url": s3_endpoint}
    s = pipeline.settings(input="s3://fruits/fruits-360", image_size=SIZE, weights="random", storage_options=storage,
                          cluster="local", local_cluster={"n-workers": 1, "threads-per-worker": 2, "dashboard-address": ":0"})
    said = []
    made = finetune.finetune(s, finetune.recipe(**QUICK | {"epochs": 1}), "s3://fruits/models/apples.weights.h5", said.append)
    assert s3.exists("fruits/models/apples.weights.h5") and s3.exists("fruits/models/apples.weights.h5.json")
    assert not s3.exists("fruits/models/apples.weights.h5.checkpoint")
    assert made["epochs"] == 1 and len(made["labels"]) == 13
    assert any(line.startswith("epoch   1") for line in said)  # the worker's progress, said by the client
