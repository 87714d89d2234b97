"""Weights from elsewhere: remote files cached per user and per version of the object, ImageNet's checked by hash."""
import hashlib
import http.server
import os
import threading

import pytest

from pipeline.making import featurize


def test_a_remote_weights_file_is_cached_in_the_users_cache_per_version_of_the_object(s3, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    options = {"endpoint_url": s3_endpoint}
    s3.pipe_file("fruits/weights.h5", b"first version")
    first = featurize.local_weights_file("s3://fruits/weights.h5", options)
    assert first.startswith(str(tmp_path / "cache" / "fruits-pipeline" / "weights")) and open(first, "rb").read() == b"first version"
    assert os.stat(os.path.dirname(first)).st_mode & 0o077 == 0  # this user's alone
    copied = os.stat(first).st_mtime_ns
    assert featurize.local_weights_file("s3://fruits/weights.h5", options) == first and os.stat(first).st_mtime_ns == copied

    s3.pipe_file("fruits/weights.h5", b"second version")  # replaced under the same URL: another ETag
    second = featurize.local_weights_file("s3://fruits/weights.h5", options)
    assert second != first and open(second, "rb").read() == b"second version"
    assert featurize.local_weights_file(str(tmp_path / "here.h5"), {}) == str(tmp_path / "here.h5")  # a local file as it is


@pytest.fixture
def imagenet_server(monkeypatch, tmp_path):
    """A loopback server in place of Keras' weights bucket, serving `served["body"]` for every file."""
    served = {"body": b""}

    class Weights(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(served["body"])

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Weights)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(featurize, "KERAS_APPLICATIONS", f"http://127.0.0.1:{server.server_port}/")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    yield served
    server.shutdown()


def test_imagenet_weights_that_differ_from_the_published_hash_are_not_kept(imagenet_server, monkeypatch):
    imagenet_server["body"] = b"not resnet50's weights"
    with pytest.raises(OSError, match="the downloaded ImageNet weights of resnet50 have MD5 .*, not the published 4d473c1d"):
        featurize.download_imagenet_weights("resnet50")
    assert not os.path.exists(featurize.keras_cache_file("resnet50")) and os.listdir(os.path.dirname(featurize.keras_cache_file("resnet50"))) == []
    weights = featurize.resolve_weights("resnet50", "auto", 0, {})  # auto: random weights, and why
    assert weights.used == "random" and weights.warning.startswith("no ImageNet weights (OSError)")

    published = b"what the published hash is made of, here"
    monkeypatch.setitem(featurize.IMAGENET_MD5, "resnet50", hashlib.md5(published).hexdigest())
    imagenet_server["body"] = published
    featurize.download_imagenet_weights("resnet50")
    assert open(featurize.keras_cache_file("resnet50"), "rb").read() == published
