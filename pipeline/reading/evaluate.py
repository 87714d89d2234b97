"""Evaluate: how well a run's PCA features tell its labels apart, by a logistic regression on them.

`python -m pipeline evaluate OUTPUT` reads, of a finished run's images.parquet, the labels, the
splits and the PCA coordinates (the features too when k goes beyond the components kept, projected
here with pca.npz). It trains scikit-learn's LogisticRegression on the Training split and scores it
on the Test split, or on a seeded stratified hold-out when the output has no Test split, for the
k kept and a few smaller k. A random hold-out tests on near-copies of training images where they come
in series (Fruits-360's frames of a fruit turning), and says so; `holdout: series` trains instead on
Fruits-360's first series of frames (12_100.jpg) and tests on its others (r_12_100.jpg, r2_12_100.jpg),
where the file names allow it. It writes evaluation.json, two pictures and evaluation.html (the same
pictures embedded) to OUTPUT/evaluation/.

An output of more images than `evaluate.max-images` is evaluated on a seeded sample of that many,
chosen part by part as the parts are read (report.Sample): memory and fit time stay those of the
sample however large the output, and the scores say that a sample was used.

The coordinates are not standardized: they share one scale, and giving every component unit
variance lends the last, noisiest ones the weight of the first (measured on the shipped sample:
accuracy 0.42 with standardized inputs, 0.55 without, k = 97).
"""
from __future__ import annotations

import dataclasses
import html
import json
import re
import time
import warnings

import numpy as np
import pyarrow.compute as pc
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from . import report
from .. import config, source
from ..making import finetune, reduce, sink
from ..config import UsageError
from ..output import Output

PAGE = "evaluation.html"
DOCUMENT = "evaluation.json"
PICTURES = {  # file name → title, in page order
    "accuracy-vs-k.png": "Accuracy against the number of principal components",
    "confusion-matrix.png": "Confusion matrix",
}
K_VALUES = (2, 5, 10, 20, 50)  # tried besides the k kept, up to the components pca.npz holds
TEST_FRACTION = 0.25  # of the images held out for testing when the output has no Test split
SEED = 0  # of that hold-out
HOLDOUTS = ("random", "series")  # without a Test split: a seeded share of each label, or Fruits-360's second series
SERIES = r"(^|/)r\d*_[^/]*$"  # Fruits-360's later series of frames of a fruit: r_12_100.jpg, r2_12_100.jpg beside 12_100.jpg
MAX_ITER = 1000  # of the classifier's solver (lbfgs); it converged in under 60 on the 2,134 apples
MAX_CELL_COUNTS = 30  # labels up to which the confusion matrix writes its counts in the cells
SAMPLE_METHOD = (f"each part of {sink.IMAGES} gives a share proportional to its rows, drawn with seed "
                 f"{report.SAMPLE_SEED}; then split as the whole output would be")


@dataclasses.dataclass(frozen=True)
class Images:
    """What the evaluation reads of a finished run's output."""

    url: str  # the output, as an absolute path or a URL
    manifest: dict
    labels: np.ndarray  # one per image
    splits: np.ndarray  # "Training", "Test" or None, one per image
    series: np.ndarray  # True for the images of Fruits-360's later series (file names r_*, r2_*...), one per image
    vectors: np.ndarray  # n × max(k_values): PCA coordinates, the first `kept` as stored in the output
    kept: int  # components kept by the run
    k_values: list[int]  # increasing, the kept one among them
    n_images: int  # rows in the output: more than len(labels) when a sample was read
    max_images: int | None  # evaluate.max-images when it was read

    @property
    def sampled(self) -> bool:
        return len(self.labels) < self.n_images


@dataclasses.dataclass(frozen=True)
class Split:
    """The rows to train on and to test on, how they were chosen, and what was left out and why."""

    train: np.ndarray
    test: np.ndarray
    method: str
    notes: list[str]


