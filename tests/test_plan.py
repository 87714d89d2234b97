"""`cluster plan FILE... --images N [--from OUTPUT]`: the hours and USD of featurizing N images, from a measured rate."""
import json
import re
import subprocess
import sys

import pytest
import yaml

import pipeline
from cluster import plan, spec
from pipeline import cli
from pipeline.making import featurize
from pipeline.config import SAMPLE_DIR, UsageError

from test_cluster import REPO, cluster_file

PRICES = spec.prices()["instances"]
RATES = yaml.safe_load(plan.RATES_FILE.read_text())
CPU_CLUSTER = "kind: ec2\nregion: us-east-1\nscheduler: {instance-type: t3.large}\nworkers: {instance-type: c6i.2xlarge, n-workers: 3}\n"
GPU_CLUSTER = ("kind: ec2\nregion: us-east-1\nscheduler: {instance-type: t3.large}\n"
               "workers: {instance-type: g4dn.xlarge, gpu: true, n-workers: 1, minimum: 1, maximum: 4}\n")


def finished_run(tmp_path, *, featurize_per_s=120.0, workers=2, threads=16, start_s=30.0, devices=("CPU, float32",)) -> str:
    """An output folder whose manifest holds what a plan reads: speed, cluster start, devices, workers."""
    out = tmp_path / "out"
    out.mkdir()
    manifest = {
        "images_per_s": {"featurize": featurize_per_s, "list_to_output": featurize_per_s / 2},
        "timings_s": {"list": 1.0, "cluster start": start_s, "featurize": 100.0},
        "model": {"name": "mobilenet_v2", "devices": list(devices)},
        "cluster": {"workers": workers, "threads": threads},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return str(out)


def planned(capsys, *args) -> tuple[dict[str, list[str]], str]:
    """`cluster plan ARGS`: the estimate rows by cluster file (their cells), and the whole text on one line."""
    assert cli.main(["cluster", "plan", *args]) == 0
    out = capsys.readouterr().out
    table = out[out.index("cluster file  "):].split("\n\n")[0].splitlines()
    rows = [re.split(r"\s{2,}", line.strip()) for line in table]
    assert rows[0] == ["cluster file", "workers", "images/s per worker", "hours", "USD", "USD per million images"]
    return {row[0]: row[1:] for row in rows[1:]}, " ".join(out.split())


def test_the_estimate_divides_the_images_by_the_run_rate_per_worker_and_bills_every_instance(tmp_path, capsys):
    path = cluster_file(tmp_path, CPU_CLUSTER)
    rows, text = planned(capsys, path, "--images", "1000000", "--from", finished_run(tmp_path))

    per_worker = 120.0 / 2  # the run's featurize images/s ÷ its worker processes
    hours = (30.0 + 1_000_000 / (per_worker * 3)) / 3600  # its cluster start, then 3 workers at that rate
    usd = hours * (PRICES["t3.large"]["usd-per-hour"] + 3 * PRICES["c6i.2xlarge"]["usd-per-hour"])
    assert round(hours, 2) == 1.55
    assert rows[path] == ["3 (8 threads)", "60.0", plan.number(hours), plan.number(usd), plan.number(usd)]
    assert "featurizing 1,000,000 images" in text and "settings kind: ec2" in text  # one file: its plan, then the estimate
    assert "featurized 120.0 images/s (manifest images_per_s.featurize) on 2 workers with 16 threads" in text
    assert "60.0 per worker; plus its cluster start, 30.0 s" in text
    assert "each, the run's" not in text and "its rate is not theirs" not in text  # 8 threads per worker, CPU, like the run's


def test_an_output_updated_since_its_run_is_planned_from_its_run_not_from_the_update_of_a_few(tmp_path, capsys):
    out = finished_run(tmp_path, featurize_per_s=9.0, workers=1, start_s=2.0)  # the last command: an update of 90 images
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    manifest["history"] = [
        {"command": "run", "started": "2026-12-01T10:00:00", "featurized": 100_000, "images_per_s": 120.0,
         "cluster": {"workers": 2, "threads": 16}, "cluster_start_s": 30.0},
        {"command": "update", "started": "2026-12-02T10:00:00", "featurized": 90, "images_per_s": 9.0,
         "cluster": {"workers": 1, "threads": 8}, "cluster_start_s": 2.0},
    ]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    path = cluster_file(tmp_path, CPU_CLUSTER)
    rows, text = planned(capsys, path, "--images", "1000000", "--from", out)

    assert rows[path][1] == "60.0"  # the run's 120 images/s ÷ its 2 workers
    assert "featurized 120.0 images/s (its run of 2026-12-01, 100,000 images: manifest history) on 2 workers" in text
    assert "plus its cluster start, 30.0 s" in text


def test_an_adaptive_cluster_gives_a_range_from_its_fewest_to_its_most_workers(tmp_path, capsys):
    path = cluster_file(tmp_path, GPU_CLUSTER)
    output = finished_run(tmp_path, featurize_per_s=600.0, workers=1, threads=4, start_s=0.0,
                          devices=("GPU (NVIDIA T4), mixed_float16, tensorflow",))  # a g4dn.xlarge's
    rows, text = planned(capsys, path, "--images", "2000000", "--from", output)

    hours = [2_000_000 / (600.0 * k) / 3600 for k in (1, 4)]
    hourly = PRICES["t3.large"]["usd-per-hour"], PRICES["g4dn.xlarge"]["usd-per-hour"]
    usd = [h * (hourly[0] + k * hourly[1]) for h, k in zip(hours, (1, 4))]
    assert plan.estimate(spec.load(path), 2_000_000, plan.measured_rate(output)) == plan.Estimate((1, 4), tuple(hours), tuple(usd))
    assert rows[path] == [
        "1-4 (4 threads)", "600", f"{plan.number(hours[1])}-{plan.number(hours[0])}",
        f"{plan.number(min(usd))}-{plan.number(max(usd))}", f"{plan.number(min(usd) / 2)}-{plan.number(max(usd) / 2)}",
    ]
    assert "adaptive: the range goes from 4 workers (fastest) to 1" in text


def test_cpu_workers_with_other_threads_than_the_run_are_named_as_the_assumption_they_are(tmp_path, capsys):
    path = cluster_file(tmp_path, CPU_CLUSTER)
    rows, text = planned(capsys, path, "--images", "1000", "--from", finished_run(tmp_path, workers=1, threads=1))
    assert rows[path][1] == "120"  # the run's rate per worker
    assert "its workers have 8 threads each, the run's 1 thread: the estimate assumes each featurizes as fast" in text


def test_a_cpu_run_never_prices_gpu_workers(tmp_path, capsys):
    path = cluster_file(tmp_path, GPU_CLUSTER)  # g4dn.xlarge: an NVIDIA T4 each, no measured rate in cluster/rates.yaml
    rows, text = planned(capsys, path, "--images", "100000000", "--from", finished_run(tmp_path, workers=1, threads=1))
    assert rows[path] == ["1-4 (4 threads)", "no measured rate", "?", "?", "?"]  # no hours, no price
    assert "its workers featurize on NVIDIA T4, the run featurized on a CPU: its rate is not theirs" in text
    assert "no measured rate for the NVIDIA T4 of g4dn.xlarge in cluster/rates.yaml" in text


def test_a_run_on_another_gpu_or_on_an_unnamed_one_plans_with_the_rate_measured_on_the_files_gpu(tmp_path, capsys,
                                                                                               monkeypatch):
    rates = tmp_path / "rates.yaml"  # as if a T4 had been measured
    t4 = {"images-per-s": 900, "what": "a measured T4", "source": "a T4 run"}
    rates.write_text(yaml.safe_dump(RATES | {"gpus": RATES["gpus"] | {"NVIDIA T4": t4}}))
    monkeypatch.setattr(plan, "RATES_FILE", rates)
    path = cluster_file(tmp_path, GPU_CLUSTER)  # g4dn.xlarge: an NVIDIA T4 each
    for at, (device, ran) in enumerate([("GPU (NVIDIA H200), mixed_float16, jax", "NVIDIA H200"),
                                        ("GPU, mixed_float16, jax", "a GPU not named")]):
        (tmp_path / str(at)).mkdir()
        output = finished_run(tmp_path / str(at), featurize_per_s=6000.0, workers=1, threads=4, devices=(device,))
        rows, text = planned(capsys, path, "--images", "1000000", "--from", output)
        assert rows[path][1] == "900"  # the T4's measured rate, not the run's 6,000
        assert f"its workers featurize on NVIDIA T4, the run featurized on {ran}" in text
        assert "900 images/s per NVIDIA T4 worker, from cluster/rates.yaml (a measured T4; a T4 run)" in text


def test_gpu_name_is_the_drivers_model_of_the_first_gpu(tmp_path):
    for index, model in [("0000:01:00.0", "NVIDIA H200"), ("0000:02:00.0", "NVIDIA T4")]:
        (tmp_path / "gpus" / index).mkdir(parents=True)
        (tmp_path / "gpus" / index / "information").write_text(f"Model: \t\t {model}\nIRQ:   42\n")
    assert featurize.gpu_name(str(tmp_path)) == "NVIDIA H200"
    assert featurize.gpu_name(str(tmp_path / "none")) is None


def test_several_files_side_by_side_vertical_against_horizontal(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # this machine's CPU, even where it has a GPU
    files = ["cluster/local.yaml", "cluster/ec2-cpu.yaml", "cluster/ec2-gpu.yaml"]
    rows, text = planned(capsys, *files, "--images", "2000000", "--from", finished_run(tmp_path, workers=1, threads=8))

    assert list(rows) == files and "settings" not in text  # the table alone
    assert rows["cluster/local.yaml"][3:] == ["0 (this machine)", "0"]
    usd = float(rows["cluster/ec2-cpu.yaml"][3])
    assert float(rows["cluster/ec2-cpu.yaml"][4]) == pytest.approx(usd / 2, rel=1e-2)  # per million of 2 million
    assert rows["cluster/ec2-gpu.yaml"][0].startswith("1-8")  # adapts between 1 and 8 workers
    assert rows["cluster/ec2-gpu.yaml"][1:] == ["no measured rate", "?", "?", "?"]  # a CPU run's rate is not a T4's
    assert "prices: on-demand, Linux, us-east-1" in text


def test_without_from_the_measured_rates_apply_and_hardware_without_one_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    local = cluster_file(tmp_path, "kind: local\nn-workers: 1\nthreads-per-worker: 2\n")
    rows, text = planned(capsys, local, "cluster/ec2-cpu.yaml", "cluster/ec2-gpu.yaml", "--images", "1000000")

    per_worker = RATES["cpu-core"]["images-per-s"] * 2  # one core's measured rate × the worker's threads
    assert rows[local] == ["1 (2 threads)", plan.number(per_worker), plan.number(1_000_000 / per_worker / 3600), "0 (this machine)", "0"]
    assert "ONNX Runtime on the idle 2-core AMD EPYC" in text and "another CPU will differ" in text
    assert rows["cluster/ec2-cpu.yaml"][1:] == ["no measured rate", "?", "?", "?"]
    assert "no measured rate for c6i.2xlarge workers in cluster/rates.yaml: give --from OUTPUT" in text
    assert rows["cluster/ec2-gpu.yaml"][1:] == ["no measured rate", "?", "?", "?"]
    assert "no measured rate for the NVIDIA T4 of g4dn.xlarge in cluster/rates.yaml (it has NVIDIA H200)" in text


def test_the_h200_rate_is_the_bare_model_and_says_so():
    h200 = plan.gpu_rate(RATES, "NVIDIA H200", "this machine")
    assert h200.per_worker == 2525 and "the bare model, not the pipeline" in h200.source and "2026-11-26" in h200.source
    assert plan.gpu_rate(RATES, "NVIDIA L4", "g6.xlarge").per_worker is None
    assert all("source" in entry for entry in [RATES["cpu-core"], *RATES["gpus"].values(), *RATES["instances"].values()])


def test_an_instance_type_without_a_price_has_time_but_no_cost(tmp_path, capsys):
    path = cluster_file(tmp_path, CPU_CLUSTER.replace("c6i.2xlarge", "c7i.2xlarge"))
    rows, text = planned(capsys, path, "--images", "1000", "--from", finished_run(tmp_path))
    assert rows[path][3:] == ["? (type not priced)", "?"] and rows[path][2] != "?"
    assert "an instance type not in cluster/prices.yaml: no cost" in text


@pytest.mark.parametrize("images", ["0", "-3", "1e6", "ten", "2.5"])
def test_images_must_be_a_positive_integer(images):
    with pytest.raises(UsageError, match=f"`--images` must be a positive integer, got '{re.escape(images)}'"):
        plan.plan(["cluster/local.yaml"], images)


def test_from_needs_images_and_a_finished_run_that_says_its_workers(tmp_path):
    with pytest.raises(UsageError, match="add --images N"):
        plan.plan([str(REPO / "cluster/local.yaml")], None, str(tmp_path))
    with pytest.raises(UsageError, match="no manifest.json in .*: give the --output of a finished `pipeline run`"):
        plan.measured_rate(str(tmp_path))
    old = finished_run(tmp_path)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (tmp_path / "out" / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "cluster"}))
    with pytest.raises(UsageError, match="does not say how many workers featurized"):
        plan.measured_rate(old)
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest | {"images_per_s": {"featurize": 0.0}}))
    with pytest.raises(UsageError, match="featurized no image"):
        plan.measured_rate(old)


