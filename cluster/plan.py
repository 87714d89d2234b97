"""`python -m pipeline cluster plan FILE`: what a cluster file would start and its cost per hour, launching nothing."""
from __future__ import annotations

import yaml

from . import local_size
from . import spec as specs


def plan(path: str) -> str:
    """The instances, their hourly price estimate and every setting in force, as text."""
    spec = specs.load(path)
    settings = yaml.safe_dump(specs.settings(spec), sort_keys=False, allow_unicode=True)
    if isinstance(spec, specs.Local):
        n_workers, threads = local_size(spec.n_workers, spec.threads_per_worker)
        head = (f"{path}: a LocalCluster on this machine, {n_workers} worker process(es) × {threads} thread(s); "
                "nothing is launched, nothing is billed")
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
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


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
