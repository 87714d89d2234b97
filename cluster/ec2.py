"""EC2 clusters through dask-cloudprovider's EC2Cluster, with the defects of 2025.9.0 worked around.

- Its default security group cannot be created (dask-cloudprovider #481), and the one it used to
  create admitted the whole internet on 8786-8787: each run creates its own group that admits
  only the caller (`allowed-cidr`) and the run's instances to each other, or checks the group
  named in the file.
- Workers would reach the scheduler at its public address, which such a group does not admit:
  they get its private address, the client its public one.
- It detects GPUs from `instance_type` only, so GPU workers behind a CPU scheduler got no
  `--gpus=all`: GPU workers get it here, and the worker resource GPU=1.
- Its user-data carries the caller's whole Dask config, TLS keys included: only the `distributed`
  comm settings go, never a key, a pipeline setting or an AWS credential. The run has its own
  certificate authority; the instances' key is read at boot from a Secrets Manager secret of the
  run (cluster/tls.py) through the instance profile, the client's key never leaves this machine.
- Instances require IMDSv2 (a token from a PUT, hop limit 1) and run their container as a non-root user.
- Nothing leaks: every instance, volume, the group and the secret carry the tag fruits-pipeline-run=<run id>;
  however the run ends (success, error, Ctrl-C, SIGTERM), all of them are removed, and
  `python -m pipeline cluster cleanup FILE` finds and removes what a killed process left, never
  a run whose scheduler still answers.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import ipaddress
import logging
import re
import signal
import socket
import threading
import urllib.request
import uuid
from typing import Callable, Iterator

import botocore.exceptions
import botocore.session
import dask.config
from dask.utils import parse_timedelta
from dask_cloudprovider.aws.ec2 import EC2Cluster, EC2Scheduler, EC2Worker
from dask_cloudprovider.utils.config_helper import prune_defaults
from distributed import Client

from pipeline.config import UsageError

from . import tls
from .spec import Ec2, allowed_network

log = logging.getLogger("pipeline")
RUN_TAG = "fruits-pipeline-run"
CHECKIP_URL = "https://checkip.amazonaws.com"  # AWS's own "what is my address" service
LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
ECR_IMAGE = re.compile(r"^(\d{12}\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com)/")
AWS_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)


@contextlib.contextmanager
def launch(spec: Ec2, path: str, say: Callable[[str], None]) -> Iterator[Client]:
    """A client of a new EC2 cluster described by `spec`; every instance is terminated on the way out."""
    if not spec.docker_image:
        raise UsageError(
            f"{path}: `docker-image` is not set: build cluster/Dockerfile, push it to a registry the "
            "instances can pull from, and put its name there (see docs/ec2.md)"
        )
    run_id = f"fruits-{uuid.uuid4().hex[:8]}"
    ec2 = aws("ec2", spec.region)
    say(f"EC2 run {run_id} in {spec.region}; if this process is killed, remove what it started with: "
        f"python -m pipeline cluster cleanup {path} --run {run_id} --yes")
    # EC2Cluster writes the run's TLS settings into the global Dask config: undo that at the end.
    saved_comm = {"distributed.comm": copy.deepcopy(dask.config.get("distributed.comm"))}
    secrets = aws("secretsmanager", spec.region)
    with dask.config.set(saved_comm), removed_at_exit(ec2, secrets, run_id, say), sigterm_as_interrupt():
        try:
            cidr = spec.allowed_cidr or caller_cidr(path)
            vpc = spec.vpc or default_vpc(ec2)
            group = check_group(ec2, spec.security_group, spec, path, cidr) if spec.security_group else \
                create_group(ec2, spec, vpc, run_id, cidr)
            run_tls = tls.for_run(run_id)
            secret = create_secret(secrets, spec, run_id, run_tls)
            cluster = start_cluster(spec, path, run_id, vpc, group, say, run_tls.client, secret)
        except AWS_ERRORS as error:
            raise UsageError(f"EC2 could not start the cluster: {error}") from None
        try:
            with Client(cluster) as client:
                wait_for_first_worker(client, spec, say)
                if spec.key_name:
                    host = client.scheduler.address.split("://")[1].rsplit(":", 1)[0]
                    say(f"dashboard through SSH: ssh -i ~/.ssh/{spec.key_name}.pem -N -L "
                        f"{spec.dashboard_port}:localhost:{spec.dashboard_port} ubuntu@{host}, "
                        f"then http://localhost:{spec.dashboard_port}/status")
                yield client
        finally:
            with contextlib.suppress(Exception):  # the tagged sweep below terminates whatever is left
                cluster.close(timeout=60)


def start_cluster(spec: Ec2, path: str, run_id: str, vpc: str, group: str, say, security, secret: str) -> "PipelineEC2Cluster":
    """Start the scheduler and the first workers (a few minutes on real EC2); the client connects with `security`,
    the instances read theirs from `secret`."""
    workers = spec.workers
    tags = {**spec.tags, RUN_TAG: run_id}
    worker_options = {"nthreads": workers.threads, "death_timeout": parse_timedelta(spec.idle_timeout)}
    if workers.gpu:
        worker_options["resources"] = {"GPU": 1}
    say(f"EC2: starting a scheduler ({spec.scheduler.instance_type}) and {workers.n_workers} "
        f"worker(s) ({workers.instance_type}); this takes a few minutes")
    try:
        cluster = PipelineEC2Cluster(
            secret=secret,
            gpu_workers=workers.gpu,
            start_timeout=parse_timedelta(spec.start_timeout),
            region=spec.region,
            availability_zone=spec.availability_zone,
            bootstrap=spec.bootstrap,
            auto_shutdown=True,  # the instance shuts down, hence terminates, when its Dask process exits
            ami=resolve_ami(spec, path),
            scheduler_instance_type=spec.scheduler.instance_type,
            worker_instance_type=workers.instance_type,
            vpc=vpc,
            subnet_id=spec.subnet,
            security_groups=[group],
            filesystem_size=spec.filesystem_size,
            key_name=spec.key_name,
            iam_instance_profile=instance_profile(spec, path),
            docker_image=spec.docker_image,
            extra_bootstrap=registry_login(spec),
            env_vars=dict(spec.env_vars),
            instance_tags=tags,
            volume_tags=tags,
            use_private_ip=spec.private_ip,
            spot=spec.spot,
            n_workers=workers.n_workers,
            security=security,  # TLS between client, scheduler and workers, with certificates made for this run
            scheduler_options={
                "port": spec.scheduler_port,
                "dashboard_address": f":{spec.dashboard_port}",
                "idle_timeout": spec.idle_timeout,
            },
            worker_options={k: v for k, v in worker_options.items() if v is not None},
        )
    except asyncio.TimeoutError:
        raise UsageError(
            f"the EC2 scheduler did not answer within {spec.start_timeout} (`start-timeout` in {path}): "
            "its console output (EC2 console, Instance > Monitor > Get system log) says why"
        ) from None
    except RuntimeError as error:  # EC2Cluster wraps what failed while starting
        raise UsageError(f"EC2 could not start the cluster: {error}") from None
    if workers.maximum is not None:
        cluster.adapt(minimum=workers.minimum or 0, maximum=workers.maximum)
    return cluster


def wait_for_first_worker(client: Client, spec: Ec2, say) -> None:
    """Fail clearly, rather than wait forever, when no worker ever joins (a bad image, no capacity)."""
    if spec.workers.n_workers == 0 and not spec.workers.minimum:
        return  # an adaptive cluster starts workers when the tasks come
    say(f"EC2: waiting for the first worker (up to {spec.start_timeout})")
    try:
        client.wait_for_workers(1, timeout=parse_timedelta(spec.start_timeout))
    except TimeoutError:
        raise UsageError(
            f"no EC2 worker joined the scheduler within {spec.start_timeout} (`start-timeout`): the "
            "workers' console output (EC2 console, Instance > Monitor > Get system log) says why"
        ) from None


# --- dask-cloudprovider, adjusted -------------------------------------------------------------------


class PrivateAddressScheduler(EC2Scheduler):
    """A scheduler that workers reach at its private address and the client at its public one."""

    async def configure_vm(self, client):
        public, _ = await super().configure_vm(client)
        return self.instance["PrivateIpAddress"], public


class PipelineEC2Cluster(EC2Cluster):
    """EC2Cluster with GPU workers behind a CPU scheduler, a start timeout, IMDSv2, and user-data without keys."""

    def __init__(self, *, secret: str, gpu_workers: bool, start_timeout: float, **kwargs):
        self.secret = secret
        self.gpu_workers = gpu_workers
        self.start_timeout = start_timeout
        super().__init__(**kwargs)

    async def _start(self):
        self.scheduler_class = PrivateAddressScheduler
        self.boto_session.register("before-parameter-build.ec2.RunInstances", require_imdsv2)
        await asyncio.wait_for(super()._start(), self.start_timeout)

    def render_process_cloud_init(self, process):
        process.gpu_instance = self.gpu_workers and isinstance(process, EC2Worker)
        process.command = process.command.replace(process.set_env, f"{inherited_config()} {tls.boot_command(self.secret, self.region)}")
        return super().render_process_cloud_init(process)


def require_imdsv2(params: dict, **kwargs) -> None:
    """RunInstances with the metadata service behind a session token (IMDSv2), one network hop away at most."""
    params["MetadataOptions"] = {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled"}


def inherited_config() -> str:
    """The Dask settings the instances inherit: the non-default `distributed` ones (comms), never a TLS key or certificate."""
    changed = prune_defaults(copy.deepcopy(dask.config.config), dask.config.merge(*dask.config.defaults))
    distributed = changed.get("distributed", {})
    distributed.get("comm", {}).pop("tls", None)  # the instances read theirs from the run's secret
    return f'env DASK_INTERNAL_INHERIT_CONFIG="{dask.config.serialize({"distributed": distributed})}"'


# --- AWS resources ---------------------------------------------------------------------------------


def aws(service: str, region: str):
    """A botocore client; credentials and endpoint come the usual AWS way (environment, ~/.aws)."""
    return botocore.session.get_session().create_client(service, region_name=region)


def caller_cidr(path: str) -> str:
    """This machine's public IPv4 address as a /32, the only source the security group admits."""
    try:
        with urllib.request.urlopen(CHECKIP_URL, timeout=10) as response:
            address = ipaddress.ip_address(response.read().decode().strip())
    except (OSError, ValueError) as error:
        raise UsageError(
            f"cannot find this machine's public address ({error}): set `allowed-cidr` in {path}, e.g. 203.0.113.7/32"
        ) from None
    return f"{address}/{address.max_prefixlen}"