def test_a_bad_images_count_on_the_command_line_is_one_line_and_exit_code_2():
    result = subprocess.run([sys.executable, "-m", "pipeline", "cluster", "plan", "cluster/local.yaml", "--images", "many"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2 and result.stderr == "error: `--images` must be a positive integer, got 'many'\n"


def photo_rows(capsys, *args) -> tuple[dict[tuple[str, str], list[str]], str]:
    """`cluster plan ARGS` with --preprocess: the rows by (step, cluster file), and the whole text on one line."""
    assert cli.main(["cluster", "plan", *args]) == 0
    out = capsys.readouterr().out
    table = out[out.index("  plan  "):].split("\n\n")[0].splitlines()
    header = re.split(r"\s{2,}", table[0].strip())
    assert header == ["plan", "step", "cluster file", "workers", "per worker /s", "hours", "USD", "USD per million photos"]
    starts = [table[0].index(name) for name in header]  # cells by column position: the first column is often empty
    cells = [[line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])] for line in table[1:]]
    return {(row[1], row[2]): row[3:] for row in cells}, " ".join(out.split())


def test_photos_preprocessed_on_cpu_workers_then_featurized_against_everything_on_the_gpu_workers(tmp_path, capsys):
    cpu = cluster_file(tmp_path, CPU_CLUSTER)  # 3 c6i.2xlarge workers of 8 vCPUs
    (tmp_path / "gpu").mkdir()
    gpu = cluster_file(tmp_path / "gpu", GPU_CLUSTER.replace("minimum: 1, maximum: 4", "minimum: null, maximum: null")
                       .replace("n-workers: 1", "n-workers: 2"))  # 2 g4dn.xlarge workers: a T4, 4 vCPUs
    t4_run = finished_run(tmp_path, featurize_per_s=1500.0, workers=1, threads=4, start_s=0.0,
                          devices=("GPU (NVIDIA T4), mixed_float16, tensorflow",))
    rows, text = photo_rows(capsys, gpu, "--images", "100000000", "--from", t4_run,
                            "--preprocess", cpu, "--megapixels", "12")

    n, at_12 = 100_000_000, RATES["preprocess"]["photos-per-s-by-megapixels"][12]
    prepare_hours = n / (8 * at_12 * 3) / 3600  # each core of each CPU worker at the measured rate
    prepare_usd = prepare_hours * (PRICES["t3.large"]["usd-per-hour"] + 3 * PRICES["c6i.2xlarge"]["usd-per-hour"])
    assert rows[("preprocess", cpu)] == ["3 (8 threads)", plan.number(8 * at_12), plan.number(prepare_hours),
                                         plan.number(prepare_usd), plan.number(prepare_usd / 100)]
    gpu_hourly = PRICES["t3.large"]["usd-per-hour"] + 2 * PRICES["g4dn.xlarge"]["usd-per-hour"]
    feed_bound = 4 * 1000 / RATES["thumbnail-feed"]["cores-per-1000-images-per-s"]
    featurize_hours = n / (min(1500.0, feed_bound) * 2) / 3600  # the T4 run's rate, unless its 4 vCPUs cannot feed it
    assert rows[("featurize 100 × 100", gpu)][:3] == ["2 (4 threads)", plan.number(min(1500.0, feed_bound)),
                                                      plan.number(featurize_hours)]
    together = rows[("together", "")]
    assert together[2:4] == [plan.number(prepare_hours + featurize_hours),
                             plan.number(prepare_usd + featurize_hours * gpu_hourly)]
    decode_bound = 4 * RATES["decode"]["photos-per-s-by-megapixels"][12]  # each vCPU decodes raw 12 MP photos
    everything_hours = n / (min(1500.0, decode_bound) * 2) / 3600
    assert rows[("decode 12 MP + featurize", gpu)][:4] == ["2 (4 threads)", plan.number(decode_bound),
                                                          plan.number(everything_hours), plan.number(everything_hours * gpu_hourly)]
    assert everything_hours > prepare_hours + featurize_hours  # a GPU worker's 4 vCPUs starve its T4 on raw photos
    assert "≥" not in " ".join(sum(rows.values(), []))  # every rate measured: no bounds
    assert "benchmarks/photos.py rates" in text and "GrabCut" in text  # the preprocess rate says what it is and where from
    assert "featurized 1500.0 images/s" in text and "35.0 photos/s per vCPU at 12 MP" in text


