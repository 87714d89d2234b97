"""How a run gets its Dask cluster: a LocalCluster sized for this machine, or a running scheduler."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from distributed import Client, LocalCluster

from pipeline.config import UsageError

SCHEDULER_PROTOCOLS = ("tcp://", "tls://", "ucx://", "inproc://")


@contextlib.contextmanager
def connect(address: str, local: dict) -> Iterator[Client]:
    """A client of the cluster `address` names ("local" or "tcp://host:port"), closed on the way out."""
    check_address(address)
    if address == "local":
        n_workers, threads = local_size(local.get("n-workers"), local.get("threads-per-worker"))
        with LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads,
            processes=True,
            dashboard_address=local.get("dashboard-address", ":8787"),
        ) as cluster, Client(cluster) as client:
            yield client
    else:
        try:
            client = Client(address)  # waits distributed.comm.timeouts.connect (30 s by default)
        except (OSError, TimeoutError) as error:
            raise UsageError(f"cannot reach the Dask scheduler at {address}: {error}") from None
        with client:
            yield client


def check_address(address: str) -> None:
    """Fail early, before any work, on a cluster setting that names no known kind of cluster."""
    if address != "local" and not address.startswith(SCHEDULER_PROTOCOLS):
        raise UsageError(f"unknown cluster {address!r}: use 'local' or a scheduler address tcp://host:8786")


def local_size(n_workers: int | None, threads_per_worker: int | None) -> tuple[int, int]:
    """Worker processes and threads for this machine: one process per 4 cores, the cores shared out.

    Each process holds one copy of the model and runs one inference at a time on all its threads;
    its other threads read and decode the next partition meanwhile.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n_workers = n_workers or max(1, cores // 4)
    return n_workers, threads_per_worker or max(1, cores // n_workers)
