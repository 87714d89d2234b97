"""`python -m pipeline cluster plan FILE...`: what cluster files would start, their cost per hour and,
with `--images N`, how long and how much featurizing N images would take on each; launches nothing.

The estimate: featurize seconds = N / (images/s per worker × workers), plus the cluster start a
run measured; cost = those hours × the USD/hour of every instance (cluster/prices.yaml). The rate
per worker is one measured on the file's hardware: a finished output's (`--from OUTPUT`: the featurize
images/s ÷ the workers of the command in its history that featurized the most images) when its run had
the file's kind of workers (CPU, or the same GPU), else cluster/rates.yaml's; hardware with neither
gets no estimate.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
import textwrap

import dask.config
import yaml

from pipeline.config import UsageError, positive_int

from . import local_gpus, local_size
from . import spec as specs

RATES_FILE = pathlib.Path(__file__).with_name("rates.yaml")
NOTE_WIDTH = 110  # characters per line of the notes under the estimates


@dataclasses.dataclass(frozen=True)
class Rate:
    """Images/s one worker featurizes (None: not measured), where the figure comes from, and what it adds."""

    per_worker: float | None
    source: str
    start_s: float = 0.0  # the cluster start that run measured, added to every estimate
    gpu: bool | None = None  # measured on GPU workers; None: not said
    gpu_name: str | None = None  # the GPU measured on (NVIDIA H200...); None: a CPU, or a GPU not named
    threads: float | None = None  # threads per worker of the run measured; None: not said


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Featurizing N images on one cluster file, with its fewest workers and with its most (adaptive ones differ)."""

    workers: tuple[int, int]
    hours: tuple[float, float] | None  # None: no measured rate
    usd: tuple[float, float] | None  # None: no rate, or a type not in prices.yaml; 0 on this machine


def plan(paths: list[str], images: str | None = None, output: str | None = None,
         preprocess: str | None = None, megapixels: str | None = None) -> str:
    """One file: its plan, and its estimate with `images`; several: their estimates side by side.
    With `preprocess` (a CPU cluster file) and `megapixels`: camera photos preprocessed there, then
    featurized on each file, against everything on each file's workers (`photo_plan`)."""
    if output is not None and images is None:
        raise UsageError("--from OUTPUT gives the rate of an estimate: add --images N (how many images to plan for)")
    if (preprocess is None) != (megapixels is None):
        raise UsageError("--preprocess CPU_FILE and --megapixels MP go together: the cluster that would preprocess, "
                         "and the photos' size as taken (12 for 4000 × 3000)")
    if preprocess is not None and images is None:
        raise UsageError("--preprocess plans N photos: add --images N")
    if images is None:
        return "\n\n".join(describe(path) for path in paths)
    n_images = images_to_plan(images)
    rate = measured_rate(output) if output is not None else None
    if preprocess is not None:
        return photo_plan(preprocess, positive_number("--megapixels", megapixels), paths, n_images, rate)
    table = estimates(paths, n_images, rate)
    return table if len(paths) > 1 else f"{describe(paths[0])}\n\n{table}"


def images_to_plan(images: str) -> int:
    """--images: a number, or an S3 Inventory's manifest.json or a listing file whose keys are counted."""
    from pipeline.making import listings

    if listings.is_listing(str(images)):
        return listings.count_keys(str(images), dict(dask.config.get("pipeline.storage-options") or {}))
    return positive_int("--images", images)


def describe(path: str) -> str:
    """The instances, their hourly price estimate and every setting in force, as text."""
    spec = specs.load(path)
    settings = yaml.safe_dump(specs.settings(spec), sort_keys=False, allow_unicode=True)
    if isinstance(spec, specs.Local):
        n_workers, threads = local_size(spec.n_workers, spec.threads_per_worker)
        head = (f"{path}: a LocalCluster on this machine, {count(n_workers, 'worker process', 'worker processes')} × "
                f"{count(threads, 'thread')}; nothing is launched, nothing is billed")
        return f"{head}\n\nsettings\n{indent(settings)}"
    return "\n".join([
        f"{path}: an EC2 cluster in {spec.region} (plan only: nothing is launched)",
        "",
        indent(instance_table(spec)),
        "",
        indent(price_note(spec)),
        "",
        "settings",
        indent(settings),
    ])


