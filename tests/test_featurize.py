"""The model: seeded random weights that carry information, weights from a file or a bucket, batching, backends."""
import sys

import numpy as np
import pandas as pd
import pytest

import pipeline
from pipeline.making import featurize
from pipeline.config import SAMPLE_DIR, UsageError
from pipeline.images import decode

LIMIT = pipeline.settings().max_image_pixels

pytestmark = pytest.mark.slow
RANDOM = featurize.ModelKey("mobilenet_v2", 96, "random", 0)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Two photos of each of three apple varieties, decoded."""
    folders = ["Apple Golden 1", "Apple Red 1", "Apple Granny Smith"]
    paths = [p for folder in folders for p in sorted((SAMPLE_DIR / "Training" / folder).glob("*.jpg"))[:2]]
    return [decode(p.read_bytes(), 96, LIMIT) for p in paths]


@pytest.fixture(scope="module")
def random_model() -> featurize.Featurizer:
    return featurize.Featurizer(RANDOM, {})


def test_random_weights_are_deterministic_and_informative(random_model, photos):
    features, _ = random_model(photos, batch_size=4)
    again, _ = featurize.Featurizer(RANDOM, {})(photos, batch_size=4)
    np.testing.assert_array_equal(features, again)
    assert features.shape == (6, 1280) and features.std(axis=0).mean() > 1e-3
    # on average, two photos of one variety are closer to each other than to other varieties
    distances = np.linalg.norm(features[:, None] - features[None], axis=-1)
    same = np.array([[i // 2 == j // 2 and i != j for j in range(6)] for i in range(6)])
    different = np.array([[i // 2 != j // 2 for j in range(6)] for i in range(6)])
    assert distances[same].mean() < distances[different].mean()


def test_batching_and_padding_do_not_change_features(random_model, photos):
    one_by_one, _ = random_model(photos, batch_size=1)
    padded, _ = random_model(photos, batch_size=4)  # a full batch, then 2 images padded to 4
    np.testing.assert_allclose(one_by_one, padded, rtol=1e-4, atol=1e-5)


def test_mixed_precision_keeps_features_within_1e_2_of_float32(random_model, photos):
    assert random_model.precision == "float32"  # no GPU here: float32 by default
    mixed = featurize.Featurizer(RANDOM, {}, mixed_precision=True)
    assert mixed.precision == "mixed_float16" and mixed.model.layers[-1].compute_dtype == "float16"
    full, _ = random_model(photos, batch_size=4)
    half, _ = mixed(photos, batch_size=4)
    assert half.dtype == np.float32
    error = np.linalg.norm(half - full, axis=1) / np.linalg.norm(full, axis=1)
    assert 0 < error.max() <= 1e-2


def test_weights_load_from_a_file_or_a_bucket(random_model, photos, tmp_path, s3, s3_endpoint, monkeypatch):
    path = tmp_path / "apples.weights.h5"
    random_model.model.save_weights(path)
    s3.put(str(path), "fruits/models/apples.weights.h5")
    expected, _ = random_model(photos, batch_size=4)
    options = {"endpoint_url": s3_endpoint}
    for url in (str(path), "s3://fruits/models/apples.weights.h5"):
        assert featurize.resolve_weights("mobilenet_v2", url, 0, options).used == url
        key = featurize.ModelKey("mobilenet_v2", 96, url, 0)
        np.testing.assert_array_equal(featurize.Featurizer(key, options)(photos, 4)[0], expected)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    exported = featurize.Featurizer(featurize.ModelKey("mobilenet_v2", 96, "s3://fruits/models/apples.weights.h5", 0, "onnxruntime"), options)
    assert featurize.features_agree(exported(photos, 4)[0], expected)  # the file's weights, exported to ONNX


def test_a_missing_weights_file_or_unknown_model_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="weights file .* not found"):
        featurize.resolve_weights("mobilenet_v2", str(tmp_path / "none.h5"), 0, {})
    with pytest.raises(UsageError, match="unknown model .vgg19.: choose one of mobilenet_v2, .*resnet50"):
        featurize.model_spec("vgg19")


def test_resnet50_is_the_second_choice_with_2048_features(photos):
    features, _ = featurize.Featurizer(featurize.ModelKey("resnet50", 96, "random", 0), {})(photos[:2], batch_size=2)
    assert features.shape == (2, 2048) and np.isfinite(features).all() and features.std(axis=0).mean() > 0


@pytest.mark.parametrize("backend", ["jax", "torch", "onnxruntime"])
def test_other_engines_give_tensorflows_features_and_their_workers_never_import_tensorflow(backend, tmp_path, monkeypatch, aws_env):
    pytest.importorskip(backend)  # jax and onnxruntime come with the package; PyTorch's CPU wheel is optional
    from distributed import Client, LocalCluster

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no exported network yet: the worker exports it
    settings = pipeline.settings(output=str(tmp_path / "out"), weights="random", image_size=96, backend=backend, n_components=10)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:
        manifest = pipeline.run(settings, client=client, progress=False, say=lambda message: None)
        [imported] = client.run(lambda: {name.split(".")[0] for name in sys.modules}).values()
    assert backend in imported and "tensorflow" not in imported  # (Keras on torch imports jax for some helpers)
    assert manifest["settings"]["backend"] == backend and manifest["model"]["devices"] == [f"CPU, float32, {backend}"]
    if backend == "onnxruntime":  # exported once, by a child process, into this user's cache
        assert "keras" not in imported and len(list((tmp_path / "cache").rglob("*.onnx"))) == 1

    rows = pd.read_parquet(tmp_path / "out" / "images.parquet").sort_values("path")
    photos = [decode((SAMPLE_DIR / path).read_bytes(), 96, LIMIT) for path in rows.path]
    expected, _ = featurize.featurizer(RANDOM, {})(photos, batch_size=32)  # this process runs TensorFlow
    assert featurize.features_agree(np.stack(rows.features), expected)


def test_auto_runs_onnxruntime_on_cpu_workers_and_tensorflow_on_gpu_workers(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert featurize.engine("auto") == "onnxruntime" and featurize.engine("jax") == "jax"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert featurize.engine("auto") == "tensorflow" and featurize.engine("onnxruntime") == "onnxruntime"
