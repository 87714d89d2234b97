"""Starting a run over many objects: an S3 Inventory as --input at 10^5, 10^6 and 10^7 keys, and a prefix listed on the
S3 server by the workers or by the client alone.

inventory   Writes an inventory in AWS's own layout (destination-prefix/source-bucket/config-ID/<date>/manifest.json,
            data/<uuid>.csv.gz with URL-encoded keys, sizes, last-modified, ETags; some 10^6 keys a data file) under
            --workdir, starts a real `dask scheduler` and one `dask worker` process of --workers processes, and runs
            `python -m pipeline run --input …/manifest.json --cluster tcp://…` as a user types it. The keys name no
            object (reads would fail): the listing and the scheduling are what is measured, so the run is stopped as
            soon as the scheduler starts its first featurize task. Prints the seconds from the command to that task,
            the client's and the scheduler's peak RSS (the kernel's VmHWM of each process, 2 s after that task
            started: the client goes on submitting, a window of tasks at a time), the partitions (the run's
            featurize tasks) and those submitted by then, and how long the workers took to list the first data
            files, whose partitions are featurized while they list the others (what the command says, including
            the workers' first import of the pipeline), and the load average (the machine may be shared).
prefix      Puts --prefix-keys objects (empty: a listing does not read them) into a moto S3 server on loopback, in
            100 folders, and lists them as `run` does: by the client alone (source.list_images), and by the workers
            (listings.partitions of a worker-listed prefix on --prefix-workers worker processes). Same rows, same order.

    .venv/bin/python benchmarks/listing.py                      # 10^5, 10^6, 10^7 keys and a prefix of 10^5 (some 15 minutes)
    .venv/bin/python benchmarks/listing.py --keys 100000 --prefix-keys 10000   # a try

Disk: some 17 bytes a key (10^7: 170 MB), removed at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.million import child_env, mib  # noqa: E402

SCHEMA = "Bucket, Key, Size, LastModifiedDate, ETag, IsMultipartUploaded, StorageClass"
PER_FILE = 1_000_000  # keys a data file
PER_FOLDER = 1_000  # images a folder (a label)
GOALS = {"first task s": 30, "client MiB": 300, "client ratio": 1.1, "prefix speedup": 3}


def peak_rss(pid: int) -> int:
    """The kernel's high-water mark of a process's resident memory (bytes)."""
    return int(re.search(r"VmHWM:\s+(\d+) kB", pathlib.Path(f"/proc/{pid}/status").read_text()).group(1)) * 1024


def keys(first: int, n: int) -> pa.Array:
    """Keys first … first + n - 1 as a camera bucket's: photos/<folder>/<number>.jpg, some with a space to URL-encode."""
    numbers = pa.array(range(first, first + n), pa.int64())
    folder = pc.utf8_lpad(pc.cast(pc.divide(numbers, PER_FOLDER), pa.string()), 6, "0")
    name = pc.utf8_lpad(pc.cast(numbers, pa.string()), 10, "0")
    return pc.binary_join_element_wise("photos/farm%20", folder, "/", name, ".jpg", "")


def write_inventory(folder: pathlib.Path, n: int, bucket: str = "camera") -> pathlib.Path:
    """An inventory of `n` keys in AWS's layout under `folder` (a copy of the destination bucket); its manifest.json."""
    config = f"inventory/{bucket}/daily"
    files = []
    for index, first in enumerate(range(0, n, PER_FILE)):
        key = f"{config}/data/{index:08x}-8f2c-4b6e-9a51-{n:012d}.csv.gz"
        path = folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with pa.CompressedOutputStream(str(path), "gzip") as out:
            for start in range(first, min(first + PER_FILE, n), 100_000):
                count = min(100_000, first + PER_FILE - start, n - start)
                table = pa.table({
                    "Bucket": pa.repeat(pa.scalar(bucket), count), "Key": keys(start, count),
                    "Size": pa.repeat(pa.scalar("1048576"), count),
                    "LastModifiedDate": pa.repeat(pa.scalar("2026-12-01T00:00:00.000Z"), count),
                    "ETag": pc.utf8_lpad(pc.cast(pa.array(range(start, start + count)), pa.string()), 32, "e"),
                    "IsMultipartUploaded": pa.repeat(pa.scalar("false"), count),
                    "StorageClass": pa.repeat(pa.scalar("STANDARD"), count),
                })
                pacsv.write_csv(table, out, pacsv.WriteOptions(include_header=False, quoting_style="all_valid"))
        files.append({"key": key, "size": path.stat().st_size, "MD5checksum": "0" * 32})
    manifest = folder / config / "2026-12-01T01-00Z" / "manifest.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({
        "sourceBucket": bucket, "destinationBucket": "arn:aws:s3:::inventory", "version": "2016-11-30",
        "creationTimestamp": "1764550800000", "fileFormat": "CSV", "fileSchema": SCHEMA, "files": files}))
    return manifest


