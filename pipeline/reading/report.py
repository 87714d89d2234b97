"""Report: pictures of a run's results and one self-contained HTML page, from the output alone.

`python -m pipeline report OUTPUT` reads manifest.json, pca.npz, errors.parquet and, of
images.parquet, only the labels and the first two PCA coordinates of the rows it draws (every row,
or a seeded MAX_POINTS of them chosen part by part: its memory does not grow with the output),
through fsspec (an s3:// output works as a folder does). It writes the pictures as PNG files and
report.html, the same pictures embedded in it, to OUTPUT/report/. The walkthrough notebook draws
with the same functions.
Figures are plain matplotlib `Figure`s rendered by Agg: no pyplot state, no display needed.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Iterator

import dask.config
import matplotlib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from .. import images, source
from ..making import reduce, sink
from ..output import Output

PAGE = "report.html"
DPI = 100  # pixels per inch of the PNG files: a figure of 8 × 4.5 inches is 800 × 450 pixels
MAX_POINTS = 20_000  # points drawn in the scatter; larger outputs are drawn from a seeded sample
SAMPLE_SEED = 0  # of the rows a Sample reads (the scatter's, evaluate's)
MAX_LEGEND = 20  # labels named in the scatter's legend; with more, colours repeat and go unnamed
MAX_ERRORS = 100  # rows of the errors table shown on the page (all are in errors.parquet)
PICTURES = {  # file name → title, in page order
    "explained-variance.png": "Explained variance",
    "pca-scatter.png": "Images on the first two principal components",
    "timings.png": "Where the time went",
    "counts.png": "Images and errors",
}
COUNTS = {"listed": "listed", "written": "written", "failed": "failed", "skipped_non_images": "not images"}


@dataclasses.dataclass(frozen=True)
class Results:
    """What the report shows of one run's output."""

    url: str  # the output, as an absolute path or a URL
    manifest: dict
    pca: reduce.Pca
    labels: np.ndarray  # the label of each image drawn (all, or a Sample of MAX_POINTS of them)
    coords: np.ndarray  # their first two PCA coordinates (one column if one component was kept)
    n_images: int  # rows in images.parquet, all of them
    errors: pd.DataFrame


def load(output: str, storage_options: dict | None = None) -> Results:
    """Read what the report needs from a finished run's output folder or URL: the rows drawn only, not all rows."""
    out = Output.at(output, storage_options or {})
    fs, root, url = out.fs, out.path, out.url
    manifest = out.manifest()
    pca = reduce.Pca.load(fs, f"{root}/{sink.PCA}")
    sample = Sample.of(fs, sorted(fs.glob(f"{root}/{sink.IMAGES}/*.parquet")), MAX_POINTS)
    labels, coords = [], []
    for table in sample.tables(fs, ["label", "pca"]):
        labels.append(table["label"].to_numpy(zero_copy_only=False))
        coords.append(sink.matrix(table["pca"], pca.n_components)[:, :2])
    labels = np.concatenate(labels) if labels else np.array([], dtype=object)
    coords = np.concatenate(coords) if coords else np.zeros((0, min(pca.n_components, 2)), np.float32)
    errors = sink.read_parquet(fs, f"{root}/{sink.ERRORS}").to_pandas()
    return Results(url, manifest, pca, labels, coords, sample.n_images, errors)


