"""How a run gets its cluster: sizing a LocalCluster, and refusing what names no cluster."""
import os

import dask.config
import pytest

import cluster
from pipeline.config import UsageError


def test_a_local_cluster_shares_the_cores_among_its_processes():
    cores = len(os.sched_getaffinity(0))
    n_workers, threads = cluster.local_size(None, None)
    assert n_workers == max(1, cores // 4) and n_workers * threads <= max(cores, n_workers)
    assert cluster.local_size(2, None) == (2, max(1, cores // 2))
    assert cluster.local_size(3, 5) == (3, 5)


@pytest.mark.parametrize("address", ["local", "tcp://10.0.0.5:8786", "tls://scheduler:8786"])
def test_known_cluster_addresses_are_accepted(address):
    cluster.check_address(address)


@pytest.mark.parametrize("address", ["yarn", "10.0.0.5:8786", ""])
def test_anything_else_is_a_usage_error(address):
    with pytest.raises(UsageError, match="unknown cluster"):
        cluster.check_address(address)


def test_an_unreachable_scheduler_is_a_usage_error_that_names_it():
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        with pytest.raises(UsageError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
            with cluster.connect("tcp://127.0.0.1:9", {}):
                pass
