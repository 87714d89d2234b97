"""How a run gets its cluster: a LocalCluster, a scheduler address, or a cluster file checked key by key."""
import os
import pathlib
import re
import socket
import subprocess
import sys

import dask.config
import dask.system
import dockerfile
import pytest

import cluster
from cluster import spec
from pipeline import cli
from pipeline.config import UsageError

REPO = pathlib.Path(__file__).resolve().parents[1]


def pipeline_cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize("cores, memory_gib, expected", [
    (1, 24, (1, 1)),
    (2, 24, (2, 1)),  # two on 2 cores: one computes while one decodes
    (3, 24, (2, 1)),
    (8, 24, (2, 4)),
    (16, 24, (4, 4)),
    (64, 256, (16, 4)),
    (16, 6, (2, 8)),  # 3 GiB a process: memory allows two
    (16, 2, (1, 16)),  # less than one process's worth: one all the same
])
def test_a_local_cluster_shares_the_cores_among_its_processes(cores, memory_gib, expected):
    assert cluster.local_size(None, None, gpus=0, cores=cores, memory=memory_gib * 2**30) == expected


def test_asked_sizes_are_kept_and_the_others_fill_the_cores():
    assert cluster.local_size(2, None, gpus=0, cores=8, memory=24 * 2**30) == (2, 4)
    assert cluster.local_size(3, 5, gpus=0, cores=8) == (3, 5)
    assert cluster.local_size(None, 2, gpus=0, cores=16, memory=24 * 2**30) == (4, 2)


def test_this_machines_cores_are_counted_as_a_container_sees_them():
    """Affinity and the cgroup's CPU quota (dask's cpu_count), never more than the CPUs this process may run on."""
    workers, threads = cluster.local_size(1, None, gpus=0)
    assert threads == dask.system.cpu_count() <= len(os.sched_getaffinity(0))


