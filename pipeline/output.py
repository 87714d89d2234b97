"""The output's life cycle: new, interrupted, finished; what finishing an interrupted command needs; the commit.

    new          nothing of the pipeline's there (or --overwrite): a run stages afresh
    interrupted  _staging/run.json: a run or an update that did not finish; `run --resume` or the
                 same `update` again finishes it, with the settings and listing it recorded
    finished     manifest.json: what report, evaluate, recognize and update read

An earlier version stays whole until the new one is committed (sink.commit: the manifest last).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Iterator

import pandas as pd
import pyarrow as pa

from . import source
from .making import featurize, listings, sink
from .config import Settings, UsageError

# What decides a run's rows and features: an interrupted run resumes only with the same, and an
# update keeps the output's own. The backend is not among them: it is where features are computed,
# like the cluster, and every backend's agree within featurize.FEATURE_TOLERANCE.
RESUME_KEYS = ("input", "input_prefix", "extensions", "images_per_partition", "max_image_pixels", "model", "image_size",
               "batch_size", "weights", "seed")


@dataclasses.dataclass(frozen=True)
class Output:
    """An output folder or prefix: its filesystem, its path there, and its URL as the user is shown it."""

    fs: object
    path: str
    url: str

    @classmethod
    def at(cls, url: str, storage_options: dict) -> "Output":
        fs, path = source.open_url(url, storage_options)
        return cls(fs, path, source.full_url(fs, path))

    def __truediv__(self, name: str) -> str:
        """The path of `name` (such as sink.MANIFEST or f"{sink.STAGING}/{sink.PCA}") in this output."""
        return f"{self.path}/{name}"

    def holds(self, name: str) -> bool:
        return sink.exists(self.fs, self.path, name)

    def state(self, resume: bool, overwrite: bool) -> str:
        """For `run`: "new", "resume" or "complete"; an output that holds something else is refused, never mixed."""
        with errors(self.url):
            interrupted, complete = self.holds(sink.RUN), self.holds(sink.MANIFEST)
            if resume and interrupted:
                return "resume"
            if resume and complete:
                return "complete"
            if not overwrite and interrupted:
                raise UsageError(f"{self.url} already holds an interrupted run: pass --resume to finish it, "
                                 "--overwrite to replace it, or choose another --output")
            if not overwrite and (complete or any(self.holds(name) for name in sink.FINAL)):
                raise UsageError(f"{self.url} already holds a finished output: pass --overwrite to replace it, use "
                                 f"`python -m pipeline update --output {self.url}` to bring it up to date, or choose another --output")
            sink.remove(self.fs, self.path, sink.STAGING)  # an earlier output stays until this run commits
            return "new"

    def check_writable(self) -> None:
        """Fail before any work if the output cannot be written."""
        probe = self / f"{sink.STAGING}/.write-test"
        with errors(self.url):
            sink.make_folder(self.fs, self / sink.STAGING)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)

    def save_plan(self, s: Settings, listing: source.Listing, weights: featurize.Weights, **about) -> None:
        """Record what finishing this command needs: its settings, weights and listing.

        `about`: the command ("run" or "update") and, for an update, the version it started from.
        """
        plan = {"settings": resume_settings(s), "weights": dataclasses.asdict(weights), "skipped": listing.skipped} | about
        if isinstance(listing, listings.Spread):  # read again by the workers: the inventory's version is kept
            plan["listing"] = {"kind": listing.kind, "version": listing.version}
        else:
            sink.write_arrow(self.fs, self / sink.LISTING, pa.Table.from_pandas(listing.rows, preserve_index=False))
        sink.write_json(self.fs, self / sink.RUN, plan)

    def resume_plan(self, s: Settings, command: str = "run") -> tuple[source.Listing | listings.Spread, featurize.Weights]:
        """The listing and weights of the interrupted `command` here, if it had the same settings as `s`."""
        plan = sink.read_json(self.fs, self / sink.RUN)
        if plan.get("command", "run") != command:
            raise UsageError(
                f"{self.url} holds an interrupted {plan['command']}: finish it with `python -m pipeline {plan['command']}"
                f"{' --resume' if plan['command'] == 'run' else ''} --output {self.url}`, or delete "
                f"{self.url}/{sink.STAGING} to give it up"
            )
        now = resume_settings(s)
        changed = [f"{key} {plan['settings'][key]!r} there, {now[key]!r} now" for key in now if plan["settings"].get(key) != now[key]]
        if changed:
            again = "pass --overwrite to start again" if command == "run" else f"delete {self.url}/{sink.STAGING} to give it up"
            raise UsageError(
                f"the interrupted {command} in {self.url} had other settings ({'; '.join(changed)}): finish it with "
                f"the same settings, or {again}"
            )
        if plan.get("listing", {}).get("kind") == "prefix":  # its partitions.json says what the workers listed
            return listings.open_prefix(s.input, s.storage_options, s.extensions), featurize.Weights(**plan["weights"])
        if "listing" in plan:
            spread = listings.open_listing(s.input, s.storage_options, s.extensions, s.input_prefix)
            if spread.version != plan["listing"]["version"]:
                raise UsageError(f"{s.input} has changed since the interrupted {command} in {self.url} began: delete "
                                 f"{self.url}/{sink.STAGING} to give it up{', or pass --overwrite' if command == 'run' else ''}")
            return spread, featurize.Weights(**plan["weights"])
        listing_fs, root = source.open_url(s.input, s.storage_options)
        if not self.holds(sink.LISTING):
            raise UsageError(f"the interrupted {command} in {self.url} was made by an earlier version of the pipeline: "
                             f"delete {self.url}/{sink.STAGING} and start it again")
        rows = sink.read_arrow(self.fs, self / sink.LISTING).to_pandas(types_mapper=pd.ArrowDtype)
        return source.Listing(listing_fs, root, rows, plan["skipped"]), featurize.Weights(**plan["weights"])

    def manifest(self) -> dict:
        """The manifest of the finished output here, or a usage error that says what to give instead."""
        try:
            return sink.read_json(self.fs, self / sink.MANIFEST)
        except FileNotFoundError:
            if self.holds(sink.STAGING):
                raise UsageError(f"{self.url} holds an unfinished run: finish it with `python -m pipeline run --resume "
                                 f"--output {self.url}` and the same options") from None
            raise UsageError(f"no {sink.MANIFEST} in {self.url}: give the --output of a finished `pipeline run`") from None
        except Exception as error:  # each storage backend fails its own way (no credentials, no endpoint...)
            raise UsageError(f"cannot read output {self.url}: {type(error).__name__}: {error}") from None

    def parts(self, table: str = sink.IMAGES) -> Iterator[tuple[str, pa.Table]]:
        """The finished output's part files one by one, in name order: each name and its path and identity columns.

        One at a time, so that an update need not hold a million rows (sink.partitions' order: by path).
        """
        self.fs.invalidate_cache(self.path)  # an earlier command in this process may have listed an older version
        for path in sorted(self.fs.find(self / table)):
            with self.earlier_version():
                table = sink.read_parquet(self.fs, path, columns=["path", "identity"])
            yield path.rsplit("/", 1)[1], table

    def errors(self) -> pd.DataFrame:
        """The finished output's errors table, in Arrow strings."""
        with self.earlier_version():
            return sink.read_parquet(self.fs, self / sink.ERRORS, columns=sink.ERROR_COLUMNS).to_pandas(types_mapper=pd.ArrowDtype)

    @contextlib.contextmanager
    def earlier_version(self):
        """A file without the columns an update needs: say that the output must be made again."""
        try:
            yield
        except (KeyError, pa.ArrowInvalid):  # no identity column: an output of an earlier version
            raise UsageError(f"{self.url} was written by an earlier version of the pipeline, without image "
                             "identities: make it again with `python -m pipeline run --overwrite`") from None

    def commit(self, manifest: dict) -> None:
        """Replace the previous version by the staged one; the manifest, written last, marks it finished."""
        sink.commit(self.fs, self.path, manifest)


def resume_settings(s: Settings) -> dict:
    """The settings that decide a run's rows and features, as JSON data."""
    return json.loads(json.dumps({key: getattr(s, key) for key in RESUME_KEYS}))


@contextlib.contextmanager
def errors(url: str):
    """Turn any failure to use the output into one usage error that says what to do."""
    try:
        yield
    except UsageError:
        raise
    except Exception as error:  # each storage backend fails its own way (no credentials, read-only...)
        raise UsageError(
            f"cannot write to output {url}: {type(error).__name__}: {error}; choose a writable folder or bucket"
        ) from None
