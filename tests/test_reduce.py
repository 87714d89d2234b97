"""The PCA: fitted from moments, updated by dask-ml's IncrementalPCA, it must agree with scikit-learn's exact PCA."""
import pathlib

import dask.array as da
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from dask_ml.decomposition import IncrementalPCA
from distributed import Client, LocalCluster
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA

from pipeline.making import reduce, sink

VGG16 = pathlib.Path(__file__).parents[1] / ".." / "shared" / "data" / "fruits-360-vgg16-features" / "features.parquet"


def disagreement(exact: PCA, ratios: np.ndarray, components: np.ndarray, k: int) -> tuple[float, float]:
    """Worst relative error of the first k explained variance ratios, and worst angle (degrees) of the top-k subspace."""
    relative = np.abs(ratios[:k] - exact.explained_variance_ratio_[:k]) / exact.explained_variance_ratio_[:k]
    angles = subspace_angles(components[:k].T.astype(np.float64), exact.components_[:k].T)
    return float(relative.max()), float(np.degrees(angles.max()))


@pytest.fixture(scope="module")
def vgg16() -> np.ndarray:
    """4,000 × 4,608 real VGG16 features of Fruits-360 (89% zeros): past where the PySpark PCA ran out of heap."""
    if not VGG16.exists():
        pytest.skip(f"shared data not found at {VGG16}")
    return np.stack(pd.read_parquet(VGG16, columns=["features"])["features"].to_numpy()).astype(np.float32)


@pytest.fixture(scope="module")
def exact(vgg16) -> PCA:
    """scikit-learn's exact PCA of the VGG16 features, in float64."""
    return PCA(n_components=50, svd_solver="full").fit(vgg16.astype(np.float64))


@pytest.mark.slow
def test_fit_agrees_with_exact_pca_on_real_wide_features(vgg16, exact, dask_cluster, tmp_path):
    fitted = fit(dask_cluster, tmp_path, vgg16, 50, 500)
    assert fitted.kept.shape == (50, 4608) and fitted.components.shape == (4000, 4608)  # all axes, for updates
    error, angle = disagreement(exact, fitted.explained_variance_ratio, fitted.components, 50)
    assert error < 0.01 and angle < 1.0, (error, angle)
    np.testing.assert_allclose(fitted.mean, vgg16.mean(axis=0), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_fit_streamed_in_batches_agrees_with_exact_pca(vgg16, dask_cluster, tmp_path):
    features = vgg16[:, :1024]  # 4,000 rows in 4 batches of 1,024: every step incremental
    exact = PCA(n_components=50, svd_solver="full").fit(features.astype(np.float64))
    fitted = fit(dask_cluster, tmp_path, features, 50, 1024)
    error, angle = disagreement(exact, fitted.explained_variance_ratio, fitted.components, 50)
    assert error < 0.01 and angle < 1.0, (error, angle)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_dask_ml_defaults_fail_the_same_check(vgg16, exact):
    defaults = IncrementalPCA(n_components=50).fit(da.from_array(vgg16, chunks=(500, -1)))
    error, angle = disagreement(exact, np.asarray(defaults.explained_variance_ratio_), np.asarray(defaults.components_), 50)
    assert error > 0.01 or angle > 1.0, (error, angle)


def test_a_fraction_keeps_the_smallest_k_reaching_it():
    ratios = np.array([0.5, 0.3, 0.15, 0.05])
    assert reduce.components_for(ratios, 0.8) == 2
    assert reduce.components_for(ratios, 0.81) == 3
    assert reduce.components_for(ratios, 1.0) == 4
    assert reduce.components_for(ratios, 2) == 2
    assert reduce.components_for(ratios, 10) == 4  # no more than the data has


def test_fit_keeps_every_component_for_the_variance_curve_and_projects_with_k(dask_cluster, tmp_path):
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((300, 5)) @ rng.standard_normal((5, 40))).astype(np.float32)
    fitted = fit(dask_cluster, tmp_path / "staged", data, 0.99, 60)
    assert fitted.explained_variance_ratio.shape == (40,)
    assert fitted.n_components <= 5 and fitted.variance_kept >= 0.99
    import fsspec

    fs = fsspec.filesystem("file")
    fitted.save(fs, str(tmp_path / "pca.npz"))
    again = reduce.Pca.load(fs, str(tmp_path / "pca.npz"))
    np.testing.assert_array_equal(again.components, fitted.components)
    assert again.n_samples == 300


