"""`python -m pipeline run` as a user runs it, in a subprocess."""
import json
import os
import subprocess
import sys

import pytest

CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens there: downloads fail at once, online or not


def pipeline(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def offline(tmp_path) -> dict:
    """An environment where ImageNet weights cannot be downloaded and none are cached."""
    return {"KERAS_HOME": str(tmp_path / "keras"), "HTTPS_PROXY": CLOSED_PORT, "https_proxy": CLOSED_PORT}


def test_help_documents_every_option():
    result = pipeline("run", "--help")
    assert result.returncode == 0
    for option in ("--input", "--output", "--cluster", "--model", "--weights", "--n-components", "--image-size",
                   "--batch-size", "--images-per-partition", "--endpoint-url", "--anon", "--report", "--json"):
        assert option in result.stdout


@pytest.mark.slow
def test_a_run_prints_the_dashboard_first_and_a_summary_last(sample_copy, tmp_path):
    report = tmp_path / "report.html"
    result = pipeline(
        "run", "--input", str(sample_copy), "--output", str(tmp_path / "out"), "--cluster", "local",
        "--n-components", "0.9", "--report", str(report), env=offline(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING: ImageNet weights for mobilenet_v2 could not be downloaded" in result.stderr
    assert result.stderr.index("dashboard: http://") < result.stderr.index("featurize")
    summary = result.stdout
    for line in ("images read    129", "images failed  0", "images/s", "components keep", "WARNING", "dashboard      http://"):
        assert line in summary
    assert report.read_text().lstrip().lower().startswith("<!doctype html")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["weights"]["used"] == "random" and "could not be downloaded" in manifest["weights"]["warning"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "/no/such/folder"], "does not exist"),
        (["--input", "{empty}"], "no images under"),
        (["--model", "alexnet"], "invalid choice: 'alexnet'"),
        (["--n-components", "0"], "n-components"),
        (["--n-components", "1.5"], "n-components"),
        (["--n-components", "5000"], "more than the 1280 features"),
        (["--output", "{file}/out"], "cannot write to output"),
        (["--cluster", "yarn"], "unknown cluster 'yarn'"),
        (["--batch-size", "-4"], "batch-size"),
        (["--input", "s3://fruits/x", "--endpoint-url", CLOSED_PORT], "cannot list input s3://fruits/x"),
        (["--output", "s3://fruits/out", "--endpoint-url", CLOSED_PORT], "cannot write to output s3://fruits/out"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_code_2(args, message, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    (tmp_path / "file").write_text("a file, not a folder")
    args = [a.format(empty=tmp_path / "empty", file=tmp_path / "file") for a in args]
    result = pipeline("run", "--output", str(tmp_path / "out"), "--weights", "random", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_strict_imagenet_fails_before_reading_any_image_and_says_how_to_go_offline(tmp_path):
    result = pipeline("run", "--output", str(tmp_path / "out"), "--weights", "imagenet", env=offline(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--weights PATH" in result.stderr and "mobilenet_v2_weights" in result.stderr
    assert not (tmp_path / "out" / "images.parquet").exists()
