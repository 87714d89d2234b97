"""Settings: the defaults of pipeline.yaml, overridden by DASK_PIPELINE__* variables, then by flags."""
from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any

import dask.config
import yaml

DEFAULTS_FILE = pathlib.Path(__file__).with_name("pipeline.yaml")
SAMPLE_DIR = pathlib.Path(__file__).with_name("sample") / "fruits-360"
BACKENDS = ("auto", "onnxruntime", "tensorflow", "jax", "torch")  # auto: onnxruntime on CPU workers, tensorflow on GPU ones

dask.config.update_defaults(yaml.safe_load(DEFAULTS_FILE.read_text()))


# The one list of what names a credential, matched within a name, case-insensitive: storage options at
# any depth, URL query parameters (X-Amz-Signature, X-Amz-Credential, sig), a cluster file's env-vars.
SECRET_WORDS = ("key", "secret", "token", "passw", "credential", "sig", "auth")
URL_USER = re.compile(r"(?<=://)[^/?#@\s]+@")  # user:password@ of scheme://user:password@host
URL_PARAMETER = re.compile(r"([?&;])([^=&#;\s]+)=([^&#;\s]*)")


def is_secret(name: str) -> bool:
    """True if `name` (an option, a query parameter, an environment variable) looks like it holds a credential."""
    return any(word in str(name).lower() for word in SECRET_WORDS)