@pytest.mark.slow
def test_five_increments_of_real_features_agree_with_a_pca_fitted_from_scratch_on_all(vgg16, dask_cluster, tmp_path):
    features = vgg16[:, :1024]  # 1,024 of the columns keep it quick; the full width agrees as well (slower)
    exact = PCA(svd_solver="full").fit(features.astype(np.float64))
    first, *increments = np.array_split(features, 5)
    pca = fit(dask_cluster, tmp_path, first, 0.95)
    for rows in increments:
        pca = reduce.update(pca, da.from_array(rows), 0.95, None)
    assert pca.n_samples == 4000 and pca.n_components == reduce.components_for(exact.explained_variance_ratio_, 0.95)
    error, angle = disagreement(exact, pca.explained_variance_ratio, pca.components, pca.n_components)
    assert error < 0.01 and angle < 0.1, (error, angle)
    np.testing.assert_allclose(pca.mean, features.mean(axis=0), rtol=1e-4, atol=1e-4)


def test_an_update_of_fewer_rows_than_components_still_counts_every_row(dask_cluster, tmp_path):
    rows = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32) * np.arange(1, 9, dtype=np.float32)
    pca = reduce.update(fit(dask_cluster, tmp_path, rows[:50], 8), da.from_array(rows[50:53]), 8, None)
    exact = PCA(svd_solver="full").fit(rows[:53].astype(np.float64))
    assert pca.n_samples == 53
    np.testing.assert_allclose(pca.explained_variance_ratio, exact.explained_variance_ratio_, rtol=1e-5)


@pytest.mark.slow
def test_a_fit_on_a_cluster_prints_no_warning_of_dask_ml_by_design(dask_cluster, tmp_path, recwarn):
    """Its first step's 0/0 and the fitted axes carried in each step's graph (13 MB here) are expected."""
    from distributed import Client

    rows = np.random.default_rng(0).normal(size=(3000, 1280)).astype(np.float32)
    with Client(dask_cluster):
        pca = fit(dask_cluster, tmp_path, rows, 10, 1500)
        pca = reduce.update(pca, da.from_array(rows[:1500], chunks=(256, -1)), 10, None)
    assert [str(w.message) for w in recwarn] == []
    assert pca.n_samples == 4500 and pca.components.shape == (1280, 1280)


def test_an_update_after_a_fit_equals_a_fit_on_all_rows(dask_cluster, tmp_path):
    """The fit saves IncrementalPCA's state: dask-ml's partial_fit goes on from it, same axes, same signs."""
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((900, 12)) @ rng.standard_normal((12, 40)) + 0.1 * rng.standard_normal((900, 40)) + 3).astype(np.float32)
    whole = fit(dask_cluster, tmp_path / "whole", rows, 0.99, 128)
    updated = reduce.update(fit(dask_cluster, tmp_path / "first", rows[:300], 0.99, 128), da.from_array(rows[300:]), 0.99, 200)
    k = whole.n_components
    assert updated.n_samples == whole.n_samples == 900 and updated.n_components == k and updated.components.shape == (40, 40)
    for field in ("explained_variance_ratio", "explained_variance", "singular_values"):
        np.testing.assert_allclose(getattr(updated, field)[:k], getattr(whole, field)[:k], rtol=1e-5)
    np.testing.assert_allclose(updated.mean, whole.mean, rtol=1e-6)
    np.testing.assert_allclose(updated.var, whole.var, rtol=1e-5)
    np.testing.assert_allclose(updated.components[:k], whole.components[:k], atol=1e-5)


