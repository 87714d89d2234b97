"""`python -m pipeline report OUTPUT`: pictures of a finished run, from its output alone, local or on S3."""
import base64
import os
import re
import shutil
import subprocess
import sys

import fsspec
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_evaluate import fake_output, three_fruits

import pipeline
from pipeline import source
from pipeline.reading import report
from pipeline.config import SAMPLE_DIR

PICTURE_SIZES = {  # pixels: the figure's inches × report.DPI
    "explained-variance.png": (800, 450),
    "pca-scatter.png": (800, 600),
    "timings.png": (900, 400),
    "counts.png": (900, 350),
}


def pipeline_report(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", "report", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def finished_run(dask_cluster, tmp_path_factory):
    """The output of a real run on the sample plus one broken image, which lands in the errors table."""
    images = tmp_path_factory.mktemp("images")
    shutil.copytree(SAMPLE_DIR / "Training", images / "Training")
    (images / "Training" / "Apple Red 1" / "broken <1>.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    output = tmp_path_factory.mktemp("run") / "out"
    settings = pipeline.settings(input=str(images), output=str(output), cluster=dask_cluster, weights="random", n_components=0.9)
    pipeline.run(settings, progress=False, say=lambda message: None)
    return output


def check_pictures(folder):
    """Each picture is a valid PNG of its expected size with something drawn on it."""
    for name, size in PICTURE_SIZES.items():
        with Image.open(folder / name) as picture:
            assert (picture.format, picture.size) == ("PNG", size), name
            picture.verify()
        with Image.open(folder / name) as picture:
            assert len(picture.convert("RGB").getcolors(maxcolors=1 << 20)) > 20, f"{name} looks blank"


@pytest.mark.slow
def test_the_report_is_pngs_and_one_self_contained_page_next_to_the_output(finished_run):
    result = pipeline_report(str(finished_run))
    assert result.returncode == 0, result.stderr
    folder = finished_run / "report"
    assert result.stdout.split("\n")[:-1] == [str(folder / "report.html"), *(str(folder / name) for name in PICTURE_SIZES)]
    check_pictures(folder)

    page = (folder / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert [base64.b64decode(s.split(",", 1)[1]) for s in sources] == [(folder / n).read_bytes() for n in PICTURE_SIZES]
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch: the page works alone
    assert "130 listed, 129 written, 1 failed" in page and "components keep" in page
    assert "broken &lt;1&gt;.jpg" in page and "broken <1>" not in page  # paths are escaped, never markup


@pytest.mark.slow
def test_the_page_renders_in_headless_chromium(finished_run, tmp_path):
    browser = chromium()
    report.write(report.load(str(finished_run)), str(tmp_path))
    shot = tmp_path / "screenshot.png"
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1000,2600", f"--screenshot={shot}", (tmp_path / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0 and shot.exists(), result.stderr
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2600, 1000)
    assert (pixels < 200).any(axis=2).mean() > 0.02  # text and drawings, not a blank page
    colourful = (pixels.max(axis=2) - pixels.min(axis=2) > 80).sum()
    assert colourful > 2000  # only the embedded pictures are in colour: the browser decoded them


@pytest.mark.slow
def test_an_s3_output_gets_its_report_on_s3_or_in_a_local_folder(finished_run, s3, s3_endpoint, tmp_path):
    s3.put(str(finished_run) + "/", "fruits/out/", recursive=True)
    s3.rm("fruits/out/report", recursive=True)  # the local run's report: this one must come from S3

    result = pipeline_report("s3://fruits/out", "--endpoint-url", s3_endpoint)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "s3://fruits/out/report/report.html"
    s3.get("fruits/out/report/", str(tmp_path / "from-s3") + "/", recursive=True)
    check_pictures(tmp_path / "from-s3")

    result = pipeline_report("s3://fruits/out", "--endpoint-url", s3_endpoint, "--to", str(tmp_path / "local"))
    assert result.returncode == 0, result.stderr
    check_pictures(tmp_path / "local")
    assert (tmp_path / "local" / "report.html").read_text().count("data:image/png;base64,") == 4


def test_a_folder_without_a_finished_run_is_a_one_line_usage_error(tmp_path):
    result = pipeline_report(str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: no manifest.json in {tmp_path}: give the --output of a finished `pipeline run`"


def test_a_large_output_s_scatter_is_a_seeded_sample_of_max_points_and_still_counts_every_image(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "MAX_POINTS", 50)
    labels, features = three_fruits(40)
    output = fake_output(tmp_path / "out", labels, [None] * 120, features, kept=4, parts=4)

    results = report.load(str(output))
    assert (len(results.labels), len(results.coords), results.n_images) == (50, 50, 120)
    again = report.load(str(output))
    assert results.labels.tolist() == again.labels.tolist() and np.array_equal(results.coords, again.coords)
    figure = report.figures(results)["pca-scatter.png"]
    assert figure.axes[0].get_title() == "50 of 120 images, 3 labels"


def test_a_sample_takes_from_each_part_a_share_proportional_to_its_rows(tmp_path):
    labels, features = three_fruits(40)
    fake_output(tmp_path / "out", labels, [None] * 120, features, kept=4, parts=4)  # parts of 30 rows
    fs = fsspec.filesystem("file")
    parts = sorted(fs.glob(f"{tmp_path}/out/images.parquet/*.parquet"))

    sample = report.Sample.of(fs, parts, 50)
    shares = [len(rows) for rows in sample.rows]
    assert sorted(shares) == [12, 12, 13, 13] and sample.size == 50 and sample.n_images == 120  # 12.5 each
    assert all(np.all(np.diff(rows) > 0) and rows.max() < 30 for rows in sample.rows)  # distinct rows of the part
    assert [table.num_rows for table in sample.tables(fs, ["label"])] == shares
    assert [len(rows) for rows in report.Sample.of(fs, parts, 120).rows] == [30] * 4  # enough room: every row
    assert [len(rows) for rows in report.Sample.of(fs, parts, None).rows] == [30] * 4
    many_parts = report.Sample.of(fs, parts * 25, 50)  # 100 parts, half a row each: 50 parts give one
    assert sorted({len(rows) for rows in many_parts.rows}) == [0, 1] and many_parts.size == 50
    assert 10 < sum(len(rows) for rows in many_parts.rows[:50]) < 40  # drawn across the parts, not the first 50
    nothing_from_it = report.Sample([f"{tmp_path}/no such part.parquet"], [np.array([], int)], 30)
    assert list(nothing_from_it.tables(fs, ["label"])) == []  # a part with no row sampled is not read


def test_the_variance_curve_marks_the_chosen_k():
    figure = report.variance_figure(np.array([0.5, 0.3, 0.1, 0.06, 0.04]), 3)
    ax = figure.axes[0]
    marks = [line for line in ax.lines if list(line.get_xdata()) == [3]]
    assert [list(line.get_ydata()) for line in marks] == [[pytest.approx(0.9)]]
    assert "k = 3 components keep 90.0%" in [text.get_text() for text in ax.texts]


def test_the_scatter_names_each_label_and_draws_one_component_as_a_strip():
    labels = ["Apple Red 1", "Apple Golden 1", "Apple Red 1"]
    figure = report.scatter_figure(np.array([[0.0], [1.0], [2.0]]), labels)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Apple Golden 1", "Apple Red 1"]
    assert ax.get_ylabel() == "(one component kept)" and ax.get_title() == "3 images, 2 labels"


def test_counts_show_failures_by_stage_and_error():
    errors = pd.DataFrame({"path": ["a.jpg", "b.jpg", "c.jpg"], "stage": ["decode", "decode", "read"],
                           "error": ["UnidentifiedImageError"] * 2 + ["FileNotFoundError"], "message": [""] * 3})
    figure = report.counts_figure({"listed": 10, "written": 7, "failed": 3, "skipped_non_images": 0}, errors)
    kinds = [label.get_text() for label in figure.axes[1].get_yticklabels()]
    assert kinds == ["decode: UnidentifiedImageError", "read: FileNotFoundError"]


def test_nearest_neighbours_in_pca_space_leave_out_the_image_itself():
    points = np.array([[0.0, 0.0], [5.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    order, distances = report.nearest(points, 0, 2)
    assert order.tolist() == [2, 3] and distances.tolist() == [1.0, 2.0]


def chromium() -> str:
    """Headless Chromium (Debian's `chromium`); CI installs it (.ci/run), elsewhere the test says how."""
    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is missing: .ci/run installs Debian's `chromium` with apt-get")
    pytest.skip("needs headless Chromium: apt-get install chromium (CI installs it, see .ci/run)")


def test_thumbnails_are_the_images_decoded_as_the_pipeline_decodes_them():
    fs, root = source.open_url(str(SAMPLE_DIR), {})
    [thumbnail] = report.thumbnails(fs, root, ["Training/Apple Braeburn/39_100.jpg"], size=50)
    assert thumbnail.shape == (50, 50, 3) and thumbnail.dtype == np.uint8
    with pytest.raises(FileNotFoundError):
        report.thumbnails(fs, root, ["Training/no such image.jpg"])
