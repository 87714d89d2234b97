"""EC2 clusters against moto's EC2, IAM, SSM and Secrets Manager API server on loopback.

The instances never boot there, so their own container command, read from their user-data, runs
on loopback in their place: moto gives the instances addresses of a VPC on 127.0.0.0/16, the file
says `private-ip: true`, and each command reads its TLS key from the run's secret in moto, as an
instance does through its profile. Everything up to the Dask cluster (security group, secret,
instances, tags, profile, metadata options, user-data) is the real code path, and so is the cleanup.
"""
import asyncio
import base64
import datetime
import http.server
import json
import os
import pathlib
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import botocore.session
import dask.config
import pytest
import yaml
from cryptography import x509

import cluster
from cluster import ec2 as cluster_ec2
from cluster import spec, tls
from pipeline import cli
from pipeline.config import UsageError

PROFILE, IMAGE, CALLER = "fruits-test-worker", "registry.example/fruits-pipeline:0.1.0-gpu", "203.0.113.7/32"


@pytest.fixture
def aws(s3_endpoint, monkeypatch):
    """A clean moto server as the AWS endpoint, a VPC whose addresses are loopback, a profile, an AMI."""
    urllib.request.urlopen(urllib.request.Request(f"{s3_endpoint}/moto-api/reset", method="POST")).close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("PATH", f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # `python` of the commands
    session = botocore.session.get_session()
    ec2 = session.create_client("ec2", region_name="us-east-1")
    vpc = ec2.create_vpc(CidrBlock="127.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="127.0.0.0/24")["Subnet"]["SubnetId"]
    session.create_client("iam", region_name="us-east-1").create_instance_profile(InstanceProfileName=PROFILE)
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    session.create_client("ssm", region_name="us-east-1").put_parameter(Name="/fruits/ami", Value=ami, Type="String")
    secrets = session.create_client("secretsmanager", region_name="us-east-1")
    yield {"ec2": ec2, "secrets": secrets, "vpc": vpc, "subnet": subnet, "ami": ami}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container_command(data: str) -> list[str]:
    """The command an instance's user-data runs in its container (after `docker run ... IMAGE`)."""
    [run] = [line for line in yaml.safe_load(data)["runcmd"] if line.startswith("docker run")]
    return shlex.split(run.split(f" {IMAGE} ", 1)[1])


@pytest.fixture
def instances_on_loopback(aws, tmp_path):
    """start(with_worker): as each instance appears in moto, run on loopback the container command of its
    user-data, as the instance would at boot: the scheduler's, and the first worker's if asked."""
    stop, processes, watchers = threading.Event(), [], []

    def watch(with_worker: bool):
        ec2, done, workers = botocore.session.get_session().create_client("ec2", region_name="us-east-1"), set(), 0
        while not stop.wait(0.2):
            for instance in instances(ec2):
                name = tags(instance).get("Name", "")
                wanted = name.endswith("-scheduler") or with_worker and "-worker-" in name and not workers
                if instance["InstanceId"] in done or not wanted:
                    continue
                done.add(instance["InstanceId"])
                workers += "-worker-" in name
                command = container_command(user_data(ec2, instance))
                with open(tmp_path / f"{name}.log", "w") as log:  # what the instance's console would show
                    processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))

    def start(with_worker: bool) -> None:
        watchers.append(threading.Thread(target=watch, args=(with_worker,), daemon=True))
        watchers[-1].start()

    yield start
    stop.set()
    for watcher in watchers:
        watcher.join(10)
    for process in reversed(processes):
        process.terminate()
        process.wait(30)


def ec2_file(tmp_path, aws, port: int, **changes) -> str:
    data = {
        "kind": "ec2", "region": "us-east-1", "vpc": aws["vpc"], "subnet": aws["subnet"],
        "ami": "resolve:ssm:/fruits/ami", "bootstrap": False, "docker-image": IMAGE,
        "iam-instance-profile": PROFILE, "filesystem-size": 100, "allowed-cidr": CALLER, "private-ip": True,
        "scheduler-port": port, "dashboard-port": free_port(), "start-timeout": "90s", "idle-timeout": "30 minutes",
        "scheduler": {"instance-type": "t3.large"},
        "workers": {"instance-type": "g4dn.xlarge", "gpu": True, "n-workers": 2},
        "tags": {"project": "fruits-test"},
    } | changes
    path = tmp_path / "ec2-test.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    return str(path)


