"""Reduce: an exact PCA of all staged features, from each partition's moments added up on the cluster.

Each partition's rows give their count, mean and scatter matrix Σ (x − mean)(x − mean)ᵀ in
float64, computed while other partitions are still being featurized; the workers add them up
pairwise in a tree fixed by partition order, and one eigendecomposition of the features ×
features scatter matrix gives every principal axis at once (Spark's RowMatrix does the same).
What is saved is IncrementalPCA's state with every component the data has (min(rows,
features)): `update` goes on from it with dask-ml's `partial_fit` on the new rows alone, and the
whole variance curve is there to choose k from a fraction. Only the k kept components are used to
project.
"""
from __future__ import annotations

import contextlib
import dataclasses
import operator
import warnings
from typing import TYPE_CHECKING, Callable

import dask
import numpy as np

from . import sink
from ..config import UsageError

if TYPE_CHECKING:  # imported where used: a run needs neither, and they take a second to import
    import dask.array as da
    from dask_ml.decomposition import IncrementalPCA


@dataclasses.dataclass(frozen=True)
class Pca:
    """A fitted PCA, with all that `update` needs to go on fitting; saved as pca.npz (NumPy's open format).

    components: r × d, every fitted principal axis in decreasing order of variance, r = min(rows
    seen, d); the first n_components are kept to project: (features - mean) @
    components[:n_components].T. singular_values, explained_variance, explained_variance_ratio:
    r each. mean, var: d, over every row seen. n_samples: rows seen, by the first fit and updates.
    """

    components: np.ndarray
    singular_values: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    n_samples: int
    n_components: int

    @property
    def kept(self) -> np.ndarray:
        """The kept principal axes, k × d float32: what the rows are projected on."""
        return np.asarray(self.components[: self.n_components], np.float32)

    @property
    def variance_kept(self) -> float:
        return float(self.explained_variance_ratio[: self.n_components].sum())

    def save(self, fs, path: str) -> None:
        sink.publish(fs, path, lambda f: np.savez(f, **dataclasses.asdict(self)))

    @classmethod
    def load(cls, fs, path: str) -> "Pca":
        with fs.open(path, "rb") as f, np.load(f) as saved:
            missing = {field.name for field in dataclasses.fields(cls)} - set(saved.files)
            if missing:
                raise UsageError(
                    f"{path} was written by an earlier version of the pipeline (it lacks {', '.join(sorted(missing))}): "
                    "make the output again with `python -m pipeline run --overwrite`"
                )
            return cls(**{name: saved[name] for name in saved.files} | {
                "n_samples": int(saved["n_samples"]), "n_components": int(saved["n_components"])})

    @classmethod
    def of(cls, model: IncrementalPCA, n_components: int | float) -> "Pca":
        """The state of a fitted IncrementalPCA, keeping `n_components` (a count, or a fraction of variance)."""
        ratios = np.asarray(model.explained_variance_ratio_, np.float64)
        return cls(
            components=np.asarray(model.components_, np.float64),
            singular_values=np.asarray(model.singular_values_, np.float64),
            explained_variance=np.asarray(model.explained_variance_, np.float64),
            explained_variance_ratio=ratios,
            mean=np.asarray(model.mean_, np.float64),
            var=np.asarray(model.var_, np.float64),
            n_samples=int(model.n_samples_seen_),
            n_components=components_for(ratios, n_components),
        )

    def model(self, rank: int) -> IncrementalPCA:
        """An IncrementalPCA in this state with room for `rank` axes, ready for `partial_fit` on any number of rows.

        Axes beyond the fitted ones start at zero variance: they add nothing to the next step's
        SVD, whose result then has room for the directions the new rows bring.
        """
        from dask_ml.decomposition import IncrementalPCA

        extra = max(rank - len(self.singular_values), 0)
        model = IncrementalPCA(n_components=None, svd_solver="full")  # None: as many axes as components_
        model.components_ = np.vstack([self.components, np.zeros((extra, self.components.shape[1]))])
        model.singular_values_ = np.concatenate([self.singular_values, np.zeros(extra)])
        model.mean_, model.var_, model.n_samples_seen_ = self.mean, self.var, self.n_samples
        return model


def projection(fs, path: str) -> tuple[np.ndarray, np.ndarray]:
    """The mean and kept components of a saved PCA: what the workers need to project features."""
    pca = Pca.load(fs, path)
    return pca.mean.astype(np.float32), pca.kept


@dataclasses.dataclass(frozen=True)
class Moments:
    """Rows seen, their mean and their scatter matrix Σ (x − mean)(x − mean)ᵀ, in float64: all an exact PCA needs.

    Two are added with Chan's formula, which centres each on its own mean: no cancellation
    however far the features are from zero, and any grouping of partitions gives the same sum.
    """

    n: int
    mean: np.ndarray
    scatter: np.ndarray

    @classmethod
    def of(cls, rows: np.ndarray) -> "Moments":
        centered = np.array(rows, np.float64)  # a copy: the rows are left as they are
        mean = centered.mean(axis=0)
        centered -= mean
        return cls(len(centered), mean, centered.T @ centered)

    def __add__(self, other: "Moments") -> "Moments":
        n = self.n + other.n
        delta = other.mean - self.mean
        between = np.outer(delta, delta * (self.n * other.n / n))
        return Moments(n, self.mean + delta * (other.n / n), self.scatter + other.scatter + between)

    def pca(self, n_components: int | float) -> Pca:
        """The exact PCA of the rows, as IncrementalPCA's state, keeping `n_components`.

        The scatter matrix's eigenvalues are the squared singular values of the centred rows, and
        its eigenvectors their principal axes; signs as dask's svd_flip (each axis sums to ≥ 0).
        """
        eigenvalues, axes = np.linalg.eigh(self.scatter)
        rank = min(self.n, len(self.mean))
        squares = np.clip(eigenvalues[::-1][:rank], 0.0, None)  # largest first; rounding can give -1e-12
        components = axes[:, ::-1][:, :rank].T
        components *= np.where(components.sum(axis=1, keepdims=True) >= 0, 1.0, -1.0)
        ratios = squares / np.trace(self.scatter)
        return Pca(
            components=np.ascontiguousarray(components),
            singular_values=np.sqrt(squares),
            explained_variance=squares / (self.n - 1),
            explained_variance_ratio=ratios,
            mean=self.mean,
            var=np.diag(self.scatter) / self.n,
            n_samples=self.n,
            n_components=components_for(ratios, n_components),
        )