def estimates(paths: list[str], n_images: int, rate: Rate | None) -> str:
    """Hours, USD and USD per million images of featurizing `n_images` on each cluster file, with the rates' sources."""
    rows = [("cluster file", "workers", "images/s per worker", "hours", "USD", "USD per million images")]
    notes = [f"rate: {rate.source}"] if rate else []
    for path in paths:
        spec = specs.load(path)
        unlike = rate and unlike_run(spec, rate)
        file_rate = rate if rate and not unlike else table_rate(spec)
        rows.append(table_row(path, spec, file_rate, estimate(spec, n_images, file_rate), n_images))
        notes += [f"{path}: {note}" for note in
                  [*([unlike + ": its rate is not theirs"] if unlike else []),
                   *file_notes(spec, file_rate, measured=file_rate is rate)]]
    head = (f"featurizing {n_images:,} images: the featurize stage (read, decode, model) only; "
            "listing, the PCA fit and writing come after it")
    return table_text(head, rows, notes)


def table_text(head: str, rows: list[tuple[str, ...]], notes: list[str], spot: str = "") -> str:
    """A heading, the table, and its notes wrapped, the prices' own last."""
    prices = specs.prices()
    notes = [*notes, f"prices: on-demand, Linux, {prices['region']}, as of {prices['as-of']} (cluster/prices.yaml); "
                     f"{spot}disks, data transfer and S3 requests not included"]
    notes = [textwrap.fill(note, NOTE_WIDTH, initial_indent="  ", subsequent_indent="    ") for note in notes]
    return "\n".join([head, "", indent(columns(rows)), "", *notes])


def estimate(spec: specs.Local | specs.Ec2, n_images: int, rate: Rate) -> Estimate:
    """Wall hours = (start + N / (rate per worker × workers)) / 3600; USD = hours × USD/hour of every instance."""
    counts = worker_range(spec)
    if rate.per_worker is None or counts[1] == 0:
        return Estimate(counts, None, None)
    hours = tuple((rate.start_s + n_images / (rate.per_worker * k)) / 3600 for k in counts)
    hourly = hourly_prices(spec)
    usd = None if hourly is None else tuple(h * (hourly[0] + k * hourly[1]) for h, k in zip(hours, counts))
    return Estimate(counts, hours, usd)


def worker_range(spec: specs.Local | specs.Ec2) -> tuple[int, int]:
    """The fewest and the most workers featurizing: an adaptive cluster's minimum (at least one) and maximum."""
    if isinstance(spec, specs.Local):
        n_workers = local_size(spec.n_workers, spec.threads_per_worker)[0]
        return n_workers, n_workers
    workers = spec.workers
    if workers.maximum is None:
        return workers.n_workers, workers.n_workers
    return max(workers.minimum or 0, 1), workers.maximum


def hourly_prices(spec: specs.Local | specs.Ec2) -> tuple[float, float] | None:
    """USD/hour of the scheduler and of one worker: 0 on this machine, None for a type not in prices.yaml."""
    if isinstance(spec, specs.Local):
        return 0.0, 0.0
    known = specs.prices()["instances"]
    types = (spec.scheduler.instance_type, spec.workers.instance_type)
    if any(name not in known for name in types):
        return None
    return tuple(known[name]["usd-per-hour"] for name in types)


