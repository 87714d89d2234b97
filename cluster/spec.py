"""Cluster files: the commented YAML files of cluster/, read and checked key by key.

A file says `kind: local` (a LocalCluster) or `kind: ec2` (EC2 through dask-cloudprovider); its
other keys are the fields below, written with `-` for `_`. A key the kind does not know, a value
of the wrong type or out of range is a UsageError that names the file and the key.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import pathlib
import types
import typing
from typing import Any

import dask.config
import yaml
from dask.utils import parse_timedelta

from pipeline.config import UsageError, is_secret

PRICES_FILE = pathlib.Path(__file__).with_name("prices.yaml")
SUFFIXES = (".yaml", ".yml")
WIDEST = {4: 16, 6: 48}  # the shortest prefix `allowed-cidr` may have, by IP version: 65,536 IPv4 addresses


@dataclasses.dataclass(frozen=True)
class Local:
    """A LocalCluster on this machine; a key left out takes pipeline.yaml's `local-cluster` value."""

    n_workers: int | None
    threads_per_worker: int | None
    dashboard_address: str


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """The EC2 instance that runs the Dask scheduler (it needs no GPU)."""

    instance_type: str


@dataclasses.dataclass(frozen=True)
class Workers:
    """The EC2 instances that run one Dask worker each."""

    instance_type: str
    gpu: bool = False  # an NVIDIA GPU: docker --gpus=all, worker resource GPU=1
    n_workers: int = 1  # workers started with the cluster
    minimum: int | None = None  # adaptive scaling between minimum and maximum when maximum is set
    maximum: int | None = None
    threads: int | None = None  # threads per worker; None: one per vCPU


@dataclasses.dataclass(frozen=True)
class Ec2:
    """A scheduler and workers on EC2 instances, each running `docker-image`."""

    region: str
    scheduler: Scheduler
    workers: Workers
    docker_image: str | None = None  # required to run (build cluster/Dockerfile), not to plan
    ami: str | None = None
    bootstrap: bool = True
    iam_instance_profile: str | None = None
    filesystem_size: int = 40
    spot: bool = False
    availability_zone: str | None = None
    vpc: str | None = None
    subnet: str | None = None
    security_group: str | None = None
    allowed_cidr: str | None = None
    private_ip: bool = False  # the client reaches the scheduler at its private address; no public addresses
    key_name: str | None = None
    scheduler_port: int = 8786
    dashboard_port: int = 8787
    start_timeout: str = "20 minutes"
    idle_timeout: str = "1 hour"
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    env_vars: dict[str, str] = dataclasses.field(default_factory=dict)


KINDS = {"local": Local, "ec2": Ec2}


def is_cluster_file(address: str) -> bool:
    """True if the --cluster value names a cluster file rather than a scheduler."""
    return address.lower().endswith(SUFFIXES)


