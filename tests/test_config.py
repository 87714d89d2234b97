"""Settings come from pipeline.yaml, then DASK_PIPELINE__* variables, then explicit flags."""
import dask.config
import pytest

from pipeline.making import job, sink
from pipeline.config import SAMPLE_DIR, UsageError, is_secret, masked, parse_n_components, settings


def test_defaults_come_from_the_yaml():
    s = settings()
    assert s.model == "mobilenet_v2" and s.n_components == 0.95 and s.image_size == 224
    assert s.input == str(SAMPLE_DIR)  # "sample" means the images shipped with the package


def test_environment_overrides_yaml_and_flags_override_environment(monkeypatch):
    monkeypatch.setenv("DASK_PIPELINE__MODEL", "resnet50")
    monkeypatch.setenv("DASK_PIPELINE__BATCH_SIZE", "8")
    dask.config.refresh()  # what importing dask does in a new process
    try:
        assert settings().model == "resnet50"
        assert settings().batch_size == 8
        assert settings(model="mobilenet_v2").model == "mobilenet_v2"
    finally:
        monkeypatch.undo()
        dask.config.refresh()


def test_environment_overrides_nested_settings_too(monkeypatch):
    monkeypatch.setenv("DASK_PIPELINE__LOCAL_CLUSTER__DASHBOARD_ADDRESS", "127.0.0.1:0")
    monkeypatch.setenv("DASK_PIPELINE__LOCAL_CLUSTER__N_WORKERS", "2")
    dask.config.refresh()
    try:
        assert settings().local_cluster == {"dashboard-address": "127.0.0.1:0", "n-workers": 2, "threads-per-worker": None}
    finally:
        monkeypatch.undo()
        dask.config.refresh()


@pytest.mark.parametrize("given, expected", [(50, 50), ("50", 50), (0.95, 0.95), ("0.95", 0.95), ("1.0", 1.0), (1, 1)])
def test_n_components_is_a_count_or_a_fraction_of_variance(given, expected):
    assert parse_n_components(given) == expected
    assert type(parse_n_components(given)) is type(expected)


@pytest.mark.parametrize("given", [0, "0", -3, 1.5, "0.0", "many", None])
def test_n_components_out_of_range_is_a_usage_error(given):
    with pytest.raises(UsageError, match="n-components"):
        parse_n_components(given)


@pytest.mark.parametrize("name, value", [("batch_size", 0), ("image_size", "big"), ("images_per_partition", -1)])
def test_sizes_must_be_positive_integers(name, value):
    with pytest.raises(UsageError, match=name.replace("_", "-")):
        settings(**{name: value})


def test_credentials_are_masked_at_any_depth_and_in_urls():
    options = {"key": "AKIAFAKE", "anon": False, "endpoint_url": "http://127.0.0.1:9000",
               "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": "FAKETOKEN"},
               "config_kwargs": {"retries": {"max_attempts": 3}, "proxies_config": {"proxy_client_cert": "x", "password": "p"}}}
    assert masked(options) == {"key": "***", "anon": False, "endpoint_url": "http://127.0.0.1:9000",
                               "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": "***"},
                               "config_kwargs": {"retries": {"max_attempts": 3}, "proxies_config": {"proxy_client_cert": "x", "password": "***"}}}
    presigned = ("https://fruits.s3.amazonaws.com/w.h5?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAFAKE%2F20261204"
                 "&X-Amz-Date=20261204T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=0123abcd"
                 "&X-Amz-Security-Token=FAKETOKEN")
    assert masked(presigned) == ("https://fruits.s3.amazonaws.com/w.h5?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
                                 "&X-Amz-Date=20261204T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=***&X-Amz-Signature=***"
                                 "&X-Amz-Security-Token=***")
    assert masked("ftp://robot:hunter2@photos.example/in") == "ftp://***@photos.example/in"
    assert masked("cannot read https://u:p@h/x.jpg?sig=abc&sv=2024 (403)") == "cannot read https://***@h/x.jpg?sig=***&sv=2024 (403)"
    assert masked(["s3://fruits/in", {"weights": "https://h/w.h5?token=t"}]) == ["s3://fruits/in", {"weights": "https://h/w.h5?token=***"}]
    assert masked("/data/fruits@2x/Training") == "/data/fruits@2x/Training"  # no scheme: a path, not a URL


def test_a_runs_manifest_settings_and_errors_hold_no_credential():
    s = settings(input="https://robot:hunter2@photos.example/in", weights="https://h/w.h5?X-Amz-Signature=abc",
                 storage_options={"secret": "S", "client_kwargs": {"aws_secret_access_key": "S"}})
    public = job.public_settings(s)
    assert public["input"] == "https://***@photos.example/in" and public["weights"] == "https://h/w.h5?X-Amz-Signature=***"
    assert public["storage_options"] == {"secret": "***", "client_kwargs": {"aws_secret_access_key": "***"}}
    error = sink.error_row("a.jpg", "1@0", "read", PermissionError("denied: https://h/a.jpg?X-Amz-Credential=AKIA&x=1"))
    assert error["message"] == "denied: https://h/a.jpg?X-Amz-Credential=***&x=1"


def test_one_list_of_secret_words_for_the_manifest_and_the_cluster_files():
    assert all(is_secret(name) for name in ("AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "DB_PASSWORD", "X-Amz-Credential", "sig"))
    assert not any(is_secret(name) for name in ("endpoint_url", "region_name", "DASK_DISTRIBUTED__WORKER__DAEMON"))