def worker_hardware(spec: specs.Local | specs.Ec2) -> tuple[int | None, bool]:
    """Threads per worker (None: not known) and whether each worker has a GPU."""
    if isinstance(spec, specs.Local):
        return local_size(spec.n_workers, spec.threads_per_worker)[1], local_gpus() > 0
    info = specs.prices()["instances"].get(spec.workers.instance_type, {})
    return spec.workers.threads or info.get("vcpus"), spec.workers.gpu


def worker_gpu(spec: specs.Local | specs.Ec2) -> str | None:
    """The GPU each worker featurizes on (NVIDIA T4...), "GPU" when not known; None for CPU workers."""
    if not worker_hardware(spec)[1]:
        return None
    if isinstance(spec, specs.Local):
        return local_gpu_model()
    return specs.prices()["instances"].get(spec.workers.instance_type, {}).get("gpu") or "GPU"


def unlike_run(spec: specs.Local | specs.Ec2, rate: Rate) -> str | None:
    """Why a run's rate cannot price these workers (a CPU run for GPU workers, another GPU...), or None if it can.

    A GPU featurizes tens of times faster than a CPU, and one GPU several times faster than another.
    """
    if rate.gpu is None:  # an output from before the manifest recorded devices: threads are all there is to compare
        return None
    theirs, ran = worker_gpu(spec), (rate.gpu_name or "a GPU not named in its manifest") if rate.gpu else None
    if theirs == ran and theirs != "GPU":
        return None
    return f"its workers featurize on {'a CPU' if theirs is None else theirs}, the run featurized on {ran or 'a CPU'}"


def measured_rate(output: str) -> Rate:
    """The images/s per worker of a finished output: the featurize images/s ÷ the worker processes of the command
    in its history that featurized the most images (manifest.json)."""
    from pipeline.output import Output

    out = Output.at(output, dict(dask.config.get("pipeline.storage-options") or {}))
    url, manifest = out.url, out.manifest()
    command, where = steadiest_command(manifest)
    size = command.get("cluster") or {}
    if not size.get("workers"):
        raise UsageError(
            f"{url}/manifest.json does not say how many workers featurized (it was written before the manifest "
            "recorded `cluster`): give the output of a newer run, or plan without --from"
        )
    speed = command["images_per_s"]
    if not speed:
        raise UsageError(f"{url}: its last command featurized no image, so it measured no rate: give the output of one that did")
    workers, threads = size["workers"], size["threads"]
    devices = manifest["model"].get("devices") or []
    start = command["cluster_start_s"]
    source_text = (
        f"{url} featurized {speed:.1f} images/s ({where}) on {count(workers, 'worker')} with "
        f"{count(threads, 'thread')} in all ({', '.join(devices) or 'devices not recorded'}): {speed / workers:.1f} per worker; "
        f"plus its cluster start, {start:.1f} s"
    )
    gpu = any(device.startswith("GPU") for device in devices) if devices else None
    names = {match.group(1) for device in devices if (match := re.match(r"GPU \((.+?)\)", device))}
    return Rate(speed / workers, source_text, start, gpu, names.pop() if len(names) == 1 else None, threads / workers)


def steadiest_command(manifest: dict) -> tuple[dict, str]:
    """The history's command that featurized the most images (an update of a few measures its fixed costs, not a
    rate), and where its figures are; the manifest's own, its last command's, for outputs whose history has no rates."""
    timed = [entry for entry in manifest.get("history", []) if "images_per_s" in entry]
    if not timed:
        return ({"images_per_s": manifest["images_per_s"]["featurize"], "cluster": manifest.get("cluster"),
                 "cluster_start_s": manifest["timings_s"].get("cluster start", 0.0)}, "manifest images_per_s.featurize")
    best = max(timed, key=lambda entry: entry.get("featurized", 0))
    return best, f"its {best['command']} of {best['started'][:10]}, {best.get('featurized', 0):,} images: manifest history"


