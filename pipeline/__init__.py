"""Images in a bucket → CNN features → exact PCA → parquet, on a Dask cluster."""
import contextlib
import logging

import pyarrow as pa

# Arrow's default allocator, mimalloc, keeps much of what a process has freed: an update's client
# that reads a million rows from 3,907 files peaked 90 MB higher with it than with jemalloc, and
# read them three times slower (docs/scale.md). Where the build has no jemalloc, the default stays.
with contextlib.suppress(NotImplementedError):
    pa.set_memory_pool(pa.jemalloc_memory_pool())

# Now and then distributed cannot size a message it is about to send (a dict of its own that its
# threads change meanwhile), sends it all the same and says so: nothing the user can act on.
# Set in every process that imports the pipeline: the client and each worker.
logging.getLogger("distributed.sizeof").setLevel(logging.ERROR)

from .config import Settings, UsageError, settings
from .making.job import run
from .making.incremental import update

__all__ = ["Settings", "UsageError", "run", "settings", "update"]
