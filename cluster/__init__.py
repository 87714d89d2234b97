"""How a run gets its Dask cluster: a LocalCluster, a running scheduler, or a cluster file.

    --cluster local                  a LocalCluster sized for this machine (pipeline.yaml's local-cluster)
    --cluster tcp://10.0.0.5:8786    a scheduler you already run
    --cluster cluster/ec2-gpu.yaml   a cluster file (spec.py): kind local, or kind ec2 (ec2.py)
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import urllib.parse
import warnings
from typing import Callable, Iterator

import dask.system
from distributed import Client, LocalCluster
from distributed.system import MEMORY_LIMIT  # this machine's memory, or its cgroup's limit

from pipeline.config import UsageError
from pipeline.making.featurize import visible_gpus

from . import spec as specs

SCHEDULER_PROTOCOLS = ("tcp://", "tls://", "ucx://", "inproc://")
# Featurize tasks ask for half a GPU: two partitions at once per GPU worker, one in the model
# (one inference at a time per process) while the other is read and decoded.
FEATURIZE_GPU_SHARE = 0.5
# A LocalCluster starts no more CPU worker processes than memory gives each this much: a worker
# featurizing at 224 px on CPU peaked at 1.7-1.9 GiB (docs/performance.md), plus room beside it.
MEMORY_PER_PROCESS = 3 * 2**30
SCHEDULER_PROBE_S = 5  # how long a scheduler address may take to accept a connection before a run refuses it
log = logging.getLogger("pipeline")


@contextlib.contextmanager
def connect(address: str, local: dict, say: Callable[[str], None] = lambda message: None) -> Iterator[Client]:
    """A client of the cluster `address` names, closed (and any cluster it started removed) on the way out."""
    check_address(address)
    if address.startswith(SCHEDULER_PROTOCOLS):
        try:
            client = Client(address)  # waits distributed.comm.timeouts.connect (30 s by default)
        except (OSError, TimeoutError) as error:
            raise UsageError(f"cannot reach the Dask scheduler at {address}: {error}") from None
        with client:
            yield client
        return
    spec = specs.load(address) if specs.is_cluster_file(address) else specs.build(specs.Local, local, "pipeline.yaml", "local-cluster.")
    if isinstance(spec, specs.Ec2):
        from . import ec2  # dask-cloudprovider and botocore load only for EC2

        with ec2.launch(spec, address, say) as client:
            yield client
        return
    n_workers, threads = local_size(spec.n_workers, spec.threads_per_worker)
    with port_taken_in_one_line():
        cluster = LocalCluster(
            n_workers=n_workers, threads_per_worker=threads, processes=True, dashboard_address=spec.dashboard_address,
            resources={"GPU": 1} if local_gpus() else None,  # worker i drives GPU i (featurize.import_keras)
        )
    with cluster, Client(cluster) as client:
        try:
            yield client
        except KeyboardInterrupt:
            stop_at_once(cluster)
            raise


@contextlib.contextmanager
def port_taken_in_one_line() -> Iterator[None]:
    """Say in one line, as the pipeline's other warnings, that the dashboard's port was taken and which it took instead
    (distributed warns in four, with its source path); other warnings pass as they came."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        taken = re.match(r"Port (\d+) is already in use.*port (\d+) instead", str(warning.message), re.S)
        if taken:
            log.warning(f"the dashboard's port {taken[1]} is taken (another Dask cluster?): it listens on port {taken[2]}")
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno, source=warning.source)


def stop_at_once(cluster: LocalCluster) -> None:
    """On Ctrl-C: kill the worker processes now, and hide the cancelled tasks' log lines; staged work is kept.

    A worker inside the model does not stop for its nanny, which waits seconds before killing it.
    """
    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    for nanny in cluster.workers.values():
        with contextlib.suppress(ProcessLookupError, TypeError, AttributeError):
            os.kill(nanny.pid, signal.SIGKILL)


def check_address(address: str) -> None:
    """Fail early, before any work, on a cluster setting that names no cluster, or a bad cluster file."""
    if specs.is_cluster_file(address):
        specs.load(address)
    elif address != "local" and not address.startswith(SCHEDULER_PROTOCOLS):
        raise UsageError(
            f"unknown cluster {address!r}: use 'local', a scheduler address tcp://host:8786, "
            "or a cluster file such as cluster/ec2-gpu.yaml"
        )


def check_reachable(address: str, timeout_s: float = SCHEDULER_PROBE_S) -> None:
    """For a scheduler address, a TCP connection to its port within seconds, or a usage error: before any work starts."""
    check_address(address)
    if not address.startswith(("tcp://", "tls://")):
        return
    url = urllib.parse.urlsplit(address)
    try:
        with socket.create_connection((url.hostname, url.port or 8786), timeout=timeout_s):
            pass
    except (OSError, ValueError) as error:
        raise UsageError(
            f"no Dask scheduler answers at {address} ({type(error).__name__}: {error}): start one "
            "(`dask scheduler`), check the address, or use --cluster local"
        ) from None


def on_this_machine(address: str) -> bool:
    """True for a LocalCluster: its workers see this machine's files."""
    return address == "local" or specs.is_cluster_file(address) and isinstance(specs.load(address), specs.Local)


def local_size(n_workers: int | None, threads_per_worker: int | None, gpus: int | None = None, *,
               cores: int | None = None, memory: int | None = None) -> tuple[int, int]:
    """Worker processes and threads for this machine: one process per GPU, else one per 4 cores, at
    least two on two cores or more, as far as memory allows each one `MEMORY_PER_PROCESS`.

    Each process holds one copy of the model and runs one inference at a time on all its threads;
    its other threads read and decode the next partition meanwhile, and a second process computes
    while the first decodes (on 2 cores, 2 × 1 featurizes faster than 1 × 2: docs/performance.md).
    With GPUs, each process drives its own GPU and its threads decode for it. `cores` and `memory`
    default to this machine's as a container sees them: its CPU affinity and quota (dask's
    cpu_count), its cgroup's memory limit.
    """
    cores = cores or dask.system.cpu_count()
    memory = memory or MEMORY_LIMIT
    gpus = local_gpus() if gpus is None else gpus
    n_workers = n_workers or gpus or max(1, min(max(2, cores // 4), cores, memory // MEMORY_PER_PROCESS))
    return n_workers, threads_per_worker or max(1, cores // n_workers)


def local_gpus() -> int:
    """NVIDIA GPUs this machine's processes may use, found without starting a backend."""
    return len(visible_gpus())


def size(client: Client) -> dict[str, int]:
    """The cluster's worker processes and their threads in all, for the manifest (a plan's rate per worker)."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return {"workers": len(workers), "threads": sum(worker["nthreads"] for worker in workers)}


def featurize_resources(client: Client, gpu: str | bool) -> dict | None:
    """The worker resources featurize tasks ask for: a GPU share, or None to run anywhere.

    gpu "auto": on the workers that declare a GPU resource when any does; True: only there;
    False: anywhere.
    """
    if gpu is False:
        return None
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    with_gpu = [w for w in workers if w.get("resources", {}).get("GPU", 0) > 0]
    if gpu is True and workers and not with_gpu:
        raise UsageError(
            "`gpu` is true but no worker of the cluster declares a GPU: start GPU workers with "
            "`dask worker --resources GPU=1`, or use --gpu auto"
        )
    return {"GPU": FEATURIZE_GPU_SHARE} if gpu is True or with_gpu else None
