"""Scale out on a real multi-process Dask cluster on loopback: `dask scheduler` and two `dask worker`
processes, one of them declaring the resource GPU=1, used by the CLI through --cluster tcp://..."""
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from distributed import Client

import cluster

pytestmark = pytest.mark.slow


@pytest.fixture
def loopback_cluster(tmp_path, dask_process):
    """A scheduler on a free loopback port and two one-thread workers named gpu (GPU=1) and cpu."""
    scheduler_file = str(tmp_path / "scheduler.json")
    common = ["--scheduler-file", scheduler_file, "--nthreads", "1", "--no-dashboard"]
    dask_process("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", scheduler_file)
    dask_process("worker", *common, "--name", "gpu", "--resources", "GPU=1")
    dask_process("worker", *common, "--name", "cpu")
    with Client(scheduler_file=scheduler_file, timeout=60) as client:
        client.wait_for_workers(2, timeout=60)
        yield client


def pipeline(*args):
    options = ["--weights", "random", "--images-per-partition", "16", "--image-size", "96", "--quiet"]
    return subprocess.run([sys.executable, "-m", "pipeline", "run", *options, *args], capture_output=True, text=True, timeout=600)


def rows(folder) -> pd.DataFrame:
    return pd.read_parquet(folder / "images.parquet").sort_values("path", ignore_index=True)


def test_featurize_runs_only_on_the_gpu_worker_and_gives_the_rows_of_a_local_cluster(loopback_cluster, tmp_path):
    client = loopback_cluster
    workers = {info["name"]: address for address, info in client.scheduler_info()["workers"].items()}
    assert cluster.featurize_resources(client, "auto") == {"GPU": cluster.FEATURIZE_GPU_SHARE}
    assert cluster.featurize_resources(client, False) is None
    client.get_task_stream()  # the scheduler records tasks from now on
    started = time.time()

    remote = pipeline("--cluster", client.scheduler.address, "--gpu", "true", "--output", str(tmp_path / "tcp"))
    assert remote.returncode == 0, remote.stderr
    tasks = client.get_task_stream(start=started)
    featurize = [t for t in tasks if str(t["key"]).startswith("featurize-")]
    assert len(featurize) == 9  # 129 images, 16 a partition
    assert {t["worker"] for t in featurize} == {workers["gpu"]}

    local = pipeline("--cluster", "local", "--output", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    on_tcp, on_local = rows(tmp_path / "tcp"), rows(tmp_path / "local")
    assert len(on_tcp) == 129
    pd.testing.assert_frame_equal(on_tcp[["path", "label", "split"]], on_local[["path", "label", "split"]])
    np.testing.assert_allclose(np.stack(on_tcp.features), np.stack(on_local.features), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack(on_tcp.pca), np.stack(on_local.pca), rtol=1e-4, atol=1e-4)


def test_gpu_true_on_a_cluster_without_gpu_workers_is_a_usage_error(tmp_path, dask_process):
    scheduler_file = str(tmp_path / "scheduler.json")
    dask_process("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", scheduler_file)
    dask_process("worker", "--scheduler-file", scheduler_file, "--nthreads", "1", "--no-dashboard")
    with Client(scheduler_file=scheduler_file, timeout=60) as client:
        client.wait_for_workers(1, timeout=60)
        result = pipeline("--cluster", client.scheduler.address, "--gpu", "true", "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "no worker of the cluster declares a GPU" in result.stderr