def load(output: str, storage_options: dict | None = None, max_images: int | None = None) -> Images:
    """Read labels, splits and PCA coordinates (projecting features where k > kept) of a finished run.

    At most `max_images` rows (default: the `evaluate.max-images` setting), a report.Sample of them
    above: only the sampled rows of each part are kept, and only theirs are projected.
    """
    out = Output.at(output, storage_options or {})
    fs, root, url = out.fs, out.path, out.url
    manifest = out.manifest()
    pca = reduce.Pca.load(fs, f"{root}/{sink.PCA}")
    kept = pca.n_components
    k_values = sorted({k for k in K_VALUES if k <= len(pca.components)} | {kept})
    columns = ["path", "label", "split", "features" if k_values[-1] > kept else "pca"]
    max_images = config.evaluate_max_images(max_images)
    sample = report.Sample.of(fs, sorted(fs.glob(f"{root}/{sink.IMAGES}/*.parquet")), max_images)
    if not sample.size:
        raise UsageError(f"{url} holds no images to evaluate: every image of its run failed (see {sink.ERRORS})")
    labels, splits, series, vectors, at = [], [], [], np.empty((sample.size, k_values[-1]), np.float32), 0
    for table in sample.tables(fs, columns):
        labels.append(table["label"].to_numpy(zero_copy_only=False))
        splits.append(table["split"].to_numpy(zero_copy_only=False))
        series.append(pc.match_substring_regex(table["path"], SERIES).to_numpy(zero_copy_only=False).astype(bool))
        vectors[at : at + table.num_rows] = coordinates(table, pca, kept, k_values[-1])
        at += table.num_rows
    return Images(url, manifest, np.concatenate(labels), np.concatenate(splits), np.concatenate(series), vectors, kept,
                  k_values, sample.n_images, max_images)


def coordinates(table, pca: reduce.Pca, kept: int, k: int) -> np.ndarray:
    """The first k PCA coordinates of a part's rows: its `pca` column, or its features projected when k > kept."""
    if k <= kept:
        return sink.matrix(table["pca"], kept)[:, :k]
    features = sink.matrix(table["features"], len(pca.mean))
    return (features - pca.mean.astype(np.float32)) @ pca.components[:k].astype(np.float32).T  # as the run projects


def split(labels: np.ndarray, splits: np.ndarray, fraction: float = TEST_FRACTION, seed: int = SEED,
          series: np.ndarray | None = None, holdout: str = "random") -> Split:
    """Training vs Test when the output has both; else a hold-out: a seeded share of each label (`random`, leaving
    out labels of one image), or Fruits-360's second series of frames (`series`)."""
    series = np.zeros(len(labels), bool) if series is None else series
    training, test = np.flatnonzero(splits == "Training"), np.flatnonzero(splits == "Test")
    if len(training) and len(test):
        notes = ["holdout series not used: the output's Training and Test splits are scored as they are"] if holdout == "series" else []
        unsplit = len(labels) - len(training) - len(test)
        if unsplit:
            notes.append(f"left out the images in neither Training nor Test: {unsplit:,}")
        unseen = sorted(set(labels[test]) - set(labels[training]))
        if unseen:
            notes.append(f"labels in Test only, so never predicted: {listed(unseen)}")
        at_least_two_labels(labels[training], "the Training split")
        return Split(training, test, "the output's Training and Test splits", notes)
    if holdout == "series":
        return series_split(labels, series)
    names, counts = np.unique(labels, return_counts=True)
    alone = names[counts < 2]
    at_least_two_labels(labels, "the output")
    notes = [f"left out the labels with a single image (a hold-out needs one to train on and one to test): "
             f"{listed(alone)}"] if len(alone) else []
    at_least_two_labels(labels[~np.isin(labels, alone)], "the labels with 2 images or more")
    rng, test = np.random.default_rng(seed), []
    for name in names[counts >= 2]:  # each label on both sides: scikit-learn's stratified split may test none of a rare one
        mine = rng.permutation(np.flatnonzero(labels == name))
        test.extend(mine[: min(max(int(fraction * len(mine) + 0.5), 1), len(mine) - 1)])
    test = np.sort(np.array(test, dtype=int))
    train = np.setdiff1d(np.flatnonzero(~np.isin(labels, alone)), test)
    method = f"a random hold-out of {fraction:.0%} of each label's images (seed {seed}), as the output has no Test split"
    return Split(train, test, method, notes + [random_holdout_note(labels, series)])


