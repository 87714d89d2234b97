"""Images in a bucket → CNN features → exact PCA → parquet, on a Dask cluster."""
from .config import Settings, UsageError, settings
from .job import run
from .incremental import update

__all__ = ["Settings", "UsageError", "run", "settings", "update"]