def table_rate(spec: specs.Local | specs.Ec2) -> Rate:
    """The rate per worker of cluster/rates.yaml for this cluster's workers; per_worker None where none was measured."""
    rates = yaml.safe_load(RATES_FILE.read_text())
    if isinstance(spec, specs.Local):
        if local_gpus():
            return gpu_rate(rates, local_gpu_model(), "this machine")
        threads = local_size(spec.n_workers, spec.threads_per_worker)[1]
        core = rates["cpu-core"]
        return Rate(core["images-per-s"] * threads, f"{core['images-per-s']} images/s per core × {count(threads, 'thread')}, "
                    f"from cluster/rates.yaml ({core['what']}; {core['source']}); another CPU will differ")
    instance = spec.workers.instance_type
    if instance in rates["instances"]:
        entry = rates["instances"][instance]
        return Rate(entry["images-per-s"], f"{instance}: {entry['what']}; {entry['source']}")
    gpu = specs.prices()["instances"].get(instance, {}).get("gpu")
    if spec.workers.gpu and gpu:
        return gpu_rate(rates, gpu, instance)
    return Rate(None, f"no measured rate for {instance} workers in cluster/rates.yaml: give --from OUTPUT, a run on them")


def gpu_rate(rates: dict, gpu: str, where: str) -> Rate:
    """The measured rate of one GPU worker on `gpu`, or none (the GPUs measured are named)."""
    entry = rates["gpus"].get(gpu)
    if entry is None:
        return Rate(None, f"no measured rate for the {gpu} of {where} in cluster/rates.yaml (it has "
                          f"{', '.join(rates['gpus'])}): give --from OUTPUT, a run on it")
    return Rate(entry["images-per-s"], f"{entry['images-per-s']} images/s per {gpu} worker, from cluster/rates.yaml "
                                       f"({entry['what']}; {entry['source']})")


def local_gpu_model() -> str:
    """The name the NVIDIA driver gives this machine's first GPU (e.g. NVIDIA H200), read without CUDA."""
    from pipeline.making.featurize import gpu_name

    return gpu_name() or "GPU"


def table_row(path: str, spec: specs.Local | specs.Ec2, rate: Rate, result: Estimate, n_images: int) -> tuple[str, ...]:
    """One line of the estimates table."""
    if result.hours is None:
        return (path, workers_cell(spec, result), "no measured rate" if rate.per_worker is None else "-", "?", "?", "?")
    return (path, workers_cell(spec, result), number(rate.per_worker), *money_cells(spec, result, n_images))


def workers_cell(spec: specs.Local | specs.Ec2, result: Estimate) -> str:
    """`4 (8 threads)`, `1-8 (4 threads)`: the workers of an estimate and each one's threads where known."""
    threads = worker_hardware(spec)[0]
    return span(result.workers, str) + (f" ({count(threads, 'thread')})" if threads else "")


def money_cells(spec: specs.Local | specs.Ec2, result: Estimate, n: int, floor: str = "") -> tuple[str, str, str]:
    """Hours, USD and USD per million of an estimate; `floor` ("≥ ") where they are only lower bounds."""
    if result.hours is None:
        return "?", "?", "?"
    hours = floor + span(result.hours, number)
    if isinstance(spec, specs.Local):
        return hours, "0 (this machine)", "0"
    if result.usd is None:
        return hours, "? (type not priced)", "?"
    return hours, floor + span(result.usd, number), floor + span([usd / n * 1e6 for usd in result.usd], number)


def file_notes(spec: specs.Local | specs.Ec2, rate: Rate, measured: bool) -> list[str]:
    """What a reader of one file's estimate must know: where its rate comes from, and what it assumes."""
    notes = [] if measured else [rate.source]
    low, high = worker_range(spec)
    if high == 0:
        notes.append("it starts no workers (`workers.n-workers: 0`): nothing would be featurized")
    if low != high:
        notes.append(f"adaptive: the range goes from {high} workers (fastest) to {low}")
    threads = worker_hardware(spec)[0]
    if measured and threads and rate.threads and threads != rate.threads:
        notes.append(f"its workers have {count(threads, 'thread')} each, the run's {count(rate.threads, 'thread')}: "
                     "the estimate assumes each featurizes as fast")
    if isinstance(spec, specs.Ec2):
        notes.append("instances' boot and image pull: not measured, not included" if not measured else
                     "the cluster start is the run's, not this cluster's boot (instances, image pull: not measured)")
        if spec.spot:
            notes.append("spot workers: priced on demand here; spot usually costs much less")
        if hourly_prices(spec) is None:
            notes.append("an instance type not in cluster/prices.yaml: no cost")
    return notes