def instances(ec2) -> list[dict]:
    return [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]


def tags(resource: dict) -> dict:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def user_data(ec2, instance: dict) -> str:
    value = ec2.describe_instance_attribute(InstanceId=instance["InstanceId"], Attribute="userData")["UserData"]["Value"]
    return base64.b64decode(value).decode()


def run_groups(ec2) -> list[dict]:
    return ec2.describe_security_groups(Filters=[{"Name": "tag-key", "Values": [cluster_ec2.RUN_TAG]}])["SecurityGroups"]


def run_secrets(secrets) -> list[dict]:
    return secrets.list_secrets(Filters=[{"Key": "tag-key", "Values": [cluster_ec2.RUN_TAG]}])["SecretList"]


def assert_nothing_left(aws):
    assert {i["State"]["Name"] for i in instances(aws["ec2"])} <= {"terminated"}
    assert run_groups(aws["ec2"]) == [] and run_secrets(aws["secrets"]) == []
    assert dask.config.get("distributed.comm.require-encryption") in (None, False)  # the run's TLS config undone


def common_name(pem: str) -> str:
    return x509.load_pem_x509_certificate(pem.encode()).subject.rfc4514_string()


@pytest.mark.slow  # the instances' commands run on loopback in their place
def test_an_ec2_run_starts_what_the_file_says_and_terminates_it_at_the_end(aws, instances_on_loopback, tmp_path, aws_env):
    port = free_port()
    path = ec2_file(tmp_path, aws, port)
    messages = []
    instances_on_loopback(with_worker=True)
    with dask.config.set({"pipeline.storage-options": {"secret": "storage-secret-never-shipped"}}):
        with cluster.connect(path, {}, messages.append) as client:
            ec2 = aws["ec2"]
            started = instances(ec2)
            [scheduler] = [i for i in started if i["InstanceType"] == "t3.large"]
            assert client.scheduler.address == f"tls://{scheduler['PrivateIpAddress']}:{port}"  # TLS, at the file's address
            assert cluster.featurize_resources(client, "auto") == {"GPU": cluster.FEATURIZE_GPU_SHARE}
            [group] = run_groups(ec2)
            run_id = tags(group)[cluster_ec2.RUN_TAG]
            [secret] = run_secrets(aws["secrets"])  # the instances' TLS key, for the run's life only
            instances_tls = json.loads(aws["secrets"].get_secret_value(SecretId=secret["ARN"])["SecretString"])
            client_security = client.security
            assert secret["Name"] == f"fruits-pipeline/{run_id}" and tags(secret)[cluster_ec2.RUN_TAG] == run_id
    ec2 = aws["ec2"]

    # the client has its own certificate, from the run's own authority, and its key is nowhere but here
    assert common_name(client_security.tls_client_cert) == f"CN={tls.CLIENT}"
    assert common_name(instances_tls["cert"]) == f"CN={tls.INSTANCES}"
    assert client_security.tls_ca_file == instances_tls["ca"] and common_name(instances_tls["ca"]) == f"CN=fruits-pipeline {run_id}"
    assert client_security.tls_client_key not in json.dumps(instances_tls)

    # the security group admits the caller (scheduler, dashboard) and the run's instances, nobody else
    rules = group["IpPermissions"]
    opened = sorted((r["FromPort"], r["IpRanges"][0]["CidrIp"]) for r in rules if r["IpProtocol"] == "tcp")
    assert opened == sorted([(port, CALLER), (spec.load(path).dashboard_port, CALLER)])
    [internal] = [r for r in rules if r["IpProtocol"] == "-1"]
    assert internal["UserIdGroupPairs"][0]["GroupId"] == group["GroupId"] and not internal["IpRanges"]
    assert "0.0.0.0/0" not in json.dumps(rules) and "::/0" not in json.dumps(rules)

    # one scheduler (CPU) and two GPU workers, as the file says
    assert sorted(i["InstanceType"] for i in started) == ["g4dn.xlarge", "g4dn.xlarge", "t3.large"]
    for instance in started:
        assert instance["ImageId"] == aws["ami"]  # resolve:ssm:/fruits/ami
        assert instance["IamInstanceProfile"]["Arn"].endswith(f"instance-profile/{PROFILE}")
        assert [g["GroupId"] for g in instance["NetworkInterfaces"][0]["Groups"]] == [group["GroupId"]]
        assert tags(instance)[cluster_ec2.RUN_TAG] == run_id and tags(instance)["project"] == "fruits-test"
        assert instance["MetadataOptions"]["HttpTokens"] == "required"  # IMDSv2: a session token first
        assert instance["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
        assert "PublicIpAddress" not in instance  # private-ip: true
        data = user_data(ec2, instance)
        assert data.startswith("#cloud-config") and f" {IMAGE} " in data and "shutdown -h now" in data
        for secret_text in (*aws_env, "storage-secret-never-shipped", instances_tls["key"], client_security.tls_client_key,
                            client_security.tls_client_cert, "PRIVATE KEY", "BEGIN CERTIFICATE"):
            assert secret_text not in data
        command = container_command(data)
        assert command[2:7] == ["python", "-m", "cluster.tls", f"fruits-pipeline/{run_id}", "us-east-1"]
        inherited = data.split('DASK_INTERNAL_INHERIT_CONFIG="')[1].split('"')[0]
        assert set(dask.config.deserialize(inherited)) == {"distributed"}  # comms; no pipeline settings, no TLS
        assert "tls" not in dask.config.deserialize(inherited)["distributed"]["comm"]
        if instance["InstanceType"] == "t3.large":
            assert "--gpus=all" not in data and "dask_scheduler" in data and "--idle-timeout" in data
        else:
            assert "docker run --net=host --gpus=all" in data
            spec_json = json.loads(command[command.index("--spec") + 1])
            assert spec_json["opts"]["resources"] == {"GPU": 1} and spec_json["opts"]["death_timeout"] == 1800
            assert f"tls://{scheduler['PrivateIpAddress']}:{port}" in data  # the scheduler's private address

    assert any(f"cluster cleanup {path} --run {run_id} --yes" in m for m in messages)
    assert_nothing_left(aws)  # the secret too


@pytest.mark.slow  # the instances' commands run on loopback in their place
@pytest.mark.parametrize("stop", [RuntimeError("a task failed"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_an_error_or_ctrl_c_during_the_run_terminates_everything(aws, instances_on_loopback, tmp_path, stop):
    port = free_port()
    instances_on_loopback(with_worker=True)
    with pytest.raises(type(stop)):
        with cluster.connect(ec2_file(tmp_path, aws, port), {}):
            assert len(instances(aws["ec2"])) == 3 and len(run_secrets(aws["secrets"])) == 1
            raise stop
    assert len(instances(aws["ec2"])) == 3
    assert_nothing_left(aws)


def test_a_scheduler_that_never_answers_is_given_up_after_start_timeout_and_removed(aws, tmp_path):
    path = ec2_file(tmp_path, aws, free_port(), **{"start-timeout": "5s"})  # nothing listens there
    with pytest.raises(UsageError, match="did not answer within 5s"):
        with cluster.connect(path, {}):
            pass
    assert [i["InstanceType"] for i in instances(aws["ec2"])] in ([], ["t3.large"])  # [] if 5 s ran out before it started
    assert_nothing_left(aws)


@pytest.mark.slow  # the scheduler's command runs on loopback in its place
def test_workers_that_never_join_are_given_up_after_start_timeout_and_removed(aws, instances_on_loopback, tmp_path):
    port = free_port()
    instances_on_loopback(with_worker=False)
    with pytest.raises(UsageError, match="no EC2 worker joined"):
        with cluster.connect(ec2_file(tmp_path, aws, port, **{"start-timeout": "30s"}), {}):
            pass
    assert len(instances(aws["ec2"])) == 3
    assert_nothing_left(aws)


def test_nothing_starts_without_the_instance_profile_or_the_image(aws, tmp_path):
    with pytest.raises(UsageError, match="IAM instance profile 'no-such-profile' does not exist"):
        with cluster.connect(ec2_file(tmp_path, aws, 8786, **{"iam-instance-profile": "no-such-profile"}), {}):
            pass
    with pytest.raises(UsageError, match="`docker-image` is not set"):
        with cluster.connect(ec2_file(tmp_path, aws, 8786, **{"docker-image": None}), {}):
            pass
    assert instances(aws["ec2"]) == [] and run_groups(aws["ec2"]) == []


def test_a_security_group_wider_than_the_caller_is_refused_and_a_restricted_one_is_kept(aws, tmp_path):
    ec2 = aws["ec2"]
    file = spec.load(ec2_file(tmp_path, aws, 8786))  # scheduler 8786, dashboard another port

    def group(name, **source):
        group_id = ec2.create_security_group(GroupName=name, Description=name, VpcId=aws["vpc"])["GroupId"]
        ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 8786, "ToPort": 8787, **source},
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "198.51.100.0/24"}]},  # not Dask's
        ])
        return group_id

    other = ec2.create_security_group(GroupName="others", Description="others", VpcId=aws["vpc"])["GroupId"]
    prefix_list = ec2.create_managed_prefix_list(PrefixListName="offices", MaxEntries=5, AddressFamily="IPv4")["PrefixList"]["PrefixListId"]
    refused = {
        "0.0.0.0/0 (the whole internet)": {"IpRanges": [{"CidrIp": "0.0.0.0/0"}]},  # what dask-cloudprovider used to create
        "203.0.0.0/8": {"IpRanges": [{"CidrIp": "203.0.0.0/8"}]},
        "203.0.113.0/24": {"IpRanges": [{"CidrIp": "203.0.113.0/24"}]},  # the caller's /24, wider than its /32
        "::/0 (the whole internet)": {"Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
        f"prefix list {prefix_list}": {"PrefixListIds": [{"PrefixListId": prefix_list}]},
        f"security group {other}": {"UserIdGroupPairs": [{"GroupId": other}]},
    }
    for index, (wider, source) in enumerate(refused.items()):
        refused_group = group(f"wide-{index}", **source)
        with pytest.raises(UsageError) as error:
            cluster_ec2.check_group(ec2, refused_group, file, "ec2-test.yaml", CALLER)
        assert str(error.value) == (f"ec2-test.yaml: security group {refused_group} admits {wider} on port 8786, wider than "
                                    f"{CALLER}: admit only your own address there, or set `security-group: null` to let "
                                    "the run create a group")
    mine = group("mine", IpRanges=[{"CidrIp": CALLER}])
    assert cluster_ec2.check_group(ec2, mine, file, "ec2-test.yaml", CALLER) == mine
    with pytest.raises(UsageError, match="did not answer"):  # a run with it, which fails to start
        with cluster.connect(ec2_file(tmp_path, aws, free_port(), **{"security-group": mine, "start-timeout": "1s"}), {}):
            pass
    assert [g["GroupId"] for g in ec2.describe_security_groups(GroupIds=[mine])["SecurityGroups"]] == [mine]


def test_dask_cloudprovider_still_cannot_create_its_default_security_group_481(aws):
    """Why the runs create their own group (drop the workaround's reason if this starts passing)."""
    from aiobotocore.session import get_session
    from dask_cloudprovider.aws.helper import get_security_group

    async def default_group():
        async with get_session().create_client("ec2", region_name="us-east-1") as client:
            return await get_security_group(client, aws["vpc"])

    with pytest.raises(RuntimeError, match="Unable to create default security group"):
        asyncio.run(default_group())


def left_run(aws, run_id: str) -> dict:
    """What a run leaves: a scheduler instance, a worker, a security group and a secret, tagged as the run."""
    ec2, tag = aws["ec2"], [{"Key": cluster_ec2.RUN_TAG, "Value": run_id}]
    found = {}
    for role, instance_type in (("scheduler", "t3.large"), ("worker-0", "g4dn.xlarge")):
        [found[role]] = ec2.run_instances(
            ImageId=aws["ami"], MinCount=1, MaxCount=1, InstanceType=instance_type, SubnetId=aws["subnet"],
            TagSpecifications=[{"ResourceType": "instance", "Tags": tag + [{"Key": "Name", "Value": f"dask-{run_id}-{role}"}]}],
        )["Instances"]
    found["group"] = ec2.create_security_group(GroupName=run_id, Description=run_id, VpcId=aws["vpc"],
                                               TagSpecifications=[{"ResourceType": "security-group", "Tags": tag}])["GroupId"]
    found["secret"] = aws["secrets"].create_secret(Name=f"fruits-pipeline/{run_id}", SecretString="{}", Tags=tag)["ARN"]
    return found


def test_cleanup_removes_the_runs_no_live_client_owns_and_keeps_the_others(aws, tmp_path, capsys):
    ec2 = aws["ec2"]
    dead, live = left_run(aws, "fruits-dead0001"), left_run(aws, "fruits-live0001")
    other = ec2.run_instances(ImageId=aws["ami"], MinCount=1, MaxCount=1, InstanceType="t3.large",
                              SubnetId=aws["subnet"])["Instances"][0]  # not the pipeline's
    port = free_port()
    path = ec2_file(tmp_path, aws, port, **{"start-timeout": "1s"})
    scheduler = socket.create_server((live["scheduler"]["PrivateIpAddress"], port))  # the live run's scheduler answers
    time.sleep(1.5)  # both runs older than start-timeout
    try:
        assert cli.main(["cluster", "cleanup", path]) == 0
        listed = capsys.readouterr().out
        assert f"run fruits-dead0001: left\n  {dead['scheduler']['InstanceId']}  t3.large  running" in listed
        assert (f"run fruits-live0001: kept, its scheduler answers at {live['scheduler']['PrivateIpAddress']}:{port} "
                "(remove it anyway with --run fruits-live0001 --yes)") in listed
        assert "secret fruits-pipeline/fruits-dead0001" in listed and other["InstanceId"] not in listed
        assert listed.rstrip().endswith("add --yes to remove the runs not kept")
        assert cli.main(["cluster", "cleanup", path, "--run", "fruits-other", "--yes"]) == 0
        assert "nothing left by run fruits-other" in capsys.readouterr().out

        assert cli.main(["cluster", "cleanup", path, "--yes"]) == 0
        removed = capsys.readouterr().out
        assert "run fruits-dead0001: 2 instance(s) terminated, 1 security group(s) and 1 secret(s) deleted" in removed
        states = {i["InstanceId"]: i["State"]["Name"] for i in instances(ec2)}
        assert states == {dead["scheduler"]["InstanceId"]: "terminated", dead["worker-0"]["InstanceId"]: "terminated",
                          live["scheduler"]["InstanceId"]: "running", live["worker-0"]["InstanceId"]: "running",
                          other["InstanceId"]: "running"}
        assert [s["Name"] for s in run_secrets(aws["secrets"])] == ["fruits-pipeline/fruits-live0001"]
    finally:
        scheduler.close()

    assert cli.main(["cluster", "cleanup", path]) == 0  # its scheduler gone: the run is left, no longer kept
    assert "run fruits-live0001: left" in capsys.readouterr().out
    assert cli.main(["cluster", "cleanup", path, "--run", "fruits-live0001", "--yes"]) == 0
    assert "run fruits-live0001: 2 instance(s) terminated, 1 security group(s) and 1 secret(s) deleted" in capsys.readouterr().out
    assert [i["State"]["Name"] for i in instances(ec2) if cluster_ec2.RUN_TAG in tags(i)] == ["terminated"] * 4
    assert run_groups(ec2) == [] and run_secrets(aws["secrets"]) == [] and other["InstanceId"] in states


def test_cleanup_keeps_a_run_still_starting(aws, tmp_path, capsys):
    left_run(aws, "fruits-new00001")
    assert cli.main(["cluster", "cleanup", ec2_file(tmp_path, aws, free_port()), "--yes"]) == 0  # start-timeout: 90s
    shown = capsys.readouterr().out
    assert re.search(r"run fruits-new00001: kept, started \d+ s ago, within start-timeout \(90s\): it may still be starting", shown)
    assert shown.rstrip().endswith("nothing to remove")
    assert {i["State"]["Name"] for i in instances(aws["ec2"])} == {"running"}


def test_the_caller_address_is_found_for_the_security_group(monkeypatch):
    class CheckIp(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"198.51.100.23\n")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), CheckIp)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(cluster_ec2, "CHECKIP_URL", f"http://127.0.0.1:{server.server_port}")
        assert cluster_ec2.caller_cidr("ec2.yaml") == "198.51.100.23/32"
        monkeypatch.setattr(cluster_ec2, "CHECKIP_URL", "http://127.0.0.1:9")  # closed
        with pytest.raises(UsageError, match="set `allowed-cidr` in ec2.yaml"):
            cluster_ec2.caller_cidr("ec2.yaml")
    finally:
        server.shutdown()