def test_gpu_workers_without_a_measured_rate_are_bounded_by_their_vcpus_and_say_so(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    rows, text = photo_rows(capsys, "cluster/ec2-gpu.yaml", "--images", "1000000",
                            "--preprocess", "cluster/ec2-cpu.yaml", "--megapixels", "1.9")
    featurize, everything = rows[("featurize 100 × 100", "cluster/ec2-gpu.yaml")], rows[("decode 1.9 MP + featurize", "cluster/ec2-gpu.yaml")]
    assert featurize[0] == everything[0] == "1-8 (4 threads)"  # adaptive: from its most workers to its fewest
    assert featurize[1].startswith("≤ ") and everything[1] == "≤ " + plan.number(4 * RATES["decode"]["photos-per-s-by-megapixels"][1.9])
    assert all(cell.startswith("≥ ") for cell in everything[2:] + rows[("together", "")][2:])
    assert "no measured rate for the NVIDIA T4 of g4dn.xlarge" in text and "their vCPUs alone bound it" in text


def test_a_photos_rate_between_or_beyond_the_sizes_measured_is_linear_in_seconds_per_megapixel():
    entry = {"photos-per-s-by-megapixels": {2: 100.0, 12: 25.0}}  # 10 ms at 2 MP, 40 ms at 12 MP: 3 ms a megapixel
    assert plan.per_core(entry, 2) == pytest.approx(100.0) and plan.per_core(entry, 12) == pytest.approx(25.0)
    assert plan.per_core(entry, 7) == pytest.approx(1 / 0.025)  # halfway: 25 ms
    assert plan.per_core(entry, 22) == pytest.approx(1 / 0.070)  # beyond: the same 3 ms a megapixel
    assert plan.per_core({"photos-per-s-by-megapixels": {12: 30.0}}, 24) == pytest.approx(15.0)  # one size: proportional
    assert plan.interpolation(entry, 7).startswith("between") and plan.interpolation(entry, 22).startswith("extrapolated")
    assert all("source" in RATES[key] and "what" in RATES[key] for key in ("preprocess", "decode", "thumbnail-feed"))


@pytest.mark.parametrize("args, message", [
    (["--preprocess", "cluster/ec2-cpu.yaml"], "--preprocess CPU_FILE and --megapixels MP go together"),
    (["--megapixels", "12"], "--preprocess CPU_FILE and --megapixels MP go together"),
    (["--images", "10", "--preprocess", "cluster/ec2-cpu.yaml", "--megapixels", "-1"], "`--megapixels` must be a number above 0"),
    (["--images", "10", "--preprocess", "cluster/ec2-cpu.yaml", "--megapixels", "twelve"], "`--megapixels` must be a number above 0"),
    (["--preprocess", "cluster/ec2-cpu.yaml", "--megapixels", "12"], "--preprocess plans N photos: add --images N"),
])
def test_preprocess_needs_megapixels_and_images(args, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exited:
        cli.main(["cluster", "plan", "cluster/ec2-gpu.yaml", *args])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and error.startswith(f"error: {message}") and len(error.splitlines()) == 1


@pytest.mark.slow
def test_a_real_run_records_its_workers_and_a_plan_from_it_checks_against_its_manifest(dask_cluster, tmp_path, capsys):
    settings = pipeline.settings(input=str(SAMPLE_DIR), output=str(tmp_path / "out"), cluster=dask_cluster, weights="random")
    manifest = pipeline.run(settings, progress=False, say=lambda message: None)
    assert manifest["cluster"] == {"workers": 1, "threads": 2}  # conftest's LocalCluster
    path = cluster_file(tmp_path, CPU_CLUSTER.replace("n-workers: 3", "n-workers: 5"))
    rows, _ = planned(capsys, path, "--images", "100000000", "--from", str(tmp_path / "out"))

    per_worker = manifest["images_per_s"]["featurize"] / manifest["cluster"]["workers"]
    hours = (manifest["timings_s"]["cluster start"] + 100_000_000 / (per_worker * 5)) / 3600
    usd = hours * (PRICES["t3.large"]["usd-per-hour"] + 5 * PRICES["c6i.2xlarge"]["usd-per-hour"])
    assert rows[path] == ["5 (8 threads)", plan.number(per_worker), plan.number(hours), plan.number(usd), plan.number(usd / 100)]