# --- camera photos: preprocess on CPU workers, then featurize, against everything on the GPU workers ---------------


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a photo plan on one cluster file: its rate per worker (an upper bound where `bound`) and estimate."""

    name: str
    path: str
    spec: specs.Local | specs.Ec2
    per_worker: float | None  # photos or images/s; None: neither a measured rate nor a bound
    bound: bool  # the rate is only a bound (the workers' cores), the model's own rate not measured: hours are a floor
    result: Estimate


def photo_plan(cpu_file: str, megapixels: float, paths: list[str], n_photos: int, rate: Rate | None) -> str:
    """N camera photos of `megapixels`: preprocessed on `cpu_file` then featurized on each file, against
    everything on that file's workers (the raw photos decoded by their own vCPUs); hours and USD of each."""
    rates = yaml.safe_load(RATES_FILE.read_text())
    preprocess, decode, feed = rates["preprocess"], rates["decode"], rates["thumbnail-feed"]
    prepare_per_core = per_core(preprocess, megapixels)
    decode_per_core = per_core(decode, megapixels)
    feed_per_core = 1000 / feed["cores-per-1000-images-per-s"]
    cpu_spec = specs.load(cpu_file)
    prepared = step("preprocess", cpu_file, cpu_spec, n_photos, None, cores_bound(cpu_spec, prepare_per_core), exact=True)
    rows = [("plan", "step", "cluster file", "workers", "per worker /s", "hours", "USD", "USD per million photos")]
    notes = [f"rate: {rate.source}"] if rate else []
    for path in paths:
        spec = specs.load(path)
        unlike = rate and unlike_run(spec, rate)
        model = rate if rate and not unlike else table_rate(spec)
        featurized = step("featurize 100 × 100", path, spec, n_photos, model.per_worker,
                          cores_bound(spec, feed_per_core) if worker_gpu(spec) else None)
        everything = step(f"decode {megapixels:g} MP + featurize", path, spec, n_photos, model.per_worker,
                          cores_bound(spec, decode_per_core))
        rows += [
            (f"preprocess on {cpu_file}, then featurize", *step_cells(prepared, n_photos)),
            ("", *step_cells(featurized, n_photos)),
            ("", "together", "", "", "", *total_cells([prepared, featurized], n_photos)),
            (f"everything on {path}", *step_cells(everything, n_photos)),
        ]
        notes += [f"{path}: {note}" for note in [
            *([unlike + ": its rate is not theirs"] if unlike else []),
            *([model.source] if model is not rate else []),
            *(["its GPU workers' vCPUs bound how many 100 × 100 images they feed: "
               f"{feed_per_core:,.0f} images/s per vCPU ({feed['cores-per-1000-images-per-s']} cores per 1,000 images/s)"]
              if worker_gpu(spec) else []),
            f"everything: each worker's vCPUs decode the raw photos, {decode_per_core:,.1f} photos/s per vCPU at "
            f"{megapixels:g} MP; the rate per worker is the least of that and the model's",
        ]]
    notes += [
        f"preprocess: {prepare_per_core:,.2f} photos/s per core at {megapixels:g} MP ({interpolation(preprocess, megapixels)}): "
        f"{preprocess['what']}; {preprocess['source']}",
        f"decode: {decode['what']}; {decode['source']}",
        f"feed: {feed['what']}; {feed['source']}",
        "≤ a rate, ≥ hours and USD: no measured model rate for those workers, their vCPUs alone bound it (give --from OUTPUT, a run on them)",
        "the model sees raw photos as they are when everything runs on the GPU workers: no fruit found, cropped nor "
        "whitened, so they are recognized worse (issue 26)",
        "instances' boot, listing, the PCA fit and writing: not included",
    ]
    head = (f"{n_photos:,} camera photos of {megapixels:g} MP: preprocessed on {cpu_file} (to 100 × 100), then featurized, "
            "against everything on the GPU workers")
    return table_text(head, rows, notes, spot="spot workers priced on demand (spot usually costs much less); ")