def masked(value: Any) -> Any:
    """`value` with every credential it holds replaced by ***: the values of secret-looking keys at any depth of
    dicts and lists, and in any string, a URL's user:password@ and its secret-looking query parameters."""
    if isinstance(value, dict):
        return {k: "***" if is_secret(k) and not isinstance(v, (dict, list, tuple)) else masked(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(masked(v) for v in value)
    if isinstance(value, str):
        text = URL_USER.sub("***@", value)
        return URL_PARAMETER.sub(lambda m: f"{m[1]}{m[2]}=***" if is_secret(m[2]) else m[0], text)
    return value


class UsageError(ValueError):
    """A mistake in what the user asked for; the CLI prints it as one line and exits with 2."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """One run's settings; field names are the YAML keys with `_` for `-`."""

    input: str
    input_prefix: str | None
    list_on: str
    output: str
    storage_options: dict
    cluster: str
    local_cluster: dict
    gpu: str | bool
    extensions: tuple
    images_per_partition: int | str
    max_image_pixels: int
    max_image_bytes: int
    model: str
    backend: str
    image_size: int
    batch_size: int | str
    weights: str
    seed: int
    n_components: int | float
    pca_batch_size: int | None
    report: str | None

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain data, for the manifest."""
        return dataclasses.asdict(self)


def settings(**overrides: Any) -> Settings:
    """Resolve the settings: YAML defaults < DASK_PIPELINE__* environment < `overrides` (None = unset)."""
    values = {}
    for field in dataclasses.fields(Settings):
        values[field.name] = dask.config.get(
            "pipeline." + field.name.replace("_", "-"), override_with=overrides.pop(field.name, None)
        )
    if overrides:
        raise TypeError(f"unknown settings: {', '.join(sorted(overrides))}")
    if values["input"] == "sample":
        values["input"] = str(SAMPLE_DIR)
    values["extensions"] = tuple(e.lower().lstrip(".") for e in values["extensions"])
    values["n_components"] = parse_n_components(values["n_components"])
    if str(values["images_per_partition"]).strip().lower() == "auto":
        values["images_per_partition"] = "auto"
    else:
        values["images_per_partition"] = positive_int("images_per_partition", values["images_per_partition"], also="or auto")
    for name in ("max_image_pixels", "max_image_bytes", "image_size", "seed"):
        values[name] = positive_int(name, values[name], allow_zero=name == "seed")
    if str(values["batch_size"]).strip().lower() == "auto":
        values["batch_size"] = "auto"
    else:
        values["batch_size"] = positive_int("batch_size", values["batch_size"], also="or auto")
    values["backend"] = parse_backend(values["backend"])
    if values["pca_batch_size"] is not None:
        values["pca_batch_size"] = positive_int("pca_batch_size", values["pca_batch_size"])
    values["storage_options"] = dict(values["storage_options"] or {})
    # DASK_PIPELINE__LOCAL_CLUSTER__N_WORKERS arrives as `n_workers`: one spelling, the YAML's
    values["local_cluster"] = {k.replace("_", "-"): v for k, v in (values["local_cluster"] or {}).items()}
    values["gpu"] = parse_gpu(values["gpu"])
    values["list_on"] = str(values["list_on"]).strip().lower()
    if values["list_on"] not in ("auto", "client", "workers"):
        raise UsageError(f"`list-on` must be auto, client or workers, got {values['list_on']!r}")
    return Settings(**values)


def partition_size(setting: int | str, images: int) -> int:
    """Images a partition: the setting, or for `auto` 256 up to some 6 million images, then growing (by powers
    of 2, up to 4,096) so that there are at most some 25,000 partitions: 10^8 images make 24,415 tasks of 4,096."""
    if setting != "auto":
        return int(setting)
    size = 256
    while size < 4096 and images > 25_000 * size:
        size *= 2
    return size


def parse_n_components(value: Any) -> int | float:
    """An integer ≥ 1 (components kept) or a fraction in (0, 1] (variance kept): 50, "50", 0.95, "1.0"."""
    text = str(value).strip()
    try:
        number = int(text) if text.lstrip("+-").isdigit() else float(text)
    except ValueError:
        number = None
    if isinstance(number, int) and number >= 1 or isinstance(number, float) and 0 < number <= 1:
        return number
    raise UsageError(
        f"`n-components` must be an integer ≥ 1 or a fraction of variance in (0, 1], got {value!r}"
    )


def parse_gpu(value: Any) -> str | bool:
    """Where featurize tasks run: "auto", True (GPU workers only) or False (anywhere)."""
    text = str(value).strip().lower()
    if text in ("auto", "true", "false"):
        return "auto" if text == "auto" else text == "true"
    raise UsageError(f"`gpu` must be auto, true or false, got {value!r}")


def parse_backend(value: Any) -> str:
    """What runs the model on the workers: auto, onnxruntime, or Keras 3's tensorflow, jax or torch."""
    text = str(value).strip().lower()
    if text in BACKENDS:
        return text
    raise UsageError(f"`backend` must be one of {', '.join(BACKENDS)}, got {value!r}")


def evaluate_max_images(value: Any = None) -> int | None:
    """`evaluate.max-images` of pipeline.yaml, or `value` when given: the images `evaluate` reads at most (None: all)."""
    number = dask.config.get("pipeline.evaluate.max-images", override_with=value)
    return None if number is None else positive_int("evaluate.max-images", number)


def evaluate_holdout(value: Any = None) -> str:
    """`evaluate.holdout` of pipeline.yaml, or `value` when given: how `evaluate` holds out images without a Test split."""
    holdout = dask.config.get("pipeline.evaluate.holdout", override_with=value)
    if holdout not in ("random", "series"):
        raise UsageError(f"`evaluate.holdout` must be random or series, got {holdout!r}")
    return holdout


def section(fields_of: type, name: str, overrides: dict) -> dict:
    """The settings of pipeline.yaml's section `name` that dataclass `fields_of` names (DASK_PIPELINE__NAME__*
    variables and `overrides`, None = unset, on top), unchecked: each stage checks its own."""
    values = {field.name: dask.config.get(f"pipeline.{name}.{field.name.replace('_', '-')}",
                                          override_with=overrides.pop(field.name, None))
              for field in dataclasses.fields(fields_of)}
    if overrides:
        raise TypeError(f"unknown {name} settings: {', '.join(sorted(overrides))}")
    return values


def positive_int(name: str, value: Any, allow_zero: bool = False, also: str = "") -> int:
    """`value` as an int, or a UsageError naming the setting (and `also`, what else it may be)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if number < 0 or (number == 0 and not allow_zero) or str(number) != str(value).strip():
        raise UsageError(f"`{name.replace('_', '-')}` must be a positive integer{' ' + also if also else ''}, got {value!r}")
    return number