class Cluster:
    """A real `dask scheduler` and one `dask worker` process of `workers` processes, one thread each."""

    def __init__(self, folder: pathlib.Path, workers: int):
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / "scheduler.json"
        self.log = open(folder / "cluster.log", "w")
        self.scheduler = subprocess.Popen(
            [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
             "--scheduler-file", str(file)], env=child_env(), stdout=self.log, stderr=subprocess.STDOUT)
        while not file.exists() or not file.read_text().strip():
            time.sleep(0.2)
        self.address = json.loads(file.read_text())["address"]
        self.workers = subprocess.Popen(
            [sys.executable, "-m", "dask", "worker", self.address, "--nworkers", str(workers), "--nthreads", "1",
             "--host", "127.0.0.1", "--no-dashboard", "--local-directory", str(folder / "space")],
            env=child_env(), stdout=self.log, stderr=subprocess.STDOUT)
        from distributed import Client
        self.client = Client(self.address, timeout=120)
        self.client.wait_for_workers(workers, timeout=120)

    def stop(self) -> None:
        self.client.close()
        for process in (self.workers, self.scheduler):
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.log.close()


def load() -> str:
    """The machine's load average over 1, 5 and 15 minutes (it is shared: say how busy it was)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def featurize_tasks(dask_scheduler) -> tuple[int, int]:
    """On the scheduler: its featurize tasks, and how many of them a worker is running."""
    tasks = [t for key, t in dask_scheduler.tasks.items() if str(key).startswith("featurize-")]
    return len(tasks), sum(t.state == "processing" for t in tasks)


def inventory_run(n: int, work: pathlib.Path, workers: int) -> dict:
    """`python -m pipeline run` from an inventory of `n` keys, until its first featurize task starts."""
    folder = work / f"inventory-{n}"
    made = time.perf_counter()
    manifest = write_inventory(folder / "destination", n)
    print(f"\n{n:,} keys: inventory written in {time.perf_counter() - made:.1f} s "
          f"({sum(f.stat().st_size for f in folder.rglob('*.gz')) / 2**20:.0f} MiB of CSV.gz)", flush=True)
    cluster = Cluster(folder / "cluster", workers)
    argv = [sys.executable, "-m", "pipeline", "run", "--input", str(manifest), "--output", str(folder / "out"),
            "--cluster", cluster.address, "--weights", "random", "--image-size", "32",
            "--endpoint-url", "http://127.0.0.1:9"]  # no S3 there: the keys are never read
    print("  $ " + " ".join(argv[1:]), flush=True)
    log = open(folder / "client.log", "w")
    started = time.perf_counter()
    client = subprocess.Popen(argv, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    first, tasks = None, 0
    try:
        while client.poll() is None and time.perf_counter() - started < 600:
            tasks, running = cluster.client.run_on_scheduler(featurize_tasks)
            if running and first is None:
                first = time.perf_counter() - started
            if first is not None:
                break
            time.sleep(0.1)
        time.sleep(2.0)  # the client goes on submitting: its peak and the scheduler's a little later
        result = {"keys": n, "first task s": first, "client": peak_rss(client.pid), "scheduler": peak_rss(cluster.scheduler.pid),
                  "submitted": cluster.client.run_on_scheduler(featurize_tasks)[0], "load": load()}
    finally:
        client.kill()
        client.wait()
        log.close()
        cluster.stop()
    said = (folder / "client.log").read_text(errors="replace")
    listed = re.search(r"first (\d+) partitions of up to (\d+) images listed in ([\d.]+) s \((\d+) of (\d+) data files\)", said)
    if first is None or not listed:
        raise RuntimeError(f"the run did not reach its first featurize task: see {folder / 'client.log'}")
    size = int(listed[2])
    result |= {"partitions": -(-n // size), "size": size, "first listed": int(listed[1]), "listing s": float(listed[3]),
               "files": f"{listed[4]} of {listed[5]}"}
    print(f"  first featurize task after {first:.1f} s; {result['partitions']:,} partitions of up to {size}, the first "
          f"{result['first listed']:,} listed in {result['listing s']:.1f} s ({result['files']} data files); "
          f"client {mib(result['client'])}, scheduler {mib(result['scheduler'])}; {load()}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[10**5, 10**6, 10**7])
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the inventory runs")
    parser.add_argument("--prefix-keys", type=int, default=10**5)
    parser.add_argument("--prefix-workers", type=int, default=4)
    parser.add_argument("--workdir", default="/tmp/listing/benchmark")
    parser.add_argument("--keep", action="store_true", help="keep the inventories under --workdir")
    args = parser.parse_args()
    work = pathlib.Path(args.workdir)
    results = []
    try:
        for n in args.keys:
            results.append(inventory_run(n, work, args.workers))
            shutil.rmtree(work / f"inventory-{n}" / "destination", ignore_errors=True)
        prefix = prefix_runs(args.prefix_keys, args.prefix_workers, work) if args.prefix_keys else None
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results, prefix, args)
    return 0


def print_table(results: list[dict], prefix: dict | None, args) -> None:
    print(f"\nInventory (CSV.gz, AWS's layout) as --input, {args.workers} worker processes of 1 thread; "
          f"run stopped at its first featurize task")
    print("| keys | first featurize task | client peak | scheduler peak | partitions (images a task) | tasks submitted then | "
          "first data files listed (partitions) | load average then |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['keys']:,} | {r['first task s']:.1f} s | {mib(r['client'])} | {mib(r['scheduler'])} | "
              f"{r['partitions']:,} ({r['size']}) | {r['submitted']:,} | {r['files']}: {r['listing s']:.1f} s ({r['first listed']:,}) | "
              f"{r['load']} |")
    if results:
        largest, smallest = results[-1], results[0]
        ratio = largest["client"] / smallest["client"]
        print(f"\nclient peak {largest['keys']:,} / {smallest['keys']:,} keys: {ratio:.2f}x")
        for goal, ok in ((f"first task within {GOALS['first task s']} s at {largest['keys']:,}", largest["first task s"] <= GOALS["first task s"]),
                         (f"client peak <= {GOALS['client MiB']} MiB", largest["client"] <= GOALS["client MiB"] * 2**20),
                         (f"client peak <= {GOALS['client ratio']}x its peak at {smallest['keys']:,}", ratio <= GOALS["client ratio"])):
            print(f"{'GOAL' if ok else 'MISS'}: {goal}")
    if prefix:
        print(f"\nPrefix of {prefix['keys']:,} objects in {prefix['folders']} folders on the moto S3 server (loopback)")
        print("| listed by | seconds | images | same rows, same order |")
        print("|---|---:|---:|---|")
        print(f"| the client alone | {prefix['client s']:.1f} | {prefix['client images']:,} | |")
        print(f"| {prefix['workers']} worker processes | {prefix['workers s']:.1f} | {prefix['workers images']:,} | {prefix['same']} |")
        print("\n| LIST calls alone (boto3, 1,000 keys a page) | calls | seconds | calls / s | the server's CPU s (its one process) |")
        print("|---|---:|---:|---:|---:|")
        for c in prefix["calls"]:
            print(f"| {c['clients']} client process{'es' if c['clients'] > 1 else ''} at once | {c['calls']} | {c['seconds']:.1f} | "
                  f"{c['calls'] / c['seconds']:.2f} | {c['server cpu']:.1f} |")
        one, many = prefix["calls"]
        print(f"LIST calls: {many['clients']} clients {one['seconds'] / many['seconds']:.2f}x the speed of one; the server busy "
              f"{one['server cpu'] / one['seconds']:.2f} and {many['server cpu'] / many['seconds']:.2f} of a core")
        speedup = prefix["client s"] / prefix["workers s"]
        print(f"\nspeed-up {speedup:.1f}x\n{'GOAL' if speedup >= GOALS['prefix speedup'] else 'MISS'}: "
              f">= {GOALS['prefix speedup']}x faster with {prefix['workers']} workers")


LIST_BY = """
import hashlib, json, sys, time
import dask
from distributed import Client
from pipeline import source
from pipeline.making import listings, sink
url, endpoint, address, out = sys.argv[1:5]
options, extensions = {"endpoint_url": endpoint}, tuple(dask.config.get("pipeline.extensions"))
started = time.perf_counter()
if address == "client":
    rows = source.list_images(url, options, extensions).rows
