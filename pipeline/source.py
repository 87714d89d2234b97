"""Where the images come from: one flat listing on the client, byte reads on the workers."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import posixpath
from typing import Iterator

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.spec import AbstractFileSystem

from .config import UsageError

SPLITS = {"training": "Training", "test": "Test"}


@dataclasses.dataclass(frozen=True)
class Listing:
    """The images under an input prefix, sorted by path, and how many other files were skipped."""

    fs: AbstractFileSystem
    root: str
    rows: pd.DataFrame  # path (relative to root), label, split, identity; Arrow strings (label and split dictionary-encoded)
    skipped: int

    @property
    def estimate(self) -> int:
        """How many images (what `images-per-partition: auto` grows with)."""
        return len(self.rows)


def open_url(url: str, storage_options: dict) -> tuple[AbstractFileSystem, str]:
    """The filesystem and its path for an fsspec URL or local folder."""
    options = dict(storage_options)
    if url.startswith(("s3://", "s3a://")):
        # s3fs sends a HEAD before every GET when max_concurrency > 1: for many small images, one
        # request per object (and many objects at once) is faster.
        options.setdefault("max_concurrency", 1)
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path.rstrip("/")


def is_local(fs: AbstractFileSystem) -> bool:
    """True for this machine's filesystem (paths only this machine's processes see)."""
    return "file" in fs.protocol


def full_url(fs: AbstractFileSystem, path: str) -> str:
    """How to show a location to the user: an absolute local path, or a URL with its protocol."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def real_location(fs: AbstractFileSystem, path: str) -> tuple[str, str]:
    """Where a path really is, to tell whether two spellings name the same place: its filesystem's
    protocol, and its path (a local one absolute, with links resolved)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol, os.path.realpath(path) if is_local(fs) else path.rstrip("/")


def list_images(url: str, storage_options: dict, extensions: tuple[str, ...]) -> Listing:
    """List every image under `url` in one flat listing; label = parent folder, split = Training/Test.

    Folder by folder in path order (see `images_in_order`), keeping only each image's path and
    identity in Arrow strings, its label and split as numbers (some 80 bytes an image): a million
    images list in about 80 MB, with no file's details kept and no sort's copy.
    The split comes from a folder under `url`, or else from the input folder's own name.
    """
    fs, root = open_url(url, storage_options)
    root_split = SPLITS.get(posixpath.basename(root).lower())  # --input …/Training: its images are Training's
    chunks, skipped = [], 0
    try:
        folder = fs.isdir(root)
        for folder_path, images, others in (images_in_order(fs, root, extensions) if folder else ()):
            skipped += others
            if len(images):
                chunks.append(folder_rows(folder_path, images, root_split))
        missing = not folder and not fs.exists(root)
    except Exception as error:  # each storage backend fails its own way (no credentials, no endpoint...)
        raise UsageError(f"cannot list input {url}: {type(error).__name__}: {error}") from None
    if missing:
        raise UsageError(f"input {url} does not exist: give a folder or prefix of images")
    if not folder:
        raise UsageError(f"input {url} is a file, not a folder (nor an inventory or listing file): "
                         "give the folder or prefix of images it is in")
    if not chunks and not skipped:
        raise UsageError(f"input {url} is an empty folder: put images in it (a folder per label), or give another --input")
    if not chunks:
        raise UsageError(f"no images under {url}: {skipped} files, none ending in .{', .'.join(extensions)}")
    rows = pa.concat_tables(chunks).to_pandas(types_mapper=pd.ArrowDtype)
    return Listing(fs=fs, root=root, rows=rows, skipped=skipped)


def images_in_order(fs: AbstractFileSystem, root: str, extensions: tuple[str, ...],
                    folder: str = "") -> Iterator[tuple[str, pa.Table, int]]:
    """(folder, some of its images' name and identity, other files) runs under `root`, in path order.

    A folder's entries sorted by name, a subfolder's as "name/", sort as their paths do: so a walk
    that descends into each subfolder in its place lists every path in order, holding the entries
    of one folder (and its parents) at a time. A folder's last run (perhaps of no image) counts
    the other files it holds.
    """
    found, others = entries(fs, f"{root}/{folder}" if folder else root, extensions)
    found, start = found.sort_by("name"), 0
    for at in np.flatnonzero(found["identity"].is_null()):  # a subfolder: its images come here, in between
        if at > start:
            yield folder, found.slice(start, at - start), 0
        yield from images_in_order(fs, root, extensions, posixpath.join(folder, found["name"][at].as_py()[:-1]))
        start = at + 1
    yield folder, found.slice(start), others


def entries(fs: AbstractFileSystem, path: str, extensions: tuple[str, ...]) -> tuple[pa.Table, int]:
    """A folder's images (name, identity) and subfolders ("name/", null), and how many other files it holds.

    A local folder is read with os.scandir, as fsspec does, but without a dict of details per file.
    """
    names, identities, others = [], [], 0
    if is_local(fs):
        with os.scandir(path) as folder:
            for entry in folder:
                with contextlib.suppress(FileNotFoundError):  # deleted while listed
                    if entry.is_dir(follow_symlinks=False):
                        names.append(f"{entry.name}/"), identities.append(None)
                    elif is_image(entry.name, extensions):
                        names.append(entry.name), identities.append(local_identity(entry))
                    else:
                        others += 1
    else:
        for info in fs.ls(path, detail=True):
            name = posixpath.basename(info["name"].rstrip("/"))
            if info["type"] == "directory":
                names.append(f"{name}/"), identities.append(None)
            elif is_image(name, extensions):
                names.append(name), identities.append(identity(info))
            else:
                others += 1
        fs.invalidate_cache(path)  # an object store's listing cache would hold every file's details
    return pa.table({"name": pa.array(names, pa.string()), "identity": pa.array(identities, pa.string())}), others


def local_identity(entry: os.DirEntry) -> str:
    """identity() of a local file, as from fsspec's details: size (a link's target's) and mtime (the link's own)."""
    own = entry.stat(follow_symlinks=False)
    size = own.st_size
    if entry.is_symlink():
        try:
            size = entry.stat().st_size
        except OSError:
            size = 0
    return f"{size}@{own.st_mtime}"


def folder_rows(folder: str, images: pa.Table, root_split: str | None) -> pa.Table:
    """The listing's rows of some of one folder's images (name, identity): they share their label and split."""
    label, split = label_and_split(posixpath.join(folder, images["name"][0].as_py()), root_split)
    n = len(images)
    return pa.table({
        "path": pc.binary_join_element_wise(folder, images["name"], "/") if folder else images["name"],
        "label": pa.repeat(pa.scalar(label, pa.string()), n).dictionary_encode(),  # a number an image, not a name
        "split": pa.repeat(pa.scalar(split, pa.string()), n).dictionary_encode(),
        "identity": images["identity"],
    })


def identity(info: dict) -> str:
    """What tells one version of an object from the next: its ETag where the store gives one, else size and mtime.

    `update` redoes an image whose identity changed (an object replaced under the same name).
    """
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    modified = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or ""
    return f"{info.get('size')}@{modified}"


def is_image(path: str, extensions: tuple[str, ...]) -> bool:
    """True if the file name ends in one of `extensions`, whatever its case."""
    return posixpath.splitext(path)[1].lower().lstrip(".") in extensions


def label_and_split(path: str, root_split: str | None = None) -> tuple[str, str | None]:
    """The parent folder's name as it is (spaces, unicode), and Training/Test when a folder says so.

    `root_split`: the split the input folder itself names, for paths whose own folders name none.
    """
    folders = path.split("/")[:-1]
    split = next((SPLITS[f.lower()] for f in folders if f.lower() in SPLITS), root_split)
    return (folders[-1] if folders else ""), split


class FileTooLarge(OSError):
    """A file larger than the `max-image-bytes` setting: recorded as an error (stage read), not read whole."""


def read_many(fs: AbstractFileSystem, paths: list[str], max_bytes: int | None = None) -> list[bytes | Exception]:
    """The bytes of each path, read concurrently where the filesystem can; a failure is returned, not raised.

    With `max_bytes`, at most max_bytes + 1 of each file are read (one ranged read): a larger file
    is returned as FileTooLarge, so that a multi-GB object never fills the reader's memory.
    """
    paths = list(paths)
    if max_bytes is None:
        return fs.cat_ranges(paths, None, None, on_error="return")
    blobs = fs.cat_ranges(paths, [0] * len(paths), [max_bytes + 1] * len(paths), on_error="return")
    return [within_limit(fs, path, blob, max_bytes) for path, blob in zip(paths, blobs)]


def within_limit(fs: AbstractFileSystem, path: str, blob: bytes | Exception, max_bytes: int) -> bytes | Exception:
    """A ranged read's result: FileTooLarge past the limit; an empty object's bytes where S3 refused its range."""
    if isinstance(blob, bytes):
        return blob if len(blob) <= max_bytes else FileTooLarge(
            f"more than {max_bytes:,} bytes (setting max-image-bytes): not read; raise it if this image is expected")
    if isinstance(blob, OSError) and "range" in str(blob).lower():  # S3 answers 416 for any range of an empty object
        try:
            return b"" if fs.size(path) == 0 else blob
        except OSError:
            return blob
    return blob