def default_vpc(ec2) -> str:
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise UsageError("the region has no default VPC: set `vpc` and `subnet` in the cluster file")
    return vpcs[0]["VpcId"]


def create_group(ec2, spec: Ec2, vpc: str, run_id: str, cidr: str) -> str:
    """A security group for this run: scheduler and dashboard (and SSH with a key) for `cidr` only."""
    network = allowed_network(cidr, "allowed-cidr")
    tags = [{"Key": k, "Value": v} for k, v in {**spec.tags, RUN_TAG: run_id}.items()]
    group = ec2.create_security_group(
        GroupName=run_id, VpcId=vpc, Description=f"fruits-pipeline {run_id}: Dask for {network} only",
        TagSpecifications=[{"ResourceType": "security-group", "Tags": tags}],
    )["GroupId"]
    ranges = {"Ipv6Ranges": [{"CidrIpv6": str(network)}]} if network.version == 6 else {"IpRanges": [{"CidrIp": str(network)}]}
    ports = [spec.scheduler_port, spec.dashboard_port] + ([22] if spec.key_name else [])
    ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[
        *({"IpProtocol": "tcp", "FromPort": port, "ToPort": port, **ranges} for port in ports),
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]},  # the run's instances, to each other
    ])
    return group


def check_group(ec2, group: str, spec: Ec2, path: str, cidr: str) -> str:
    """Use an existing security group only if it admits nobody but `cidr` (the caller's range) to the scheduler
    and dashboard: no wider network, no prefix list, no other group (whose members one cannot see from here)."""
    caller = allowed_network(cidr, "allowed-cidr")
    [found] = ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"]
    for rule in found["IpPermissions"]:
        ports = [p for p in (spec.scheduler_port, spec.dashboard_port) if covers(rule, p)]
        if not ports:
            continue
        sources = [r["CidrIp"] for r in rule.get("IpRanges", [])] + [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
        wider = [s for s in sources if not within(s, caller)]
        wider += [f"prefix list {p['PrefixListId']}" for p in rule.get("PrefixListIds", [])]
        wider += [f"security group {g['GroupId']}" for g in rule.get("UserIdGroupPairs", []) if g.get("GroupId") != group]
        if wider:
            whole = " (the whole internet)" if wider[0] in ("0.0.0.0/0", "::/0") else ""
            raise UsageError(
                f"{path}: security group {group} admits {wider[0]}{whole} on port {ports[0]}, wider than {caller}: "
                "admit only your own address there, or set `security-group: null` to let the run create a group"
            )
    return group


def covers(rule: dict, port: int) -> bool:
    """True if an ingress rule admits TCP traffic to `port`."""
    if rule.get("IpProtocol") in ("-1", "all"):
        return True
    return rule.get("IpProtocol") in ("tcp", "6") and rule.get("FromPort", 0) <= port <= rule.get("ToPort", 65535)


def within(source: str, caller) -> bool:
    """True if the network `source` lies inside the caller's network."""
    network = ipaddress.ip_network(source, strict=False)
    return network.version == caller.version and network.subnet_of(caller)


def instance_profile(spec: Ec2, path: str) -> dict:
    """The IamInstanceProfile argument of RunInstances, after checking that the profile exists."""
    name = spec.iam_instance_profile
    if not name:
        return {}
    if name.startswith("arn:"):
        return {"Arn": name}
    try:
        aws("iam", spec.region).get_instance_profile(InstanceProfileName=name)
    except botocore.exceptions.ClientError as error:
        if error.response["Error"]["Code"] == "NoSuchEntity":
            raise UsageError(
                f"{path}: IAM instance profile {name!r} does not exist: create it with a role that may read the "
                "input and write the output (docs/ec2.md), or name another in `iam-instance-profile`"
            ) from None
        # no right to look it up (iam:GetInstanceProfile): RunInstances will say if it is wrong
    return {"Name": name}


def resolve_ami(spec: Ec2, path: str) -> str | None:
    """An AMI id; resolve:ssm:/name is read from the region's Parameter Store, as RunInstances would."""
    if not spec.ami or not spec.ami.startswith("resolve:ssm:"):
        return spec.ami
    name = spec.ami.removeprefix("resolve:ssm:")
    try:
        return aws("ssm", spec.region).get_parameter(Name=name)["Parameter"]["Value"]
    except botocore.exceptions.ClientError as error:
        raise UsageError(f"{path}: cannot resolve `ami` {spec.ami} in {spec.region}: {error}") from None


def registry_login(spec: Ec2) -> list[str] | None:
    """Boot commands that log Docker in to ECR with the instance profile, for an ECR image."""
    match = ECR_IMAGE.match(spec.docker_image or "")
    if not match:
        return None
    registry, region = match.groups()
    commands = ["snap install aws-cli --classic"] if spec.bootstrap else []  # the AWS CLI, on a bare Ubuntu
    return commands + [f"aws ecr get-login-password --region {region} | docker login --username AWS --password-stdin {registry}"]


def create_secret(secrets, spec: Ec2, run_id: str, run_tls: tls.RunTls) -> str:
    """The secret the run's instances read their TLS key from, tagged as the run; its name."""
    name = tls.secret_name(run_id)
    secrets.create_secret(
        Name=name, SecretString=run_tls.secret(),
        Description=f"fruits-pipeline {run_id}: TLS key of the run's instances, deleted when the run ends",
        Tags=[{"Key": k, "Value": v} for k, v in {**spec.tags, RUN_TAG: run_id}.items()],
    )
    return name


# --- cleanup -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def removed_at_exit(ec2, secrets, run_id: str, say) -> Iterator[None]:
    """Terminate the run's instances, delete its security group and secret when the block exits, however."""
    try:
        yield
    finally:
        try:
            left = leftovers(ec2, secrets, run_id).get(run_id)
            if left:
                say(f"EC2: run {run_id} removed: {remove(ec2, secrets, left)}")
        except botocore.exceptions.NoCredentialsError:
            pass  # without credentials nothing was started either
        except Exception as error:  # never hide the run's own error; say how to finish by hand
            log.error(f"could not remove everything of EC2 run {run_id} ({error}); finish with: "
                      f"python -m pipeline cluster cleanup FILE --run {run_id} --yes")


def leftovers(ec2, secrets, run_id: str | None) -> dict[str, dict[str, list[dict]]]:
    """Live instances, security groups and secrets tagged by the pipeline, by run id (all runs, or one run)."""
    tag_filter = {"Name": f"tag:{RUN_TAG}", "Values": [run_id]} if run_id else {"Name": "tag-key", "Values": [RUN_TAG]}
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[tag_filter, {"Name": "instance-state-name", "Values": LIVE_STATES}]
    )
    found = {
        "instances": [i for page in pages for r in page["Reservations"] for i in r["Instances"]],
        "groups": ec2.describe_security_groups(Filters=[tag_filter])["SecurityGroups"],
        "secrets": [s for page in secrets.get_paginator("list_secrets").paginate(Filters=[{"Key": "tag-key", "Values": [RUN_TAG]}])
                    for s in page["SecretList"]],
    }
    runs: dict[str, dict[str, list[dict]]] = {}
    for kind, resources in found.items():
        for resource in resources:
            run = tag(resource, RUN_TAG)
            if run_id is None or run == run_id:
                runs.setdefault(run, {"instances": [], "groups": [], "secrets": []})[kind].append(resource)
    return runs