def test_a_local_cluster_runs_one_process_per_gpu(monkeypatch):
    assert cluster.local_size(None, None, gpus=2, cores=8) == (2, 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    assert cluster.local_gpus() == 2
    for none in ("", "-1", "-1,0"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", none)
        assert cluster.local_gpus() == 0


@pytest.mark.parametrize("address", ["local", "tcp://10.0.0.5:8786", "tls://scheduler:8786"])
def test_known_cluster_addresses_are_accepted(address):
    cluster.check_address(address)


@pytest.mark.parametrize("address", ["yarn", "10.0.0.5:8786", "", "cluster/ec2-gpu"])
def test_anything_else_is_a_usage_error(address):
    with pytest.raises(UsageError, match="unknown cluster"):
        cluster.check_address(address)


def test_an_unreachable_scheduler_is_a_usage_error_that_names_it():
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        with pytest.raises(UsageError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
            with cluster.connect("tcp://127.0.0.1:9", {}):
                pass


def test_a_taken_dashboard_port_is_said_in_one_line_naming_the_port_taken_instead(caplog, recwarn):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        local = {"n-workers": 1, "threads-per-worker": 1, "dashboard-address": f"127.0.0.1:{port}"}
        with caplog.at_level("WARNING", logger="pipeline"), cluster.connect("local", local) as client:
            instead = int(re.search(r":(\d+)/status", client.dashboard_link)[1])
    assert instead != port
    assert [record.getMessage() for record in caplog.records if record.name == "pipeline"] == [
        f"the dashboard's port {port} is taken (another Dask cluster?): it listens on port {instead}"]
    assert not [w for w in recwarn if "already in use" in str(w.message)]  # not distributed's four lines


# --- cluster files ---------------------------------------------------------------------------------

SHIPPED = sorted(str(p.relative_to(REPO)) for p in (REPO / "cluster").glob("*.yaml") if p.name not in ("prices.yaml", "rates.yaml"))
EC2_MINIMAL = "kind: ec2\nregion: eu-west-1\nscheduler: {instance-type: t3.large}\nworkers: {instance-type: g4dn.xlarge, gpu: true}\n"


def cluster_file(tmp_path, text: str) -> str:
    path = tmp_path / "my-cluster.yaml"
    path.write_text(text)
    return str(path)


def test_the_shipped_cluster_files_are_local_ec2_cpu_and_ec2_gpu_and_all_load():
    assert SHIPPED == ["cluster/ec2-cpu.yaml", "cluster/ec2-gpu.yaml", "cluster/local.yaml"]
    specs = {name: spec.load(str(REPO / name)) for name in SHIPPED}
    gpu, cpu = specs["cluster/ec2-gpu.yaml"], specs["cluster/ec2-cpu.yaml"]
    assert gpu.workers.gpu and gpu.workers.instance_type.startswith("g") and not cpu.workers.gpu
    assert gpu.scheduler.instance_type == cpu.scheduler.instance_type == "t3.large"  # no GPU for the scheduler
    assert gpu.security_group is None and gpu.allowed_cidr is None  # a group per run, for the caller only
    assert specs["cluster/local.yaml"] == spec.Local(None, None, ":8787")


def test_a_cluster_file_is_a_cluster_address(tmp_path):
    cluster.check_address(cluster_file(tmp_path, EC2_MINIMAL))
    with pytest.raises(UsageError, match="cluster file .*nowhere.yaml not found"):
        cluster.check_address(str(tmp_path / "nowhere.yaml"))


def test_keys_left_out_take_their_documented_defaults(tmp_path):
    ec2 = spec.load(cluster_file(tmp_path, EC2_MINIMAL))
    assert (ec2.workers.n_workers, ec2.workers.maximum, ec2.spot, ec2.scheduler_port) == (1, None, False, 8786)
    assert ec2.docker_image is None  # needed to run, not to plan
    local = spec.load(cluster_file(tmp_path, "kind: local\nn-workers: 3\n"))
    assert local == spec.Local(3, None, ":8787")  # the rest from pipeline.yaml's local-cluster


@pytest.mark.parametrize(
    "text, message",
    [
        ("kind: yarn\n", "`kind` must be one of local, ec2, got 'yarn'"),
        ("- a\n- list\n", "a cluster file is a mapping"),
        ("kind: local\nworkers: 2\n", "unknown key `workers`"),
        ("kind: local\nn-workers: two\n", "`n-workers` must be an integer or null, got 'two'"),
        ("kind: local\nn-workers: 0\n", "`n-workers` must be at least 1"),
        ("kind: ec2\nregion: us-east-1\nworkers: {instance-type: g5.xlarge}\n", "missing key `scheduler`"),
        (EC2_MINIMAL.replace("gpu: true", "gpus: 1"), "unknown key `workers.gpus`"),
        (EC2_MINIMAL.replace("gpu: true", "gpu: 'yes'"), "`workers.gpu` must be true or false, got 'yes'"),
        (EC2_MINIMAL.replace("g4dn.xlarge", "c6i.2xlarge"), "`workers.gpu` is true but c6i.2xlarge has no GPU"),
        (EC2_MINIMAL.replace("gpu: true", "gpu: true, maximum: 4, n-workers: 6"), "must lie between"),
        (EC2_MINIMAL.replace("gpu: true", "gpu: true, minimum: 2"), "`workers.minimum` needs `workers.maximum`"),
        (EC2_MINIMAL + "allowed-cidr: 0.0.0.0/0\n", "admits 4,294,967,296 addresses (the whole internet)"),
        (EC2_MINIMAL + "allowed-cidr: 10.0.0.0/8\n", "admits 16,777,216 addresses: give your own address (x.x.x.x/32) or your network, at most /16"),
        (EC2_MINIMAL + "allowed-cidr: '2001:db8::/32'\n", "at most /48"),
        (EC2_MINIMAL + "allowed-cidr: my laptop\n", "`allowed-cidr` must be an address"),
        (EC2_MINIMAL + "env-vars: {AWS_SECRET_ACCESS_KEY: abc}\n", "`env-vars.AWS_SECRET_ACCESS_KEY` looks like a credential"),
        (EC2_MINIMAL + "tags: {cost-center: 1234}\n", "`tags` must be a mapping of names to strings"),
        (EC2_MINIMAL + "start-timeout: soon\n", "`start-timeout` must be a duration"),
        (EC2_MINIMAL + "filesystem-size: 40GB\n", "`filesystem-size` must be an integer, got '40GB'"),
        (EC2_MINIMAL + "ami: ubuntu\n", "`ami` must be an AMI id"),
        ("kind: ec2\n  region: [\n", "cannot read cluster file"),
    ],
)
def test_a_bad_cluster_file_is_a_usage_error_naming_the_file_and_the_key(tmp_path, text, message):
    path = cluster_file(tmp_path, text)
    with pytest.raises(UsageError) as error:
        spec.load(path)
    assert message in str(error.value) and path in str(error.value)


def test_cluster_plan_prints_instances_prices_and_settings_for_every_shipped_file(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    for name in SHIPPED:
        assert cli.main(["cluster", "plan", name]) == 0
        assert "settings\n  kind: " in capsys.readouterr().out
    gpu = pipeline_cli("cluster", "plan", "cluster/ec2-gpu.yaml").stdout  # as a user runs it
    prices = spec.prices()
    assert "nothing is launched" in gpu and f"as of {prices['as-of']}" in gpu
    scheduler = next(line for line in gpu.splitlines() if line.strip().startswith("scheduler"))
    workers = next(line for line in gpu.splitlines() if line.strip().startswith("workers"))
    assert "t3.large" in scheduler and "0.08" in scheduler
    assert "g4dn.xlarge" in workers and "2 (adapts 1-8)" in workers and "1 × NVIDIA T4" in workers
    total = 0.0832 + 2 * prices["instances"]["g4dn.xlarge"]["usd-per-hour"]
    assert "total" in gpu and f"{total:.2f} (adapts" in gpu
    assert "iam-instance-profile: fruits-pipeline-worker" in gpu


def test_cluster_plan_of_a_bad_file_is_one_line_and_exit_code_2(tmp_path):
    result = pipeline_cli("cluster", "plan", cluster_file(tmp_path, EC2_MINIMAL + "colour: red\n"))
    assert result.returncode == 2 and "unknown key `colour`" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


# --- the worker image ------------------------------------------------------------------------------


def pins() -> dict[str, str]:
    """name → version of every `name==version` in pyproject.toml."""
    text = (REPO / "pyproject.toml").read_text()
    return {name.lower(): version for name, version in re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^"]+)"', text)}


def test_the_dockerfile_parses_and_builds_tensorflow_gpu_plus_this_package_at_pyproject_versions():
    commands = dockerfile.parse_file(str(REPO / "cluster" / "Dockerfile"))  # BuildKit's own parser
    args = dict(c.value[0].split("=", 1) for c in commands if c.cmd == "ARG")
    [base] = [c.value[0] for c in commands if c.cmd == "FROM"]
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert image == f"tensorflow/tensorflow:{pins()['tensorflow']}-gpu"
    runs = " ".join(c.value[0] for c in commands if c.cmd == "RUN")
    assert "pip install ." in runs  # dependencies at pyproject.toml's pins, nothing pinned twice
    for name, version in re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"']*)", runs):
        assert pins()[name.lower()] == version, name
    copied = {c.value[0] for c in commands if c.cmd == "COPY"}
    assert {"pyproject.toml", "pipeline", "cluster"} <= copied
    users = [c.value[0] for c in commands if c.cmd == "USER"]
    assert users and users[-1] not in ("root", "0")  # the containers run as an unprivileged user
    assert commands[-1].cmd in ("USER", "WORKDIR") and commands.index(next(c for c in commands if c.cmd == "USER")) > \
        max(i for i, c in enumerate(commands) if c.cmd == "RUN" and "pip install" in c.value[0])
