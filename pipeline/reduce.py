"""Reduce: dask-ml IncrementalPCA on all staged features, streamed batch by batch, exact.

dask-ml's defaults pick a randomized SVD without power iterations and return wrong components
(explained variance off by a factor of up to six on CNN features). We fit with the full SVD and
keep every component the data has (min(rows, features)): each incremental step then loses
nothing, the result equals an exact PCA, and the variance curve is known to choose k from a
fraction. Only the k kept components are used to project; all are saved, so that `update` can
go on fitting with the features of new images alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Callable

import dask
import dask.array as da
import distributed
import numpy as np
from dask_ml.decomposition import IncrementalPCA
from sklearn.utils import gen_batches

from . import sink
from .config import UsageError


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


def staged_matrix(fs, paths: list[str], rows: list[int], width: int) -> da.Array:
    """All staged features as one lazy dask array, a block per staged file (read on the workers)."""
    blocks = [
        da.from_delayed(dask.delayed(sink.staged_features)(fs, path, width), (n, width), dtype=np.float32)
        for path, n in zip(paths, rows)
        if n
    ]
    return da.concatenate(blocks)


def fit(features: da.Array, n_components: int | float, batch_size: int | None, progress: Callable[[int], None] = lambda n: None) -> Pca:
    """Fit on every row, `batch_size` rows at a time (None: 5 × features), keep `n_components`."""
    n_rows, width = features.shape
    rank = min(n_rows, width)
    batch_size = max(batch_size or 5 * width, rank)
    model = IncrementalPCA(n_components=rank, svd_solver="full", batch_size=batch_size)
    with expected_warnings_hidden():
        for batch in gen_batches(n_rows, batch_size, min_batch_size=rank):
            model.partial_fit(one_block(features[batch]))
            progress(batch.stop - batch.start)
    return Pca.of(model, n_components)


def update(pca: Pca, features: da.Array, n_components: int | float, batch_size: int | None,
           progress: Callable[[int], None] = lambda n: None) -> Pca:
    """Go on fitting `pca` with new rows only, `batch_size` at a time; keep `n_components` of the result.

    Each step is IncrementalPCA's: an exact SVD of the axes fitted so far (scaled by their
    singular values) stacked on the new rows. With room for every axis the rows can have, the
    result equals a PCA fitted from scratch on all of them (tests/test_reduce.py: five increments
    of real VGG16 features). Rows removed from the output stay in the model: a fresh `run` refits.
    """
    n_rows, width = features.shape
    model = pca.model(rank=min(pca.n_samples + n_rows, width))
    with expected_warnings_hidden():
        for batch in gen_batches(n_rows, batch_size or 5 * width):
            model.partial_fit(one_block(features[batch]))
            progress(batch.stop - batch.start)
    return Pca.of(model, n_components)


def one_block(batch: da.Array) -> da.Array:
    """The batch as a single block: its SVD is then one LAPACK call on one worker, not a tall-skinny
    QR over blocks of fewer rows than features, which is slower and holds more (README, PCA fit).
    """
    return batch.rechunk({0: -1})


@contextlib.contextmanager
def expected_warnings_hidden():
    """Hide two warnings dask-ml's steps give by design, here and (for good) on the workers.

    Its first variance update divides by the previous sample count, 0, then overwrites those
    values: the result is right (tested against an exact PCA). And each step's graph carries the
    axes fitted so far (13 MB at 1,280 features), which distributed warns of at every step.
    """
    first_batch = dict(action="ignore", message="invalid value encountered in divide", category=RuntimeWarning)
    with warnings.catch_warnings():
        warnings.filterwarnings(**first_batch)
        warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
        try:
            distributed.get_client().run(warnings.filterwarnings, **first_batch)
        except ValueError:  # no distributed client: the fit runs in this process
            pass
        yield


def components_for(ratios: np.ndarray, n_components: int | float) -> int:
    """k for an int request (capped at what the data has), or the smallest k keeping a fraction."""
    if isinstance(n_components, int):
        return min(n_components, len(ratios))
    kept = np.cumsum(ratios)
    return min(int(np.searchsorted(kept, n_components * (1 - 1e-9))) + 1, len(ratios))
