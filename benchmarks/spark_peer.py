"""The PySpark peer: the same job the way the seed project did it, done well, for the benchmark.

    images (binaryFile) → iterator pandas UDF (model built once per iterator from broadcast
    weights, batched inference) → cached features → Spark ML StandardScaler (centering) + PCA
    → parquet (path, label, split, features, pca)

Same model, weights, input size and batch as the pipeline: MobileNetV2 (or ResNet50) without its
top, seeded random weights built with pipeline.making.featurize on the driver and broadcast, images
resized to the input size in the model's graph. Local mode, one core per task, and each task's
TensorFlow on one thread (spark.task.cpus), so the cores are not oversubscribed.

Reads a local folder: Spark reads s3a:// only with the hadoop-aws jars, which are not on PyPI (and
this machine cannot download them). Prints a JSON line of timings and counts on stdout.

    .venv/bin/python benchmarks/spark_peer.py IMAGES_FOLDER OUTPUT_FOLDER --cores 2
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Iterator

import pandas as pd

REPO = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=pathlib.Path, help="folder of images (read recursively, *.jpg)")
    parser.add_argument("output", type=pathlib.Path, help="parquet folder to write (replaced)")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)), help="local[N] (default: this machine's cores)")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-components", type=float, default=0.95, help="fraction of variance kept (default 0.95)")
    parser.add_argument("--tasks-per-core", type=int, default=1,
                        help="featurizing tasks per core: the model is built once per task (default 1)")
    parser.add_argument("--driver-memory", default="4g")
    return parser.parse_args(argv)


def start_spark(cores: int, driver_memory: str):
    """A local SparkSession with `cores` task slots, Arrow batches of a few model batches."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # Python workers with this environment's packages
    return (
        SparkSession.builder.master(f"local[{cores}]")
        .appName("fruits-spark-peer")
        .config("spark.driver.memory", driver_memory)
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "256")
        .config("spark.python.worker.reuse", "true")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", str(cores))
        .getOrCreate()
    )


def seeded_weights(model: str, image_size: int, seed: int) -> list:
    """The pipeline's seeded random weights for `model` (ImageNet is not reachable here), as arrays."""
    sys.path.insert(0, str(REPO))
    from pipeline.making.featurize import Featurizer, ModelKey

    return Featurizer(ModelKey(model, image_size, "random", seed), {}).model.get_weights()


def featurize_udf(broadcast, application: str, module: str, n_features: int, image_size: int, batch_size: int):
    """An iterator pandas UDF: image bytes → features; the model is built once per iterator (task)."""
    from pyspark.sql.functions import pandas_udf
    from pyspark.sql.types import ArrayType, FloatType

    @pandas_udf(ArrayType(FloatType()))
    def featurize(contents: Iterator[pd.Series]) -> Iterator[pd.Series]:
        import io

        import numpy as np
        import tensorflow as tf
        from PIL import Image

        try:  # one task per core: TensorFlow gets one thread, before it starts
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # a reused Python worker: already set
            pass
        import keras

        model = getattr(keras.applications, application)(
            include_top=False, weights=None, pooling="avg", input_shape=(image_size, image_size, 3)
        )
        model.set_weights(broadcast.value)
        preprocess = getattr(keras.applications, module).preprocess_input

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
        def embed(batch):
            pixels = tf.image.resize(tf.cast(batch, tf.float32), (image_size, image_size))
            return model(preprocess(pixels), training=False)

        def decode(data: bytes) -> np.ndarray:
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert("RGB")
                if image.width > image_size or image.height > image_size:
                    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
                return np.asarray(image)

        for content in contents:
            arrays = [decode(data) for data in content]
            out = np.empty((len(arrays), n_features), np.float32)
            for start in range(0, len(arrays), batch_size):
                chunk = arrays[start : start + batch_size]
                if len({a.shape for a in chunk}) > 1:  # one batch, one shape
                    chunk = [np.asarray(Image.fromarray(a).resize((image_size, image_size))) for a in chunk]
                batch = np.zeros((batch_size, *chunk[0].shape), np.uint8)  # padded: one graph for all
                batch[: len(chunk)] = chunk
                out[start : start + len(chunk)] = embed(batch).numpy()[: len(chunk)]
            yield pd.Series(list(out))

    return featurize


def components_for(ratios, fraction: float) -> int:
    """The smallest k whose components keep `fraction` of the variance."""
    import numpy as np

    return min(int(np.searchsorted(np.cumsum(ratios), fraction * (1 - 1e-9))) + 1, len(ratios))


def run(args: argparse.Namespace) -> dict:
    """The whole job; returns timings (seconds per step) and counts."""
    sys.path.insert(0, str(REPO))
    from pipeline.making.featurize import MODELS
    from pipeline.making.job import stopwatch

    spec = MODELS[args.model]
    timings: dict[str, float] = {}
    with stopwatch(timings, "spark start"):
        spark = start_spark(args.cores, args.driver_memory)
    try:
        from pyspark import StorageLevel
        from pyspark.ml.feature import PCA, StandardScaler
        from pyspark.ml.functions import array_to_vector, vector_to_array
        from pyspark.sql import functions as F

        with stopwatch(timings, "model build + broadcast"):
            broadcast = spark.sparkContext.broadcast(seeded_weights(args.model, args.image_size, args.seed))
        featurize = featurize_udf(broadcast, spec.application, spec.module, spec.n_features,
                                  args.image_size, args.batch_size)
        root = args.input.resolve().as_uri().replace("file:///", "file:/")
        images = (
            spark.read.format("binaryFile")
            .option("pathGlobFilter", "*.jpg")
            .option("recursiveFileLookup", "true")
            .load(str(args.input.resolve()))
        )
        parts = F.split("path", "/")
        rows = images.select(
            F.expr(f"substring(path, {len(root) + 2})").alias("path"),
            F.element_at(parts, -2).alias("label"),
            F.when(F.array_contains(parts, "Training"), "Training").when(F.array_contains(parts, "Test"), "Test").alias("split"),
            "content",
        ).coalesce(args.cores * args.tasks_per_core)
        features = rows.select("path", "label", "split", featurize("content").alias("features"))
        features = features.persist(StorageLevel.MEMORY_AND_DISK)
        with stopwatch(timings, "list + read + featurize"):
            n = features.count()
        with stopwatch(timings, "pca fit"):
            vectors = features.withColumn("vector", array_to_vector("features"))
            # Spark's PCA does not centre what it projects: centre first, as (x - mean) @ components.T
            scaler = StandardScaler(withMean=True, withStd=False, inputCol="vector", outputCol="centred").fit(vectors)
            centred = scaler.transform(vectors)
            # Every component, for the variance curve that chooses k; the projection keeps the first k.
            # (A second fit with k < d would compute the covariance again and use ARPACK: slower.)
            pca = PCA(k=min(n, spec.n_features), inputCol="centred", outputCol="projection").fit(centred)
            ratios = pca.explainedVariance.toArray()
            k = components_for(ratios, args.n_components)
        with stopwatch(timings, "project + write"):
            projection = F.slice(vector_to_array("projection", "float32"), 1, k)
            (
                pca.transform(centred)
                .select("path", "label", "split", "features", projection.alias("pca"))
                .write.mode("overwrite").parquet(str(args.output))
            )
        variance_kept = float(ratios[:k].sum())
    finally:
        spark.stop()
    return {"images": n, "n_components": k, "variance_kept": variance_kept, "timings_s": timings,
            "cores": args.cores, "tasks": args.cores * args.tasks_per_core}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.input.is_dir():
        sys.exit(f"error: no folder {args.input}")
    started = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - started
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