def positive_number(name: str, value: str) -> float:
    """`value` as a number above 0, or a UsageError naming the option."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if not number > 0 or number == float("inf"):
        raise UsageError(f"`{name}` must be a number above 0, got {value!r}")
    return number


def per_core(entry: dict, megapixels: float) -> float:
    """Photos/s one core manages at `megapixels`, a photo's seconds taken as linear in its megapixels between
    (and beyond) the sizes measured."""
    measured = sorted((float(mp), 1 / float(per_s)) for mp, per_s in entry["photos-per-s-by-megapixels"].items())
    if len(measured) == 1:
        (mp, seconds), = measured
        return 1 / (seconds * megapixels / mp)
    low, high = (measured[:2] if megapixels <= measured[0][0] else measured[-2:] if megapixels >= measured[-1][0]
                 else next(pair for pair in zip(measured, measured[1:]) if pair[0][0] <= megapixels <= pair[1][0]))
    seconds = low[1] + (high[1] - low[1]) * (megapixels - low[0]) / (high[0] - low[0])
    return 1 / max(seconds, min(s for _, s in measured) * 1e-3)


def interpolation(entry: dict, megapixels: float) -> str:
    """How a rate at `megapixels` comes from those measured: one of them, between two, or beyond them."""
    sizes = sorted(float(mp) for mp in entry["photos-per-s-by-megapixels"])
    if megapixels in sizes:
        return "measured at that size"
    if sizes[0] < megapixels < sizes[-1]:
        return f"between the {', '.join(f'{mp:g}' for mp in sizes)} MP measured"
    return f"extrapolated from the {', '.join(f'{mp:g}' for mp in sizes)} MP measured"


def cores_bound(spec: specs.Local | specs.Ec2, per_core_rate: float) -> float | None:
    """What a worker's cores (threads, else vCPUs) manage at `per_core_rate` each; None where not known."""
    threads = worker_hardware(spec)[0]
    return None if threads is None else threads * per_core_rate


def step(name: str, path: str, spec, n: int, model: float | None, bound: float | None, exact: bool = False) -> Step:
    """A step at the least of the model's rate and the cores' bound; `exact`: the bound is the rate itself."""
    if exact or model is None:
        per_worker, is_bound = bound, not exact and bound is not None
    else:
        per_worker, is_bound = model if bound is None else min(model, bound), False
    return Step(name, path, spec, per_worker, is_bound, estimate(spec, n, Rate(per_worker, "")))


def step_cells(done: Step, n: int) -> tuple[str, ...]:
    """The cells of one step: its name, file, workers, rate per worker, hours, USD, USD per million."""
    workers = workers_cell(done.spec, done.result)
    if done.per_worker is None:
        return (done.name, done.path, workers, "no measured rate", "?", "?", "?")
    return (done.name, done.path, workers, ("≤ " if done.bound else "") + number(done.per_worker),
            *money_cells(done.spec, done.result, n, "≥ " if done.bound else ""))


