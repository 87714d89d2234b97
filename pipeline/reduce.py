"""Reduce: dask-ml IncrementalPCA on all staged features, streamed batch by batch, exact.

dask-ml's defaults pick a randomized SVD without power iterations and return wrong components
(explained variance off by a factor of up to six on CNN features). We fit with the full SVD and
keep every component the data has (min(rows, features)): each incremental step then loses
nothing, the result equals an exact PCA, and the variance curve is known to choose k from a
fraction. Only the k kept components are used to project.
"""
from __future__ import annotations

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


@dataclasses.dataclass(frozen=True)
class Pca:
    """A fitted PCA; saved as pca.npz (NumPy's open format), one array per field.

    components: k × d, rows are the kept principal axes; mean: d; explained_variance and
    explained_variance_ratio: every fitted component (not only the k kept), in decreasing order;
    n_samples: rows fitted. Projection: (features - mean) @ components.T.
    """

    components: np.ndarray
    mean: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    n_samples: int

    @property
    def n_components(self) -> int:
        return self.components.shape[0]

    @property
    def variance_kept(self) -> float:
        return float(self.explained_variance_ratio[: self.n_components].sum())

    def save(self, fs, path: str) -> None:
        sink.publish(fs, path, lambda f: np.savez(f, **dataclasses.asdict(self)))

    @classmethod
    def load(cls, fs, path: str) -> "Pca":
        with fs.open(path, "rb") as f, np.load(f) as saved:
            return cls(**{name: saved[name] for name in saved.files} | {"n_samples": int(saved["n_samples"])})


def projection(fs, path: str) -> tuple[np.ndarray, np.ndarray]:
    """The mean and kept components of a saved PCA: what the workers need to project features."""
    pca = Pca.load(fs, path)
    return pca.mean, pca.components


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
    with warnings.catch_warnings():
        silence_first_batch_warning()
        for batch in gen_batches(n_rows, batch_size, min_batch_size=rank):
            model.partial_fit(features[batch])
            progress(batch.stop - batch.start)
    k = components_for(model.explained_variance_ratio_, n_components)
    return Pca(
        components=np.asarray(model.components_[:k], np.float32),
        mean=np.asarray(model.mean_, np.float32),
        explained_variance=np.asarray(model.explained_variance_, np.float64),
        explained_variance_ratio=np.asarray(model.explained_variance_ratio_, np.float64),
        n_samples=int(model.n_samples_seen_),
    )


def silence_first_batch_warning() -> None:
    """Hide the 0/0 warning dask-ml's variance update raises on its first batch, here and on the workers.

    It divides by the previous sample count (0 on the first batch), then overwrites those values;
    the result is right (tested against an exact PCA) but each run would print a warning.
    """
    ignore = dict(action="ignore", message="invalid value encountered in divide", category=RuntimeWarning)
    warnings.filterwarnings(**ignore)
    try:
        distributed.get_client().run(warnings.filterwarnings, **ignore)
    except ValueError:  # no distributed client: the fit runs in this process
        pass


def components_for(ratios: np.ndarray, n_components: int | float) -> int:
    """k for an int request (capped at what the data has), or the smallest k keeping a fraction."""
    if isinstance(n_components, int):
        return min(n_components, len(ratios))
    kept = np.cumsum(ratios)
    return min(int(np.searchsorted(kept, n_components * (1 - 1e-9))) + 1, len(ratios))