def random_holdout_note(labels: np.ndarray, series: np.ndarray) -> str:
    """What a random hold-out measures, and the fairer split these images allow."""
    both = len(set(labels[series]) & set(labels[~series]))
    fairer = (f"these file names hold Fruits-360's series of frames in {both} labels: `--holdout series` trains on the "
              "first and tests on the others" if both >= 2 else
              "for a fair figure, give the output a Test split (a Test/ folder beside Training/)")
    return ("the hold-out is random: where images come in series (frames of one fruit turning, as in Fruits-360), it tests "
            f"on near-copies of training images and flatters the features; {fairer}")


def series_split(labels: np.ndarray, series: np.ndarray) -> Split:
    """Train on Fruits-360's first series of frames, test on its others (r_*, r2_*), of the labels that have both."""
    both = np.array(sorted(set(labels[series]) & set(labels[~series])), dtype=object)
    if len(both) < 2:
        raise UsageError(f"--holdout series needs 2 labels with images of both Fruits-360 series (file names r_12_100.jpg "
                         f"and 12_100.jpg); this output has {len(both)}: use --holdout random, or give it a Test/ folder")
    kept = np.isin(labels, both)
    one = sorted(set(labels) - set(both))
    notes = [f"left out the labels with images of one series only: {listed(one)}"] if one else []
    method = ("Fruits-360's series: trained on the first series of frames (12_100.jpg), tested on the others "
              "(r_12_100.jpg, r2_12_100.jpg: other turns of the same fruits)")
    return Split(np.flatnonzero(kept & ~series), np.flatnonzero(kept & series), method, notes)


def at_least_two_labels(labels: np.ndarray, where: str) -> None:
    """A classifier needs two labels to tell apart."""
    names = sorted(set(labels))
    if len(names) < 2:
        found = f"only {names[0]!r}" if names else "none"
        raise UsageError(f"evaluate needs images of at least 2 labels; {where} has {found}: label the images by folder")


def listed(names, limit: int = 10) -> str:
    """Names in a line, the first `limit` of them."""
    names = [str(name) for name in names]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def evaluate(images: Images, holdout: str | None = None) -> dict:
    """Train and score the classifier for each k; every figure of the evaluation, as plain data."""
    started = time.perf_counter()
    rows = split(images.labels, images.splits, series=images.series, holdout=config.evaluate_holdout(holdout))
    y_train, y_test = images.labels[rows.train], images.labels[rows.test]
    notes = ([sample_note(images)] if images.sampled else []) + rows.notes
    by_k, predicted = [], None
    for k in images.k_values:
        fit_started = time.perf_counter()
        guesses = classify(images.vectors[rows.train, :k], y_train, images.vectors[rows.test, :k], notes, k)
        by_k.append({"k": k, "accuracy": float(np.mean(guesses == y_test)), "seconds": time.perf_counter() - fit_started})
        if k == images.kept:
            predicted = guesses
    names = sorted(set(y_train) | set(y_test))
    precision, recall, f1, support = precision_recall_fscore_support(y_test, predicted, labels=names, zero_division=0)
    train_names, train_counts = np.unique(y_train, return_counts=True)
    majority = train_names[np.argmax(train_counts)]
    m = images.manifest
    return {
        "output": images.url,
        "model": m.get("model", {}).get("name"),
        "weights": m.get("weights", {}) | {"seed": m.get("settings", {}).get("seed")},
        "weights_note": finetune.weights_note(m),
        "classifier": f"scikit-learn LogisticRegression(max_iter={MAX_ITER}) on the first k PCA coordinates, not standardized: "
                      "the one `recognize` answers with",
        "split": {"method": rows.method, "train": len(rows.train), "test": len(rows.test)},
        "sample": {"images": len(images.labels), "of": images.n_images, "max_images": images.max_images,
                   "method": SAMPLE_METHOD} if images.sampled else None,
        "labels": len(names),
        "k": images.kept,
        "accuracy": next(entry["accuracy"] for entry in by_k if entry["k"] == images.kept),
        "chance": {"uniform": 1 / len(train_names), "labels_trained": len(train_names),
                   "majority": float(np.mean(y_test == majority)), "majority_label": str(majority)},
        "accuracy_vs_k": by_k,
        "per_label": [
            {"label": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names, precision, recall, f1, support)
        ],
        "confusion": {"labels": names, "counts": confusion_matrix(y_test, predicted, labels=names).tolist()},
        "notes": notes,
        "fit_seconds": time.perf_counter() - started,
    }