def remove(ec2, secrets, run: dict[str, list[dict]], wait_s: float = 300) -> str:
    """Terminate a run's instances, wait for them, delete its groups and secrets; what was removed."""
    ids = [i["InstanceId"] for i in run["instances"]]
    if ids:
        ec2.terminate_instances(InstanceIds=ids)
        ec2.get_waiter("instance_terminated").wait(
            InstanceIds=ids, WaiterConfig={"Delay": 5, "MaxAttempts": max(1, int(wait_s / 5))}
        )
    for group in run["groups"]:
        delete_group(ec2, group["GroupId"], wait_s)
    for secret in run["secrets"]:
        secrets.delete_secret(SecretId=secret["ARN"], ForceDeleteWithoutRecovery=True)
    return f"{len(ids)} instance(s) terminated, {len(run['groups'])} security group(s) and {len(run['secrets'])} secret(s) deleted"


def delete_group(ec2, group: str, wait_s: float) -> None:
    """Delete a security group, waiting while terminated instances still hold it."""
    for attempt in range(max(1, int(wait_s / 5))):
        try:
            ec2.delete_security_group(GroupId=group)
            return
        except botocore.exceptions.ClientError as error:
            if error.response["Error"]["Code"] != "DependencyViolation":
                raise
            threading.Event().wait(5)
    ec2.delete_security_group(GroupId=group)


