"""End to end on a real multi-process Dask cluster: images in, one parquet row per image out."""
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pipeline
from pipeline.config import SAMPLE_DIR

pytestmark = pytest.mark.slow


def run(input, output, cluster, **options):
    settings = pipeline.settings(input=str(input), output=str(output), cluster=cluster, weights="random", **options)
    return pipeline.run(settings, progress=False, say=lambda message: None)


def read_rows(path, **options) -> pd.DataFrame:
    return pd.read_parquet(path, storage_options=options or None).sort_values("path", ignore_index=True)


def test_a_local_folder_gives_one_row_per_image_and_one_error_per_bad_file(dask_cluster, sample_copy, tmp_path, caplog):
    (sample_copy / "Training" / "Apple Red 1" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (sample_copy / "Training" / "notes.txt").write_text("not an image")
    with open(sample_copy / "Training" / "Apple Red 2" / "huge.jpg", "wb") as huge:
        huge.truncate(2 * 2**20 + 1)  # over the max-image-bytes of this run (2 MiB): not read
    eps = sample_copy / "Training" / "Apple Red 3" / "postscript.jpg"
    Image.new("RGB", (50, 40)).save(eps, "EPS")  # named .jpg: never parsed as EPS
    manifest = run(sample_copy, tmp_path / "out", dask_cluster, n_components=0.95, max_image_bytes=2 * 2**20)

    out = tmp_path / "out"
    schema = pq.read_schema(next((out / "images.parquet").glob("*.parquet")))
    assert schema.names == ["path", "label", "split", "identity", "features", "pca"]
    assert schema.field("features").type == pa.list_(pa.float32()) == schema.field("pca").type
    rows = read_rows(out / "images.parquet")
    errors = pd.read_parquet(out / "errors.parquet")
    assert len(rows) == 129 and rows.label.nunique() == 13
    assert "Apple Red Yellow 2" in set(rows.label) and set(rows.split) == {"Training"}
    broken = sample_copy / "Training" / "Apple Red 1" / "broken.jpg"
    assert errors.to_dict("records")[0] | {"message": ""} == {
        "path": "Training/Apple Red 1/broken.jpg", "identity": f"{broken.stat().st_size}@{broken.stat().st_mtime}",
        "stage": "decode", "error": "UnidentifiedImageError", "message": "",
    }
    assert errors[["path", "stage", "error"]].values.tolist()[1:] == [
        ["Training/Apple Red 2/huge.jpg", "read", "FileTooLarge"],
        ["Training/Apple Red 3/postscript.jpg", "decode", "UnidentifiedImageError"],
    ]
    assert errors.message[2].endswith("(formats read: JPEG, PNG, GIF, BMP, WEBP, TIFF)")
    assert manifest["counts"] == {
        "listed": 132, "written": 129, "failed": 3, "skipped_non_images": 1, "partitions": 1, "partitions_resumed": 0,
        "partitions_redone": 0,
    }
    assert rows.features.map(len).eq(1280).all()
    k = manifest["pca"]["n_components"]
    assert rows.pca.map(len).eq(k).all() and manifest["pca"]["variance_kept"] >= 0.95
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest, default=str))
    assert manifest["weights"] == {"requested": "random", "used": "random", "warning": None, "finetuned": None}
    assert not (out / "_staging").exists()
    assert "workers must see that path too" in caplog.text  # a local path, a cluster given by address


def test_the_pca_column_is_the_projection_on_the_saved_components(dask_cluster, tmp_path):
    run(SAMPLE_DIR, tmp_path, dask_cluster, n_components=10, images_per_partition=50)
    rows = read_rows(tmp_path / "images.parquet")
    saved = np.load(tmp_path / "pca.npz")
    features, projected = np.stack(rows.features), np.stack(rows.pca)
    kept = saved["components"][: saved["n_components"]]
    assert saved["n_components"] == 10 and saved["components"].shape == (129, 1280)  # every axis fitted
    np.testing.assert_allclose(projected, (features - saved["mean"]) @ kept.T, rtol=1e-4, atol=1e-3)
    assert len(list((tmp_path / "images.parquet").glob("*.parquet"))) == 3  # 129 images, 50 a partition


def test_s3_gives_the_same_rows_as_a_local_folder_and_no_credentials_are_written(dask_cluster, s3, s3_endpoint, aws_env, tmp_path):
    options = {"endpoint_url": s3_endpoint}
    remote = run("s3://fruits/fruits-360", "s3://fruits/out", dask_cluster, storage_options=options)
    local = run(SAMPLE_DIR, tmp_path, dask_cluster)

    from_s3 = read_rows("s3://fruits/out/images.parquet", client_kwargs={"endpoint_url": s3_endpoint})
    from_folder = read_rows(tmp_path / "images.parquet")
    pd.testing.assert_frame_equal(from_s3[["path", "label", "split"]], from_folder[["path", "label", "split"]])
    np.testing.assert_allclose(np.stack(from_s3.features), np.stack(from_folder.features), rtol=1e-5, atol=1e-6)
    assert remote["counts"] == local["counts"] and remote["pca"]["n_components"] == local["pca"]["n_components"]
    written = "".join(s3.cat_file(f"fruits/out/{name}").decode("latin-1") for name in ("manifest.json", "errors.parquet"))
    assert not any(secret in written for secret in aws_env)