else:
    with Client(address) as client:
        listed = listings.partitions(listings.open_prefix(url, options, extensions), client, *source.open_url(out, {}), 256)
    seconds = time.perf_counter() - started
    rows = [sink.partition_rows(source.open_url(out, {})[0], path, byte_range) for path, byte_range, _ in listed.parts]
    import pandas as pd
    rows = pd.concat(rows, ignore_index=True)
seconds = locals().get("seconds") or time.perf_counter() - started
digest = hashlib.sha256("\\n".join(f"{p}|{i}" for p, i in zip(rows.path, rows.identity)).encode()).hexdigest()
print(json.dumps({"seconds": seconds, "images": len(rows), "digest": digest}))
"""


def prefix_runs(n: int, workers: int, work: pathlib.Path) -> dict:
    """A prefix of `n` empty objects in 100 folders on a moto S3 server here, listed by the client alone and by the workers."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ACCESS_KEY_ID="FAKEKEYLISTINGBENCH0", AWS_SECRET_ACCESS_KEY="fake/secret", AWS_DEFAULT_REGION="us-east-1")
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line a request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    made = time.perf_counter()
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"] if "aws" in s3_backends[DEFAULT_ACCOUNT_ID] else s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    backend.create_bucket("camera", "us-east-1")
    per_folder = max(1, n // 100)
    for i in range(n):  # straight into the server's store: an upload a key through HTTP would take 20 minutes
        backend.put_object("camera", f"photos/{i // per_folder:04d}/{i:08d}.jpg", b"")
    print(f"\nprefix: {n:,} objects in the S3 server in {time.perf_counter() - made:.1f} s", flush=True)
    url, result = "s3://camera/photos", {"keys": n, "folders": -(-n // per_folder), "workers": workers}
    try:
        folders = [f"photos/{i:04d}/" for i in range(result["folders"])]
        result["calls"] = [list_calls(endpoint, folders, clients) for clients in (1, workers)]
        for c in result["calls"]:
            print(f"  LIST calls alone, {c['clients']} client processes: {c['calls']} calls in {c['seconds']:.1f} s; "
                  f"the server's CPU {c['server cpu']:.1f} s; {load()}", flush=True)
        by_client = list_by(url, endpoint, "client", work)
        cluster = Cluster(work / "prefix-cluster", workers)
        try:  # warm workers, as the client's process is when it starts listing: each has imported the pipeline
            cluster.client.run(lambda: __import__("pipeline.making.listings"))
            by_workers = list_by(url, endpoint, cluster.address, work)
        finally:
            cluster.stop()
    finally:
        server.stop()
    result |= {"client s": by_client["seconds"], "client images": by_client["images"], "workers s": by_workers["seconds"],
               "workers images": by_workers["images"], "same": "yes" if by_client["digest"] == by_workers["digest"] else "NO"}
    print(f"  client alone {by_client['seconds']:.1f} s, {workers} workers {by_workers['seconds']:.1f} s; same rows: {result['same']}")
    return result


LIST_CALLS = """
import json, sys, time
import boto3
endpoint, folders = sys.argv[1], json.loads(sys.argv[2])
s3 = boto3.client("s3", endpoint_url=endpoint)
calls = 0
for folder in folders:
    ask = {"Bucket": "camera", "Prefix": folder, "MaxKeys": 1000}
    while True:
        page = s3.list_objects_v2(**ask)
        calls += 1
        if not page.get("IsTruncated"):
            break
        ask["ContinuationToken"] = page["NextContinuationToken"]
print(json.dumps({"calls": calls}))
"""


def list_calls(endpoint: str, folders: list[str], clients: int) -> dict:
    """The LIST calls alone (boto3, pages of 1,000 keys) of every folder, by `clients` processes at once, each its
    share of the folders; with the CPU seconds the server (this process's threads) spent meanwhile."""
    shares = [folders[i::clients] for i in range(clients)]
    cpu, started = time.process_time(), time.perf_counter()
    running = [subprocess.Popen([sys.executable, "-c", LIST_CALLS, endpoint, json.dumps(share)], env=child_env(),
                                stdout=subprocess.PIPE, text=True) for share in shares]
    calls = sum(json.loads(process.communicate(timeout=1200)[0].strip().splitlines()[-1])["calls"] for process in running)
    seconds = time.perf_counter() - started
    return {"clients": clients, "calls": calls, "seconds": seconds, "server cpu": time.process_time() - cpu}


def list_by(url: str, endpoint: str, address: str, work: pathlib.Path) -> dict:
    out = work / f"prefix-{'client' if address == 'client' else 'workers'}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "_staging" / "partitions").mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", LIST_BY, url, endpoint, address, str(out)], env=child_env(),
                          capture_output=True, text=True, timeout=1200)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