def still_live(run_id: str, run: dict[str, list[dict]], spec: Ec2) -> str | None:
    """Why a run may still have a live client (its scheduler answers, or it is still starting); None if it has none."""
    scheduler = next((i for i in run["instances"] if (tag(i, "Name") or "").endswith("-scheduler")), None)
    host = scheduler and scheduler.get("PrivateIpAddress" if spec.private_ip else "PublicIpAddress")
    if host and answers(host, spec.scheduler_port):
        return f"its scheduler answers at {host}:{spec.scheduler_port}"
    started = [i["LaunchTime"] for i in run["instances"]] + [s["CreatedDate"] for s in run["secrets"] if "CreatedDate" in s]
    age = datetime.datetime.now(datetime.timezone.utc) - min(started) if started else None
    if age is not None and age.total_seconds() < parse_timedelta(spec.start_timeout):
        return f"started {int(age.total_seconds())} s ago, within start-timeout ({spec.start_timeout}): it may still be starting"
    return None


def answers(host: str, port: int, timeout: float = 3) -> bool:
    """True if something accepts a TCP connection at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while the cluster lives, so that it is removed then too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cleanup(path: str, run_id: str | None, remove_them: bool) -> str:
    """`python -m pipeline cluster cleanup FILE`: list (and with `remove_them`, remove) what pipeline runs left.

    Without --run, a run whose scheduler still answers, or that started within `start-timeout`, is
    listed as kept with the reason: it may have a live client. One named with --run is removed whatever its state.
    """
    from .spec import load

    spec = load(path)
    if not isinstance(spec, Ec2):
        return f"{path} is not an EC2 cluster: nothing to clean up"
    ec2, secrets = aws("ec2", spec.region), aws("secretsmanager", spec.region)
    try:
        runs = leftovers(ec2, secrets, run_id)
        which = f"run {run_id}" if run_id else "any pipeline run"
        if not runs:
            return f"nothing left by {which} in {spec.region}"
        lines, gone = [f"left by {which} in {spec.region}:"], []
        for run, found in sorted(runs.items(), key=lambda item: str(item[0])):
            kept = None if run_id else still_live(run, found, spec)
            lines.append(f"run {run}: " + (f"kept, {kept} (remove it anyway with --run {run} --yes)" if kept else "left"))
            lines += [f"  {i['InstanceId']}  {i['InstanceType']}  {i['State']['Name']}" for i in found["instances"]]
            lines += [f"  {g['GroupId']}  security group {g['GroupName']}" for g in found["groups"]]
            lines += [f"  secret {s['Name']}" for s in found["secrets"]]
            if not kept:
                gone.append(run)
        if not remove_them:
            return "\n".join(lines + ["add --yes to remove the runs not kept" if gone else "nothing to remove"])
        return "\n".join(lines + ([f"run {run}: {remove(ec2, secrets, runs[run])}" for run in gone] or ["nothing to remove"]))
    except AWS_ERRORS as error:
        raise UsageError(f"cannot list or remove EC2 resources in {spec.region}: {error}") from None


def tag(resource: dict, key: str) -> str | None:
    return next((t["Value"] for t in resource.get("Tags", []) if t["Key"] == key), None)
