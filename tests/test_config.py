"""Settings come from pipeline.yaml, then DASK_PIPELINE__* variables, then explicit flags."""
import dask.config
import pytest

from pipeline.config import SAMPLE_DIR, UsageError, parse_n_components, settings


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