def stage(folder: pathlib.Path, features: np.ndarray, rows_per_partition: int) -> list[str]:
    """The features staged as a run stages them, one parquet file per partition; their paths."""
    folder.mkdir(parents=True)
    paths = [str(folder / sink.part_name(index)) for index in range(-(-len(features) // rows_per_partition))]
    for index, path in enumerate(paths):
        rows = features[index * rows_per_partition : (index + 1) * rows_per_partition]
        sink.write_parquet(fsspec.filesystem("file"), path, pa.table({"features": sink.list_array(rows)}))
    return paths


def fit_as_a_run_does(address: str, paths: list[str], width: int, rows_per_partition: int, order,
                      n_components: int | float = 50) -> reduce.Pca:
    """reduce.MomentsSum on a cluster, the partitions added in `order` (a run adds them as they are staged)."""
    with Client(address) as client:
        total = reduce.MomentsSum(client, fsspec.filesystem("file"), width, rows_per_partition)
        for index in order:
            total.add(index, paths[index])
        return total.pca(n_components)


def fit(address: str, folder: pathlib.Path, rows: np.ndarray, n_components: int | float, rows_per_partition: int | None = None):
    """The PCA a run fits of `rows`, staged `rows_per_partition` to a partition (default: one) in `folder`."""
    size = rows_per_partition or len(rows)
    paths = stage(folder / "partitions", rows, size)
    return fit_as_a_run_does(address, paths, rows.shape[1], size, range(len(paths)), n_components)


@pytest.mark.slow
def test_a_runs_fit_agrees_with_exact_pca_whatever_the_workers_and_partitions(vgg16, dask_cluster, tmp_path):
    """Float64 moments grouped otherwise agree to 1e-12 relative in explained variance, 1e-10 in the axes."""
    features = vgg16[:, :1024]
    exact = PCA(n_components=50, svd_solver="full").fit(features.astype(np.float64))
    first = fit_as_a_run_does(dask_cluster, stage(tmp_path / "256", features, 256), 1024, 256, range(16))  # 2 leaves of 8
    error, angle = disagreement(exact, first.explained_variance_ratio, first.components, 50)
    assert error < 1e-10 and angle < 1e-6, (error, angle)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as two_workers:
        for size in (1000, 37):  # 4 partitions in 2 leaves; 109 in a full leaf and a last one
            other = fit_as_a_run_does(two_workers.scheduler_address, stage(tmp_path / str(size), features, size), 1024,
                                      size, range(-(-4000 // size)))
            np.testing.assert_allclose(other.explained_variance_ratio[:50], first.explained_variance_ratio[:50], rtol=1e-12)
            np.testing.assert_allclose(other.components[:50], first.components[:50], atol=1e-10)
            np.testing.assert_allclose(other.mean, first.mean, rtol=1e-12, atol=1e-12)
            assert other.n_samples == 4000 and other.components.shape == (1024, 1024)


def test_a_runs_fit_does_not_depend_on_which_partition_is_staged_first(dask_cluster, tmp_path):
    """The tree of additions follows the partitions' order, not the order they finish in: the same bits."""
    rows = np.random.default_rng(0).gamma(0.5, size=(4000, 128)).astype(np.float32)
    paths = stage(tmp_path / "staged", rows, 250)  # 16 partitions, a leaf each at 128 features
    in_order = fit_as_a_run_does(dask_cluster, paths, 128, 250, range(16))
    shuffled = fit_as_a_run_does(dask_cluster, paths, 128, 250, np.random.default_rng(1).permutation(16))
    for field in ("components", "singular_values", "explained_variance_ratio", "mean", "var"):
        np.testing.assert_array_equal(getattr(shuffled, field), getattr(in_order, field))
