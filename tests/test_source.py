"""Listing: one flat listing, images by extension, label = parent folder as it is, split from the layout."""
import hashlib

import fsspec

import pytest

from pipeline.config import UsageError
from pipeline.source import FileTooLarge, label_and_split, list_images, read_many

EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff")


def make_files(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_labels_keep_spaces_and_unicode_and_splits_come_from_the_layout(tmp_path):
    make_files(tmp_path, ["Training/Apple Red 1/a.jpg", "Test/Pomme à cidre/b.JPG", "loose/Kiwi/c.png", "top.jpeg"])
    rows = list_images(str(tmp_path), {}, EXTENSIONS).rows
    rows = rows.astype(object).where(rows.notna(), None).drop(columns="identity")
    assert rows.to_dict("records") == [
        {"path": "Test/Pomme à cidre/b.JPG", "label": "Pomme à cidre", "split": "Test"},
        {"path": "Training/Apple Red 1/a.jpg", "label": "Apple Red 1", "split": "Training"},
        {"path": "loose/Kiwi/c.png", "label": "Kiwi", "split": None},
        {"path": "top.jpeg", "label": "", "split": None},
    ]


def test_an_input_folder_named_training_or_test_gives_its_images_that_split(tmp_path):
    make_files(tmp_path, ["Training/Apple Red 1/a.jpg", "Test/Apple Red 1/b.jpg"])
    for split in ("Training", "Test"):
        rows = list_images(str(tmp_path / split), {}, EXTENSIONS).rows
        assert rows[["path", "label", "split"]].values.tolist() == [[f"Apple Red 1/{'a' if split == 'Training' else 'b'}.jpg", "Apple Red 1", split]]


def test_extensions_are_case_insensitive_and_other_files_are_counted(tmp_path):
    make_files(tmp_path, ["a/1.JPG", "a/2.Tiff", "a/3.webp", "a/4.BMP", "a/notes.txt", "a/.DS_Store", "a/5.gif"])
    listing = list_images(f"file://{tmp_path}", {}, EXTENSIONS)
    assert list(listing.rows.path) == ["a/1.JPG", "a/2.Tiff", "a/3.webp", "a/4.BMP"]
    assert listing.skipped == 3


def test_a_missing_input_a_file_and_an_empty_folder_are_usage_errors_each_saying_which(tmp_path):
    with pytest.raises(UsageError, match=f"^input {tmp_path}/nowhere does not exist: give a folder or prefix of images$"):
        list_images(str(tmp_path / "nowhere"), {}, EXTENSIONS)
    make_files(tmp_path, ["photo.jpg"])
    with pytest.raises(UsageError, match=r"photo.jpg is a file, not a folder \(nor an inventory or listing file\): give the"):
        list_images(str(tmp_path / "photo.jpg"), {}, EXTENSIONS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="empty is an empty folder: put images in it"):
        list_images(str(tmp_path / "empty"), {}, EXTENSIONS)


def test_images_directly_under_the_input_have_an_empty_label(tmp_path):
    make_files(tmp_path, ["a.jpg", "Apple/b.jpg"])
    rows = list_images(str(tmp_path), {}, EXTENSIONS).rows
    assert rows[["path", "label"]].values.tolist() == [["Apple/b.jpg", "Apple"], ["a.jpg", ""]]  # as the README says


def test_a_prefix_without_images_is_a_usage_error(tmp_path):
    make_files(tmp_path, ["docs/readme.txt"])
    with pytest.raises(UsageError, match="no images"):
        list_images(str(tmp_path), {}, EXTENSIONS)


def test_split_names_match_whole_folders_only():
    assert label_and_split("Testing/Apple/a.jpg") == ("Apple", None)
    assert label_and_split("data/training/Apple/a.jpg") == ("Apple", "Training")


def test_s3_listing_equals_the_local_listing(s3, s3_endpoint, sample_copy):
    s3.put(str(sample_copy) + "/", "fruits/copy/", recursive=True)
    remote = list_images("s3://fruits/copy", {"endpoint_url": s3_endpoint}, EXTENSIONS)
    local = list_images(str(sample_copy), {}, EXTENSIONS)
    columns = ["path", "label", "split"]
    assert remote.rows[columns].equals(local.rows[columns])
    assert any(" " in label for label in remote.rows.label)
    first = remote.rows.iloc[0]
    assert first.identity == hashlib.md5((sample_copy / first.path).read_bytes()).hexdigest()  # the ETag


NESTED = ["a/b.jpg", "a/b c/x.jpg", "a/b/y.jpg", "a/b-z.jpg", "a b/z.jpg", "a.jpg", "a/é.jpg", "a/z.jpg", "a0/w.jpg"]


def test_the_listing_is_in_path_order_where_files_and_folders_sit_side_by_side(tmp_path, s3, s3_endpoint):
    make_files(tmp_path, NESTED)
    s3.put(str(tmp_path) + "/", "fruits/nested/", recursive=True)
    for url, options in [(str(tmp_path), {}), ("s3://fruits/nested", {"endpoint_url": s3_endpoint})]:
        assert list(list_images(url, options, EXTENSIONS).rows.path) == sorted(NESTED, key=str.encode), url


def test_identity_changes_when_a_file_is_replaced_under_the_same_name(tmp_path):
    make_files(tmp_path, ["Apple/a.jpg", "Apple/b.jpg"])
    before = list_images(str(tmp_path), {}, EXTENSIONS).rows.set_index("path").identity
    (tmp_path / "Apple/a.jpg").write_bytes(b"another photo")
    after = list_images(str(tmp_path), {}, EXTENSIONS).rows.set_index("path").identity
    assert before["Apple/a.jpg"] != after["Apple/a.jpg"] and before["Apple/b.jpg"] == after["Apple/b.jpg"]


def test_reads_return_failures_in_place_instead_of_raising(s3, s3_endpoint):
    listing = list_images("s3://fruits/fruits-360", {"endpoint_url": s3_endpoint}, EXTENSIONS)
    first = f"{listing.root}/{listing.rows.path[0]}"
    blobs = read_many(listing.fs, [first, f"{listing.root}/gone.jpg"])
    assert blobs[0][:2] == b"\xff\xd8"  # a JPEG
    assert isinstance(blobs[1], FileNotFoundError)


def test_a_file_over_max_bytes_is_returned_as_too_large_and_read_no_further(s3, s3_endpoint, tmp_path):
    with open(tmp_path / "huge.jpg", "wb") as huge:
        huge.truncate(10**9)  # a 1 GB object named like a photo (sparse: no disk used)
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8" + b"x" * 998)  # exactly the limit: read
    s3.pipe_file("fruits/huge.jpg", b"x" * 1001)
    s3.pipe_file("fruits/photo.jpg", b"x" * 1000)
    fs = fsspec.filesystem("file")
    local = read_many(fs, [str(tmp_path / "huge.jpg"), str(tmp_path / "photo.jpg")], max_bytes=1000)
    remote = read_many(s3, ["fruits/huge.jpg", "fruits/photo.jpg"], max_bytes=1000)
    for too_large, photo in (local, remote):
        assert isinstance(too_large, FileTooLarge) and isinstance(too_large, OSError)
        assert str(too_large) == "more than 1,000 bytes (setting max-image-bytes): not read; raise it if this image is expected"
        assert len(photo) == 1000
