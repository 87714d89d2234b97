"""`python -m pipeline run` as a user runs it, in a subprocess."""
import argparse
import json
import os
import re
import subprocess
import sys
import threading
import urllib.request

import pytest

from pipeline.cli import build_parser, summary

CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens there: downloads fail at once, online or not
ANY_PORT = {"DASK_PIPELINE__LOCAL_CLUSTER__DASHBOARD_ADDRESS": "127.0.0.1:0"}  # tests running at once never collide


def pipeline(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def offline(tmp_path) -> dict:
    """An environment where ImageNet weights cannot be downloaded and none are cached."""
    return {"KERAS_HOME": str(tmp_path / "keras"), "HTTPS_PROXY": CLOSED_PORT, "https_proxy": CLOSED_PORT}


def commands(parser: argparse.ArgumentParser, names=()):
    """(command words, its parser) for every command and subcommand the parser has."""
    for action in parser._actions:  # argparse has no public way to list its subparsers
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                yield (*names, name), command
                yield from commands(command, (*names, name))


def test_help_documents_every_option_of_every_command():
    found = dict(commands(build_parser()))
    assert {" ".join(words) for words in found} >= {"run", "update", "report", "evaluate", "recognize", "cluster plan", "cluster cleanup"}
    for words, command in found.items():
        shown = command.format_help()  # what `python -m pipeline WORDS --help` prints
        for action in command._actions:
            for option in action.option_strings:
                assert option in shown, f"{' '.join(words)} --help: {option}"
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{' '.join(words)}: {action.option_strings or action.dest} has no help"
    run_options = {option for action in found[("run",)]._actions for option in action.option_strings}
    assert {"--quiet", "--resume", "--overwrite", "--backend", "--gpu", "--seed"} <= run_options
    assert "--pca-batch-size" not in run_options  # a run's PCA needs no batches; update's does
    assert "--pca-batch-size" in {option for action in found[("update",)]._actions for option in action.option_strings}
    shown = pipeline("run", "--help")
    assert shown.returncode == 0 and all(option in shown.stdout for option in run_options)


@pytest.mark.slow
def test_a_run_shows_the_dashboard_first_a_bar_per_stage_and_a_summary_last(sample_copy, tmp_path):
    report = tmp_path / "report.html"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "--input", str(sample_copy), "--output", str(tmp_path / "out"),
         "--cluster", "local", "--n-components", "0.9", "--report", str(report)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **offline(tmp_path), **ANY_PORT},
    )
    stderr = Lines(process.stderr)
    link = stderr.wait_for("dashboard: ").split(": ", 1)[1].strip()
    with urllib.request.urlopen(link, timeout=60) as page:  # the dashboard's status page, during the run
        assert page.status == 200 and "<title>Dask Diagnostic UI</title>" in page.read().decode()
    with urllib.request.urlopen(link.replace("/status", "/json/counts.json"), timeout=60) as counts:
        live = json.load(counts)
        assert live["workers"] >= 1 and live["clients"] >= 1  # the scheduler running the job
    assert process.poll() is None, "the run ended before the dashboard was fetched"
    summary = process.stdout.read()
    assert process.wait(timeout=300) == 0, stderr.text()

    log = stderr.text()
    warnings = [line for line in log.splitlines() if "WARNING" in line or line.startswith(("I0000", "E0000", "W0000"))]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: no ImageNet weights"), warnings  # once, and nothing else
    assert all(len(line.replace(str(tmp_path), "…")) <= 100 for line in log.splitlines() if "%|" not in line), log
    assert log.index("dashboard: http://") < log.index("featurize")
    for stage in ("featurize", "pca fit", "write"):  # images done / total and images/s, per stage
        assert re.search(rf"^{stage} *: 100%\|.*\| 129/129 \[.*img/s\]$", log, re.MULTILINE), log
    for line in ("images listed  129", "images failed  0", "images/s", "components keep",
                 "weights        random (seed 0), not ImageNet's", f"dashboard      {link}"):
        assert line in summary
    assert "WARNING" not in summary
    assert report.read_text().lstrip().lower().startswith("<!doctype html")
    assert "Task Stream" in report.read_text()  # the Dask performance report, with the run's tasks
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["weights"]["used"] == "random" and "no ImageNet weights" in manifest["weights"]["warning"]


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--json", "--quiet"])
def test_scripts_get_warnings_on_stderr_and_with_json_the_manifest_on_stdout(flag, sample_copy, tmp_path):
    result = pipeline("run", "--input", str(sample_copy), "--output", str(tmp_path / "out"), flag,
                      env=offline(tmp_path) | ANY_PORT)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # the one real warning, and nothing else: no messages, bars, C++ logs
    [warning] = lines
    assert warning.startswith("WARNING: no ImageNet weights (") and warning.endswith("seeded random weights (seed 0) instead")
    if flag == "--json":
        assert json.loads(result.stdout) == json.loads((tmp_path / "out" / "manifest.json").read_text())
    else:
        assert result.stdout == ""


class Lines:
    """A child's stream read line by line in the background (tqdm's carriage returns end lines too)."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.added = threading.Condition()
        threading.Thread(target=self.read, args=(stream,), daemon=True).start()

    def read(self, stream):
        for line in stream:
            with self.added:
                self.lines.append(line)
                self.added.notify_all()
        with self.added:
            self.lines.append(None)
            self.added.notify_all()

    def wait_for(self, prefix: str, timeout: float = 120) -> str:
        """The first line that starts with `prefix`, waiting for it; fails if the stream ends first."""
        with self.added:
            found = lambda: next((l for l in self.lines if l is None or l.startswith(prefix)), False)
            line = self.added.wait_for(found, timeout)
        assert line, f"no line starting with {prefix!r} in:\n{self.text()}"
        return line

    def text(self) -> str:
        return "".join(line for line in self.lines if line)


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
        (["--cluster", "tcp://127.0.0.1:9", "--input", "/no/such/folder"], "no Dask scheduler answers at tcp://127.0.0.1:9"),
        (["--backend", "mxnet"], "invalid choice: 'mxnet'"),
        (["--batch-size", "big"], "`batch-size` must be a positive integer or auto"),
        (["--batch-size", "-4"], "batch-size"),
        (["--report", "{file}/run.html"], "cannot write the report"),
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


def test_checking_that_the_report_can_be_written_leaves_an_earlier_report_alone(tmp_path):
    from pipeline.making import job

    (tmp_path / "run.html").write_text("the earlier run's report")
    job.check_report_writable(str(tmp_path / "run.html"), {})
    assert [p.name for p in tmp_path.iterdir()] == ["run.html"]
    assert (tmp_path / "run.html").read_text() == "the earlier run's report"


def test_the_summary_of_an_updated_output_says_what_its_last_update_did():
    manifest = {
        "counts": {"listed": 140, "written": 139, "failed": 1, "skipped_non_images": 0},
        "pca": {"n_components": 97, "variance_kept": 0.951}, "images_per_s": {"list_to_output": 9.0, "featurize": 10.0},
        "weights": {"used": "random", "warning": None}, "settings": {"seed": 0}, "output": "out",
        "dashboard": "http://127.0.0.1:8787/status",
        "history": [{"command": "run"}, {"command": "update", "added": 10, "replaced": 1, "removed": 2, "featurized": 11}],
    }
    lines = summary(manifest).splitlines()
    assert "last update    10 new, 1 replaced, 2 removed: 11 featurized, 139 rows in all" in lines
    assert "images/s       10.0 while featurizing the 11 images of the last update, 9.0 from its listing to output" in lines
    assert "last update" not in summary(manifest | {"history": manifest["history"][:1]})