@dataclasses.dataclass(frozen=True)
class Sample:
    """Which rows of images.parquet's parts to read: all, or n of them spread over the parts (report, evaluate).

    Each part gives a share of n proportional to its rows, rounded so that there are exactly n in all
    (largest remainders; equal ones, as when n is under one per part, drawn at random, not the first
    parts), and chosen in the part at random: seeded (SAMPLE_SEED, and the part's number), so the same
    output gives the same sample. Only a part's sampled rows leave it, one part at a time.
    """

    parts: list[str]
    rows: list[np.ndarray]  # row numbers to read, one sorted array per part
    n_images: int  # rows in all the parts

    @classmethod
    def of(cls, fs, parts: list[str], n: int | None) -> "Sample":
        """The sample of n rows of these parts (None, or n at least their rows: every row), counted from their footers."""
        counts = np.array(part_rows(fs, parts), dtype=np.int64)
        total = int(counts.sum())
        if n is None or n >= total:
            return cls(parts, [np.arange(count) for count in counts], total)
        quotas = counts * n // total
        shuffled = np.random.default_rng(SAMPLE_SEED).permutation(len(counts))
        rounded_up = shuffled[np.argsort(-(counts[shuffled] * n % total), kind="stable")][: n - quotas.sum()]
        quotas[rounded_up] += 1
        rows = [np.sort(np.random.default_rng([SAMPLE_SEED, i]).choice(count, quota, replace=False))
                for i, (count, quota) in enumerate(zip(counts, quotas))]
        return cls(parts, rows, total)

    @property
    def size(self) -> int:
        """Rows in the sample."""
        return sum(len(rows) for rows in self.rows)

    def tables(self, fs, columns: list[str]) -> Iterator[pa.Table]:
        """Each part's sampled rows, these columns only, one part at a time (a part with none is not read)."""
        for part, rows in zip(self.parts, self.rows):
            if len(rows):
                yield sink.read_parquet(fs, part, columns).take(rows)


def part_rows(fs, parts: list[str]) -> list[int]:
    """Rows of each part, from its parquet footer alone (no column read); 16 at a time, for an object store."""

    def rows(part: str) -> int:
        with fs.open(part, "rb") as f:
            return pq.read_metadata(f).num_rows

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(rows, parts))


def write(results: Results, folder: str | None = None, storage_options: dict | None = None) -> list[str]:
    """Write the PNG files and report.html to `folder` (default OUTPUT/report/); returns their paths, page first."""
    fs, path = source.open_url(folder or f"{results.url}/{sink.REPORT}", storage_options or {})
    sink.make_folder(fs, path)
    pngs = {name: png(figure) for name, figure in figures(results).items()}
    for name, data in pngs.items():
        sink.write_bytes(fs, f"{path}/{name}", data)
    sink.write_bytes(fs, f"{path}/{PAGE}", page(results, pngs).encode())
    return [source.full_url(fs, f"{path}/{name}") for name in (PAGE, *pngs)]


def figures(results: Results) -> dict[str, Figure]:
    """The report's pictures by file name (see PICTURES)."""
    m, pca = results.manifest, results.pca
    return {
        "explained-variance.png": variance_figure(pca.explained_variance_ratio, pca.n_components),
        "pca-scatter.png": scatter_figure(results.coords, results.labels, results.n_images),
        "timings.png": timings_figure(m.get("timings_s", {}), m.get("worker_seconds", {})),
        "counts.png": counts_figure(m.get("counts", {}), results.errors),
    }