def load(path: str) -> Local | Ec2:
    """The cluster described by the YAML file at `path`, checked."""
    try:
        data = yaml.safe_load(pathlib.Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"cluster file {path} not found: give a path such as cluster/ec2-gpu.yaml") from None
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"cannot read cluster file {path}: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a cluster file is a mapping of keys, starting with `kind: local` or `kind: ec2`")
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in KINDS:
        raise UsageError(f"{path}: `kind` must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "local":
        data = {**dask.config.get("pipeline.local-cluster"), **data}
    spec = build(KINDS[kind], data, path, "")
    check(spec, path)
    return spec


def build(cls: type, data: Any, path: str, prefix: str) -> Any:
    """An instance of the dataclass `cls` from a YAML mapping, every key and type checked."""
    if not isinstance(data, dict):
        raise UsageError(f"{path}: `{prefix.rstrip('.')}` must be a mapping of keys, got {data!r}")
    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise UsageError(
            f"{path}: unknown key `{prefix}{unknown[0]}`; the keys of a {cls.__name__.lower()} "
            f"{'section' if prefix else 'cluster'} are {', '.join(fields)}"
        )
    missing = [key for key, f in fields.items() if key not in data and not has_default(f)]
    if missing:
        raise UsageError(f"{path}: missing key `{prefix}{missing[0]}`")
    values = {}
    for key, value in data.items():
        name = fields[key].name
        values[name] = checked(hints[name], value, path, prefix + key)
    return cls(**values)


def has_default(field: dataclasses.Field) -> bool:
    return field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING


def checked(hint: Any, value: Any, path: str, key: str) -> Any:
    """`value` if it has the type `hint` says (str, int, bool, a section, str → str mapping, or None)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    kind = next(option for option in options if option is not type(None))
    if dataclasses.is_dataclass(kind):
        return build(kind, value, path, key + ".")
    if typing.get_origin(kind) is dict:
        if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return dict(value)
        raise UsageError(f"{path}: `{key}` must be a mapping of names to strings (quote numbers), got {value!r}")
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (str, bool) and isinstance(value, kind):
        return value
    names = {int: "an integer", str: "a string", bool: "true or false"}
    allowed = names[kind] + (" or null" if type(None) in options else "")
    raise UsageError(f"{path}: `{key}` must be {allowed}, got {value!r}")


def check(spec: Local | Ec2, path: str) -> None:
    """The checks beyond types: ranges, and settings that contradict each other."""
    if isinstance(spec, Local):
        for key in ("n_workers", "threads_per_worker"):
            at_least(spec, key, 1, path)
        return
    workers = spec.workers
    at_least(workers, "n_workers", 0, path, "workers.")
    at_least(workers, "threads", 1, path, "workers.")
    at_least(workers, "minimum", 0, path, "workers.")
    at_least(workers, "maximum", 1, path, "workers.")
    at_least(spec, "filesystem_size", 8, path)
    if workers.minimum is not None and workers.maximum is None:
        raise UsageError(f"{path}: `workers.minimum` needs `workers.maximum` (adaptive scaling between the two)")
    if workers.maximum is not None and not (workers.minimum or 0) <= workers.n_workers <= workers.maximum:
        raise UsageError(
            f"{path}: `workers.n-workers` ({workers.n_workers}) must lie between `workers.minimum` "
            f"({workers.minimum or 0}) and `workers.maximum` ({workers.maximum})"
        )
    known = prices()["instances"]
    for role in ("scheduler", "workers"):
        instance = getattr(spec, role).instance_type
        if role == "workers" and workers.gpu and instance in known and not known[instance].get("gpus"):
            raise UsageError(f"{path}: `workers.gpu` is true but {instance} has no GPU: choose a g4dn, g5 or p3 type")
    for key in ("scheduler_port", "dashboard_port"):
        if not 1 <= getattr(spec, key) <= 65535:
            raise UsageError(f"{path}: `{key.replace('_', '-')}` must be a port number, got {getattr(spec, key)}")
    for key in ("start_timeout", "idle_timeout"):
        try:
            parse_timedelta(getattr(spec, key))
        except (ValueError, KeyError):
            raise UsageError(f"{path}: `{key.replace('_', '-')}` must be a duration such as '20 minutes', got {getattr(spec, key)!r}") from None
    if spec.allowed_cidr is not None:
        allowed_network(spec.allowed_cidr, path)
    if spec.ami is not None and not spec.ami.startswith(("ami-", "resolve:ssm:")):
        raise UsageError(f"{path}: `ami` must be an AMI id (ami-...) or resolve:ssm:/parameter/name, got {spec.ami!r}")
    secret = [name for name in spec.env_vars if is_secret(name)]
    if secret:
        raise UsageError(
            f"{path}: `env-vars.{secret[0]}` looks like a credential; instance user-data is readable, so "
            "give the instances an `iam-instance-profile` instead"
        )
    reserved = [key for key in spec.tags if key.lower().startswith("aws:")]
    if reserved:
        raise UsageError(f"{path}: `tags.{reserved[0]}`: tag keys starting with aws: are reserved by AWS")


def at_least(section: Any, name: str, low: int, path: str, prefix: str = "") -> None:
    value = getattr(section, name)
    if value is not None and value < low:
        raise UsageError(f"{path}: `{prefix}{name.replace('_', '-')}` must be at least {low}, got {value}")


def allowed_network(cidr: str, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The network admitted to the scheduler and dashboard: an address, or a network no wider than
    WIDEST (an organisation's range), never the internet at large."""
    try:
        network = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise UsageError(f"{path}: `allowed-cidr` must be an address or network such as 203.0.113.7/32, got {cidr!r}") from None
    if network.prefixlen < WIDEST[network.version]:
        whole = " (the whole internet)" if network.prefixlen == 0 else ""
        raise UsageError(f"{path}: `allowed-cidr` {cidr} admits {network.num_addresses:,} addresses{whole}: give your own "
                         f"address (x.x.x.x/32) or your network, at most /{WIDEST[network.version]}")
    return network


def prices() -> dict:
    """The dated price table of cluster/prices.yaml."""
    return yaml.safe_load(PRICES_FILE.read_text())


def settings(spec: Local | Ec2) -> dict:
    """The spec as the YAML keys of a cluster file, every default filled in."""
    def keys(data: dict) -> dict:
        return {k.replace("_", "-"): keys(v) if isinstance(v, dict) and k not in ("tags", "env_vars") else v for k, v in data.items()}

    kind = next(name for name, cls in KINDS.items() if isinstance(spec, cls))
    return {"kind": kind, **keys(dataclasses.asdict(spec))}
