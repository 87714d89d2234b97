"""Real parts for the tests: an S3 API server on loopback (moto), a LocalCluster with worker processes."""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import urllib.request

import pytest
import s3fs
from distributed import LocalCluster
from moto.server import ThreadedMotoServer

from faults import FaultyS3
from pipeline.config import SAMPLE_DIR

FAKE_KEY, FAKE_SECRET = "FAKEKEYPIPELINETEST0", "fake/secret/of/the/pipeline/tests/0000000"


@pytest.fixture(scope="session")
def aws_env():
    """Fake AWS credentials in the environment, inherited by the cluster's worker processes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        yield FAKE_KEY, FAKE_SECRET


@pytest.fixture(scope="session")
def s3_endpoint(aws_env):
    """An S3 API server (moto) on a free loopback port."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint):
    """A clean S3 server with a bucket `fruits` holding the shipped sample under fruits-360/."""
    urllib.request.urlopen(urllib.request.Request(f"{s3_endpoint}/moto-api/reset", method="POST")).close()
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("fruits")
    fs.put(str(SAMPLE_DIR) + "/", "fruits/fruits-360/", recursive=True)
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def faulty_s3(s3, s3_endpoint):
    """A proxy in front of the S3 server that injects the faults a test asks for (see faults.py)."""
    proxy = FaultyS3(s3_endpoint)
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def dask_cluster(aws_env):
    """A LocalCluster with one worker process of two threads; its address, for --cluster tcp://..."""
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


@pytest.fixture
def sample_copy(tmp_path) -> pathlib.Path:
    """A writable copy of the shipped sample's images (Training/<label>/...)."""
    copy = tmp_path / "images"
    shutil.copytree(SAMPLE_DIR / "Training", copy / "Training")
    return copy


@pytest.fixture
def dask_process():
    """Start `python -m dask ARGS` processes (scheduler, worker) that are stopped when the test ends."""
    started = []

    def start(*args) -> subprocess.Popen:
        started.append(subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return started[-1]

    yield start
    for process in reversed(started):
        process.terminate()
        process.wait(30)