def png(figure: Figure) -> bytes:
    """The figure as PNG bytes, at its own size (figsize × DPI pixels)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


# --- the pictures ---------------------------------------------------------------------------------


def variance_figure(ratios: np.ndarray, k: int) -> Figure:
    """Cumulative explained variance against the number of components, with the k kept marked."""
    cumulative = np.cumsum(ratios)
    kept = float(cumulative[k - 1])
    figure = Figure(figsize=(8, 4.5), dpi=DPI, layout="constrained")
    ax = figure.add_subplot()
    ax.plot(np.arange(1, len(ratios) + 1), cumulative, color="C0", linewidth=2)
    ax.axvline(k, color="C3", linestyle="--", linewidth=1)
    ax.axhline(kept, color="C3", linestyle=":", linewidth=1)
    ax.plot([k], [kept], "o", color="C3")
    ax.annotate(f"k = {k} components keep {kept:.1%}", (k, kept), xytext=(8, -18), textcoords="offset points", color="C3")
    ax.set(xlabel="principal components", ylabel="cumulative explained variance", xlim=(0, len(ratios) + 1), ylim=(0, 1.02),
           title=f"{len(ratios)} components fitted, {k} kept")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    return figure


def scatter_figure(coords: np.ndarray, labels, n_images: int | None = None) -> Figure:
    """Each image on the first two principal components, one colour per label."""
    labels = np.asarray(labels, dtype=object)
    names = sorted(set(labels))
    x = coords[:, 0]
    y = coords[:, 1] if coords.shape[1] > 1 else np.zeros(len(coords))
    colours = matplotlib.colormaps["tab20"]
    figure = Figure(figsize=(8, 6), dpi=DPI, layout="constrained")
    ax = figure.add_subplot()
    for i, name in enumerate(names):
        mine = labels == name
        ax.scatter(x[mine], y[mine], s=16, color=colours(i % colours.N), label=name, alpha=0.85, linewidths=0)
    if len(names) <= MAX_LEGEND:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    shown = f"{len(coords):,} of {n_images:,} images" if n_images and n_images > len(coords) else f"{len(coords):,} images"
    ax.set(xlabel="PC 1", ylabel="PC 2" if coords.shape[1] > 1 else "(one component kept)",
           title=f"{shown}, {len(names)} labels")
    ax.grid(alpha=0.3)
    return figure


def timings_figure(timings_s: dict, worker_seconds: dict) -> Figure:
    """Wall seconds of each stage of the run, and the workers' seconds in each step of featurizing."""
    figure = Figure(figsize=(9, 4), dpi=DPI, layout="constrained")
    wall, work = figure.subplots(1, 2)
    bars(wall, timings_s, f"wall seconds per stage ({sum(timings_s.values()):.1f} s in all)", "{:.1f} s")
    bars(work, worker_seconds, "worker seconds per step, all workers", "{:.1f} s")
    return figure


def counts_figure(counts: dict, errors: pd.DataFrame) -> Figure:
    """How many images were listed, written and failed, and the failures by stage and error."""
    figure = Figure(figsize=(9, 3.5), dpi=DPI, layout="constrained")
    totals, failures = figure.subplots(1, 2)
    bars(totals, {label: counts[key] for key, label in COUNTS.items() if key in counts}, "files", "{:,.0f}",
         colours=["C0", "C2", "C3", "C7"])
    by_kind = errors.groupby(["stage", "error"]).size() if len(errors) else pd.Series(dtype=int)
    bars(failures, {f"{stage}: {error}": n for (stage, error), n in by_kind.items()}, "failed images by stage and error",
         "{:,.0f}", colours=["C3"], empty="no image failed")
    return figure


def bars(ax, values: dict, title: str, fmt: str, colours=None, empty: str = "nothing recorded") -> None:
    """Horizontal bars, one per entry in the dict's order, each labelled with its value."""
    ax.set_title(title)
    if not values:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_axis_off()
        return
    names, numbers = list(values), [float(v) for v in values.values()]
    colours = [(colours or ["C0"])[i % len(colours or ["C0"])] for i in range(len(names))]
    drawn = ax.barh(names, numbers, color=colours)
    ax.bar_label(drawn, labels=[fmt.format(n) for n in numbers], padding=3)
    ax.invert_yaxis()
    ax.set_xlim(0, max(max(numbers), 1e-9) * 1.25)
    ax.spines[["top", "right"]].set_visible(False)


def image_grid_figure(rows: list[list[np.ndarray]], names: list[str], captions: list[list[str]] | None = None, cell: float = 1.2) -> Figure:
    """Rows of images, each named on its left and each image captioned: samples per label, neighbours."""
    n_columns = max(len(row) for row in rows)
    figure = Figure(figsize=(2.2 + cell * n_columns, (cell + (0.25 if captions else 0)) * len(rows)), dpi=DPI, layout="constrained")
    axes = figure.subplots(len(rows), n_columns, squeeze=False)
    for r, row in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
            if c < len(row):
                ax.imshow(row[c])
                if captions:
                    ax.set_title(captions[r][c], fontsize=7)
        axes[r][0].set_ylabel(names[r], rotation=0, ha="right", va="center", fontsize=9)
    return figure


# --- for the notebook: images and neighbours -------------------------------------------------------