def sample_note(images: Images) -> str:
    """What the scores were measured on, when it was not every image of the output."""
    return f"evaluated on a sample of {len(images.labels):,} of {images.n_images:,} images (evaluate.max-images)"


def classify(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, notes: list[str], k: int) -> np.ndarray:
    """Fit the classifier and predict the test rows; a solver that did not converge is noted."""
    model, converged = train(x_train, y_train)
    if not converged:
        notes.append(f"k = {k}: the solver did not converge in {MAX_ITER} iterations")
    return model.predict(x_test)


def train(x: np.ndarray, y: np.ndarray) -> tuple[LogisticRegression, bool]:
    """The classifier scored here and used by `recognize` (trained there on every row), and whether it converged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = LogisticRegression(max_iter=MAX_ITER).fit(x, y)
    return model, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def write(scores: dict, folder: str | None = None, storage_options: dict | None = None) -> list[str]:
    """Write evaluation.json, the PNG files and evaluation.html to `folder` (default OUTPUT/evaluation/); returns their paths, page first."""
    fs, path = source.open_url(folder or f"{scores['output']}/{sink.EVALUATION}", storage_options or {})
    sink.make_folder(fs, path)
    pngs = {name: report.png(figure) for name, figure in figures(scores).items()}
    sink.write_bytes(fs, f"{path}/{DOCUMENT}", (json.dumps(scores, indent=2, ensure_ascii=False) + "\n").encode())
    for name, data in pngs.items():
        sink.write_bytes(fs, f"{path}/{name}", data)
    sink.write_bytes(fs, f"{path}/{PAGE}", page(scores, pngs).encode())
    return [source.full_url(fs, f"{path}/{name}") for name in (PAGE, DOCUMENT, *pngs)]


def summary(scores: dict) -> list[str]:
    """The evaluation in a few lines: accuracy against chance, by k, the weights, the notes."""
    chance = scores["chance"]
    lines = [
        f"accuracy   {scores['accuracy']:.3f} on {scores['split']['test']:,} test images, k = {scores['k']} components; "
        f"chance {chance['uniform']:.3f} (1 of {chance['labels_trained']} labels), majority label {chance['majority']:.3f}",
        "by k       " + "  ".join(f"{entry['k']}: {entry['accuracy']:.3f}" for entry in scores["accuracy_vs_k"]),
        f"split      {scores['split']['train']:,} train / {scores['split']['test']:,} test, {scores['split']['method']}",
        f"weights    {scores['weights_note']}",
    ]
    return lines + [f"note       {note}" for note in scores["notes"]]


# --- the pictures ---------------------------------------------------------------------------------


def figures(scores: dict) -> dict[str, Figure]:
    """The evaluation's pictures by file name (see PICTURES)."""
    return {
        "accuracy-vs-k.png": accuracy_figure(scores["accuracy_vs_k"], scores["k"], scores["chance"]),
        "confusion-matrix.png": confusion_figure(np.array(scores["confusion"]["counts"]), scores["confusion"]["labels"]),
    }