def total_cells(steps: list[Step], n: int) -> tuple[str, str, str]:
    """Hours, USD and USD per million of steps run one after the other (fewest workers with fewest, most with most)."""
    if any(done.result.hours is None for done in steps):
        return "?", "?", "?"
    floor = "≥ " if any(done.bound for done in steps) else ""
    hours = [sum(sorted(done.result.hours)[i] for done in steps) for i in (0, 1)]
    usd = None if any(done.result.usd is None for done in steps) else [
        sum(sorted(done.result.usd)[i] for done in steps) for i in (0, 1)]
    if usd is None:
        return floor + span(hours, number), "?", "?"
    return floor + span(hours, number), floor + span(usd, number), floor + span([u / n * 1e6 for u in usd], number)


def count(n: float, noun: str, plural: str | None = None) -> str:
    """`1 thread`, `2 threads`, `1.5 threads`."""
    return f"{n:g} {noun if n == 1 else plural or noun + 's'}"


def columns(rows: list[tuple[str, ...]]) -> str:
    """Rows as left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def span(values, fmt) -> str:
    """`a` or `a-b`, smallest first, as `fmt` writes each."""
    ordered = sorted(values)
    low, high = fmt(ordered[0]), fmt(ordered[-1])
    return low if low == high else f"{low}-{high}"


def number(value: float) -> str:
    """Three significant digits, or whole numbers with thousands separators from 100 up."""
    return f"{value:,.0f}" if value >= 100 else f"{value:#.3g}"


def instance_table(spec: specs.Ec2) -> str:
    """One row per role (scheduler, workers) and the total per hour, from cluster/prices.yaml."""
    known = specs.prices()["instances"]
    workers = spec.workers
    rows = [("role", "instance type", "count", "vCPU", "memory", "GPU", "USD/hour each", "USD/hour")]
    cost = {"now": 0.0, "low": 0.0, "high": 0.0}
    unknown = False
    adaptive = workers.maximum is not None
    for role, instance, counts in (
        ("scheduler", spec.scheduler.instance_type, {"now": 1, "low": 1, "high": 1}),
        ("workers", workers.instance_type, {"now": workers.n_workers, "low": workers.minimum or 0 if adaptive else
                                            workers.n_workers, "high": workers.maximum if adaptive else workers.n_workers}),
    ):
        count = f"{counts['now']}" + (f" (adapts {counts['low']}-{counts['high']})" if role == "workers" and adaptive else "")
        info = known.get(instance)
        if info is None:
            unknown = True
            rows.append((role, instance, count, "?", "?", "?", "not in the table", "?"))
            continue
        price = info["usd-per-hour"]
        gpu = f"{info['gpus']} × {info['gpu']}" if info.get("gpus") else "-"
        rows.append((role, instance, count, str(info["vcpus"]), f"{info['memory-gib']} GiB", gpu, f"{price:.4g}",
                     f"{price * counts['now']:.2f}"))
        for key in cost:
            cost[key] += price * counts[key]
    total = f"{cost['now']:.2f}" + (f" (adapts {cost['low']:.2f} to {cost['high']:.2f})" if adaptive else "")
    rows.append(("total", "", "", "", "", "", "", total + (" + types not in the table" if unknown else "")))
    return columns(rows)


def price_note(spec: specs.Ec2) -> str:
    """Where the prices come from and what they leave out."""
    table = specs.prices()
    notes = [f"Prices: on-demand, Linux, {table['region']}, as of {table['as-of']} (cluster/prices.yaml); "
             "disks, data transfer and S3 requests not included."]
    if spec.region != table["region"]:
        notes.append(f"{spec.region} is priced differently from {table['region']}: check AWS's price list.")
    if spec.spot:
        notes.append("Workers are spot instances: they usually cost much less than shown, at a price that moves.")
    if spec.workers.gpu:
        notes.append("Featurize tasks run on the GPU workers (resource GPU=1, docker --gpus=all).")
    if not spec.docker_image:
        notes.append("`docker-image` is not set: a run needs it (build cluster/Dockerfile and push it).")
    return "\n".join(notes)


def indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line if line else line for line in text.rstrip("\n").splitlines())
