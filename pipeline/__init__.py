"""Images in a bucket → CNN features → exact PCA → parquet, on a Dask cluster."""
import logging

# Now and then distributed cannot size a message it is about to send (a dict of its own that its
# threads change meanwhile), sends it all the same and says so: nothing the user can act on.
# Set in every process that imports the pipeline: the client and each worker.
logging.getLogger("distributed.sizeof").setLevel(logging.ERROR)

from .config import Settings, UsageError, settings
from .job import run
from .incremental import update

__all__ = ["Settings", "UsageError", "run", "settings", "update"]