def accuracy_figure(by_k: list[dict], kept: int, chance: dict) -> Figure:
    """Test accuracy against k, with the k kept marked and the two chance levels drawn."""
    ks, accuracy = [entry["k"] for entry in by_k], [entry["accuracy"] for entry in by_k]
    figure = Figure(figsize=(8, 4.5), dpi=report.DPI, layout="constrained")
    ax = figure.add_subplot()
    ax.plot(ks, accuracy, "o-", color="C0", linewidth=2, label="test accuracy")
    for k, value in zip(ks, accuracy):
        ax.annotate(f"{value:.1%}", (k, value), xytext=(0, 8), textcoords="offset points", ha="center", fontsize="small")
    uniform = f"chance, 1 of the labels ({chance['uniform']:.1%})"
    majority = f"always the majority label ({chance['majority']:.1%})"
    if abs(chance["majority"] - chance["uniform"]) < 0.02:  # lines a pixel or two apart: draw one, name both
        ax.axhline(chance["uniform"], color="C3", linestyle=":", label=f"{uniform}; {majority}")
    else:
        ax.axhline(chance["uniform"], color="C3", linestyle=":", label=uniform)
        ax.axhline(chance["majority"], color="C7", linestyle="--", label=majority)
    ax.axvline(kept, color="C2", linestyle="--", linewidth=1, label=f"k kept by the run ({kept})")
    ax.set_xscale("log")
    ax.set_xlim(ks[0] / 1.5, ks[-1] * 1.5)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set(xlabel="principal components used (k)", ylabel="accuracy on the test images", ylim=(0, 1.08))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(loc="upper left", fontsize="small")
    ax.grid(alpha=0.3)
    return figure


def confusion_figure(counts: np.ndarray, names: list[str]) -> Figure:
    """True labels (rows) against predicted ones, coloured by the share of each true label; counts in the cells."""
    side = min(max(4 + 0.32 * len(names), 6), 40)  # inches: room for every label's name
    figure = Figure(figsize=(side + 1, side), dpi=report.DPI, layout="constrained")
    ax = figure.add_subplot()
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    drawn = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(drawn, ax=ax, shrink=0.6, format=PercentFormatter(1.0), label="share of the true label's test images")
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, names, rotation=90, fontsize="small")
    ax.set_yticks(ticks, names, fontsize="small")
    if len(names) <= MAX_CELL_COUNTS:
        for (row, column), n in np.ndenumerate(counts):
            if n:
                ax.text(column, row, str(n), ha="center", va="center", fontsize="x-small",
                        color="white" if shares[row, column] > 0.5 else "black")
    ax.set(xlabel="predicted label", ylabel="true label", title=f"{int(counts.sum()):,} test images, {len(names)} labels")
    return figure


# --- the page -------------------------------------------------------------------------------------


def page(scores: dict, pngs: dict[str, bytes]) -> str:
    """One HTML page with the summary, the pictures embedded and the per-label table: no other file needed."""
    chance = scores["chance"]
    facts = {
        "output": scores["output"],
        "weights": f"{scores['model']}, {scores['weights_note']}",
        "classifier": scores["classifier"],
        "split": f"{scores['split']['train']:,} images to train, {scores['split']['test']:,} to test: {scores['split']['method']}",
        "accuracy": f"{scores['accuracy']:.1%} with k = {scores['k']} components",
        "chance": f"{chance['uniform']:.1%} (1 of {chance['labels_trained']} labels); always {chance['majority_label']}: {chance['majority']:.1%}",
        "by k": ", ".join(f"{entry['k']}: {entry['accuracy']:.1%}" for entry in scores["accuracy_vs_k"]),
        **{f"note {i + 1}": note for i, note in enumerate(scores["notes"])},
    }
    per_label = [[html.escape(row["label"]), f"{row['precision']:.2f}", f"{row['recall']:.2f}", f"{row['f1']:.2f}",
                  str(row["support"])] for row in scores["per_label"]]
    body = [
        report.table([[html.escape(k), html.escape(str(v))] for k, v in facts.items()], None),
        report.pictures_html(pngs, PICTURES),
        f"<h2>By label (k = {scores['k']})</h2>",
        report.table(per_label, ["label", "precision", "recall", "f1", "test images"]),
    ]
    return report.html_page(f"Evaluation: {scores['output']}", "\n".join(body))