def staged_moments(fs, paths: list[str], width: int) -> Moments:
    """The moments of the features of these staged partitions, together."""
    return Moments.of(np.concatenate([sink.staged_features(fs, path, width) for path in paths]))


class MomentsSum:
    """The moments of staged partitions, added up on the workers while the others are featurized.

    Partitions are taken a few at a time, about 2 × features rows (10 partitions of 256 rows at
    1,280 features): a leaf's scatter matrix then costs some 15 × the addition of two, and the
    workers hold a few features × features matrices at a time. The tree of additions is fixed by
    the partitions' order (leaf 2i with 2i + 1, and so on up), not by which finishes first: a
    run's PCA does not depend on timing.
    """

    def __init__(self, client, fs, width: int, rows_per_partition: int):
        self.client, self.fs, self.width = client, fs, width
        self.group = max(1, 2 * width // rows_per_partition)
        self.leaves: dict[int, dict[int, str]] = {}  # leaf → {partition index: path} staged so far
        self.waiting: dict[tuple[int, int], object] = {}  # (level, index) → a sum whose sibling has not come

    def add(self, index: int, path: str) -> None:
        """Add partition `index`, staged at `path`: its leaf's moments start once the leaf is staged."""
        leaf = self.leaves.setdefault(index // self.group, {})
        leaf[index] = path
        if len(leaf) == self.group:
            self.add_leaf(index // self.group)

    def add_leaf(self, index: int) -> None:
        """Compute a leaf's moments ahead of the partitions still to featurize, and add them to their sibling's."""
        paths = [path for _, path in sorted(self.leaves.pop(index).items())]
        moments = self.client.submit(staged_moments, self.fs, paths, self.width, priority=1, pure=False)
        level = 0
        while (level, index ^ 1) in self.waiting:
            sibling = self.waiting.pop((level, index ^ 1))
            pair = (sibling, moments) if index & 1 else (moments, sibling)
            moments = self.client.submit(operator.add, *pair, priority=1, pure=False)
            level, index = level + 1, index // 2
        self.waiting[(level, index)] = moments

    def pca(self, n_components: int | float) -> Pca:
        """The PCA of every row added: the last leaves, the last additions and the eigendecomposition, on the workers."""
        for index in sorted(self.leaves):  # the last leaf, and any with a partition that had no rows
            self.add_leaf(index)
        last = [self.waiting.pop(key) for key in sorted(self.waiting, key=lambda key: key[1] << key[0])]  # in row order
        total = last[0]
        for moments in last[1:]:
            total = self.client.submit(operator.add, total, moments, pure=False)
        return self.client.submit(Moments.pca, total, n_components, pure=False).result()


def staged_matrix(fs, paths: list[str], rows: list[int], width: int) -> da.Array:
    """All staged features as one lazy dask array, a block per staged file (read on the workers)."""
    import dask.array as da

    blocks = [
        da.from_delayed(dask.delayed(sink.staged_features)(fs, path, width), (n, width), dtype=np.float32)
        for path, n in zip(paths, rows)
        if n
    ]
    return da.concatenate(blocks)


def update(pca: Pca, features: da.Array, n_components: int | float, batch_size: int | None,
           progress: Callable[[int], None] = lambda n: None) -> Pca:
    """Go on fitting `pca` with new rows only, `batch_size` at a time; keep `n_components` of the result.

    Each step is IncrementalPCA's: an exact SVD of the axes fitted so far (scaled by their
    singular values) stacked on the new rows. With room for every axis the rows can have, the
    result equals a PCA fitted from scratch on all of them (tests/test_reduce.py: five increments
    of real VGG16 features). Rows removed from the output stay in the model: a fresh `run` refits.
    """
    from sklearn.utils import gen_batches

    n_rows, width = features.shape
    model = pca.model(rank=min(pca.n_samples + n_rows, width))
    with large_graphs_allowed():
        for batch in gen_batches(n_rows, batch_size or 5 * width):
            model.partial_fit(one_block(features[batch]))
            progress(batch.stop - batch.start)
    return Pca.of(model, n_components)


def one_block(batch: da.Array) -> da.Array:
    """The batch as a single block: its SVD is then one LAPACK call on one worker, not a tall-skinny
    QR over blocks of fewer rows than features, which is slower and holds more (docs/how-it-works.md, The PCA fit).
    """
    return batch.rechunk({0: -1})


@contextlib.contextmanager
def large_graphs_allowed():
    """Hide distributed's warning of graphs past 10 MB, which these carry by design: each update step
    the axes fitted so far (13 MB at 1,280 features), a fit of rows held in memory the rows.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
        yield


def components_for(ratios: np.ndarray, n_components: int | float) -> int:
    """k for an int request (capped at what the data has), or the smallest k keeping a fraction."""
    if isinstance(n_components, int):
        return min(n_components, len(ratios))
    kept = np.cumsum(ratios)
    return min(int(np.searchsorted(kept, n_components * (1 - 1e-9))) + 1, len(ratios))
