"""Where the images come from: one flat listing on the client, byte reads on the workers."""
from __future__ import annotations

import dataclasses
import posixpath

import fsspec
import pandas as pd
import pyarrow as pa
from fsspec.spec import AbstractFileSystem

from .config import UsageError

SPLITS = {"training": "Training", "test": "Test"}


@dataclasses.dataclass(frozen=True)
class Listing:
    """The images under an input prefix, sorted by path, and how many other files were skipped."""

    fs: AbstractFileSystem
    root: str
    rows: pd.DataFrame  # path (relative to root), label, split, identity
    skipped: int


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


def list_images(url: str, storage_options: dict, extensions: tuple[str, ...]) -> Listing:
    """List every image under `url` in one flat listing; label = parent folder, split = Training/Test.

    Folder by folder, keeping only each image's path, label, split and identity in Arrow strings
    (some 100 bytes an image): a million images list in about 100 MB, not in every file's details.
    The split comes from a folder under `url`, or else from the input folder's own name.
    """
    fs, root = open_url(url, storage_options)
    root_split = SPLITS.get(posixpath.basename(root).lower())  # --input …/Training: its images are Training's
    chunks, files, skipped = [], 0, 0
    try:
        for folder, _, found in (fs.walk(root, detail=True) if fs.isdir(root) else ()):
            folder = folder.rstrip("/")[len(root) + 1 :]
            names = sorted(name for name in found if is_image(name, extensions))
            files, skipped = files + len(found), skipped + len(found) - len(names)
            if names:
                chunks.append(folder_rows(folder, names, [identity(found[name]) for name in names], root_split))
            fs.invalidate_cache(f"{root}/{folder}")  # an object store's listing cache would hold every file's details
    except Exception as error:  # each storage backend fails its own way (no credentials, no endpoint...)
        raise UsageError(f"cannot list input {url}: {type(error).__name__}: {error}") from None
    if not files:
        raise UsageError(f"input {url} does not exist or holds no files: give a folder or prefix of images")
    if not chunks:
        raise UsageError(f"no images under {url}: {files} files, none ending in .{', .'.join(extensions)}")
    rows = pa.concat_tables(chunks).sort_by("path").to_pandas(types_mapper=pd.ArrowDtype)
    return Listing(fs=fs, root=root, rows=rows, skipped=skipped)


def folder_rows(folder: str, names: list[str], identities: list[str], root_split: str | None) -> pa.Table:
    """The listing's rows of one folder's images: they share their label and split."""
    label, split = label_and_split(posixpath.join(folder, names[0]), root_split)
    return pa.table({
        "path": pa.array([posixpath.join(folder, name) for name in names], pa.string()),
        "label": pa.array([label] * len(names), pa.string()),
        "split": pa.array([split] * len(names), pa.string()),
        "identity": pa.array(identities, pa.string()),
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


def read_many(fs: AbstractFileSystem, paths: list[str]) -> list[bytes | Exception]:
    """The bytes of each path, read concurrently where the filesystem can; a failure is returned, not raised."""
    return fs.cat_ranges(list(paths), None, None, on_error="return")