def thumbnails(fs, root: str, paths, size: int = 100) -> list[np.ndarray]:
    """The images at `paths` (relative to `root`), decoded to RGB no larger than size × size."""
    blobs = source.read_many(fs, [f"{root}/{path}" for path in paths])
    for blob in blobs:
        if isinstance(blob, BaseException):
            raise blob
    max_pixels = dask.config.get("pipeline.max-image-pixels")
    return [images.decode(blob, size, max_pixels) for blob in blobs]


def nearest(points: np.ndarray, index: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of the n points nearest to points[index] (Euclidean), itself excluded, and their distances."""
    distances = np.linalg.norm(points - points[index], axis=1)
    order = np.argsort(distances, kind="stable")
    order = order[order != index][:n]
    return order, distances[order]


# --- the page -------------------------------------------------------------------------------------


def page(results: Results, pngs: dict[str, bytes]) -> str:
    """One HTML page with the summary, the pictures embedded as base64 and the errors: no other file needed."""
    summary_table = table([[html.escape(k), html.escape(str(v))] for k, v in summary(results.manifest).items()], None)
    body = [summary_table, pictures_html(pngs, PICTURES), "<h2>Errors</h2>", errors_html(results.errors)]
    return html_page(f"Pipeline report: {results.url}", "\n".join(body))


def pictures_html(pngs: dict[str, bytes], titles: dict[str, str]) -> str:
    """Each PNG under its title, embedded in the page as base64."""
    return "\n".join(
        f'<h2>{html.escape(titles[name])}</h2>\n<img src="data:image/png;base64,{base64.b64encode(data).decode()}" '
        f'alt="{html.escape(titles[name])}">'
        for name, data in pngs.items()
    )


def html_page(title: str, body: str) -> str:
    """A whole HTML page around `body` (already escaped), with the reports' style."""
    return TEMPLATE.format(title=html.escape(title), body=body)


def summary(m: dict) -> dict[str, str]:
    """The run in a few lines, from its manifest."""
    counts, pca, speed = m.get("counts", {}), m.get("pca", {}), m.get("images_per_s", {})
    model, weights = m.get("model", {}), m.get("weights", {})
    return {
        "input": m.get("input", "?"),
        "output": m.get("output", "?"),
        "ran": f"{when(m.get('started'))} to {when(m.get('finished'))}",
        "model": f"{model.get('name', '?')}, {model.get('n_features', '?')} features, {model.get('image_size', '?')} px",
        "weights": str(weights.get("used", "?")) + (f" (WARNING: {weights['warning']})" if weights.get("warning") else ""),
        "images": ", ".join(f"{counts[key]:,} {label}" for key, label in COUNTS.items() if key in counts),
        "PCA": f"{pca.get('n_components', '?')} components keep {pca.get('variance_kept', 0):.1%} of the variance "
               f"({pca.get('n_samples', '?')} images fitted)",
        "images/s": f"{speed.get('list_to_output', 0):.1f} from listing to output, {speed.get('featurize', 0):.1f} while featurizing",
    }


def when(timestamp: str | None) -> str:
    """An ISO timestamp of the manifest to the second, as a person reads it."""
    return datetime.fromisoformat(timestamp).strftime("%Y-%m-%d %H:%M:%S %Z").strip() if timestamp else "?"


def errors_html(errors: pd.DataFrame) -> str:
    """The first MAX_ERRORS failed inputs as a table, or a line saying none failed."""
    if not len(errors):
        return "<p>No image failed.</p>"
    shown = errors.head(MAX_ERRORS)
    rows = [[html.escape(str(row[c])) for c in sink.ERROR_COLUMNS] for row in shown.to_dict("records")]
    more = f"<p>{len(errors) - len(shown):,} more in {sink.ERRORS}.</p>" if len(errors) > len(shown) else ""
    return table(rows, sink.ERROR_COLUMNS) + more


def table(rows: list[list[str]], header: list[str] | None) -> str:
    """An HTML table of already escaped cells."""
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 960px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; display: block; margin: 0.5em 0 1.5em; }}
</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""
