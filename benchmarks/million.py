"""A million images: what grows with the number of images, and nothing lost on the way.

Makes small images (a file each: the shipped sample's 129 photos flipped, rotated, cropped and
recoloured, benchmarks/make_images.py) in local folders, starts a real `dask scheduler` process and
one `dask worker` process (a nanny and its worker, 2 threads), and on them runs, as a user types them,

  run       `python -m pipeline run --cluster tcp://… --image-size 32` (the real model, made cheap:
            the data path and the scheduling are what is measured) on --small images, then on --count
  update    `python -m pipeline update` after 1% more images are added to the input
  report    `python -m pipeline report OUTPUT`, and `evaluate`: `python -m pipeline evaluate OUTPUT`

and `run` on --s3 objects uploaded to a moto S3 server on loopback (listing pages, many small GETs;
the output goes to the same bucket). It prints one table, --small | --count | ratio | S3: listing
time, tasks, each stage's seconds (the manifests' timings_s), images/s, the peak RSS of the client
(the `python -m pipeline` process), of the scheduler and of the worker, sampled apart with psutil,
then what update, report and evaluate took, checks as OK/FAIL lines and goals as GOAL/MISS lines.

During the --count run (unless --no-kills) the client is interrupted (SIGINT) when 20% of the
partitions are staged and run again with --resume, and during that resumed run the worker process
is killed (SIGKILL; its nanny starts another) at 45% and 75%, so that its manifest counts what was redone; that run's figures add up the two invocations (seconds) and take the
larger peak. Every output must then hold exactly one row or one error per image (read back, path by
path), and the manifest says how many partitions were resumed (and redone, where it counts them).

    .venv/bin/python benchmarks/million.py                                     # 1,000,000 (some 80 minutes: see below)
    .venv/bin/python benchmarks/million.py --count 3000 --small 1000 --s3 500  # a try, some 5 minutes on 2 cores

A fresh scheduler and worker are started for each `run` and `update` (an interrupted run and its
--resume share theirs, as a user's would), so each peak is that command's. Images are kept under
--workdir between invocations and made only when missing: a rerun does not remake a million files.
Disk: about 6 KB per image made and 7 KB per image of output, twice while `update` rewrites it
(some 20 GB at the peak for the million). On the 2-core development machine: making images about
1,200 images/s per core (some 10 minutes for the million, once), the featurize stage 250 to 600
images/s from a local folder (less while other work shares the cores); the million's run with its
kills 23 to 25 minutes; the whole benchmark 71 minutes on 2026-12-02 with S3 (moto takes some 65 to
85 uploads a second: 20 to 25 of those minutes) and 32 without (`--s3 0`), the images made earlier.

Needs the `test` extra (moto). Exit code 0 if every check passes, 1 otherwise (a missed goal is
reported, not a failure).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import make_images, throughput  # noqa: E402  (throughput sets fake AWS credentials first)

SAMPLE = REPO / "pipeline" / "sample" / "fruits-360"
STAGES = ("list", "cluster start", "featurize", "pca fit", "project + write")
GOALS = {"peak": 2**30, "peak ratio": 1.5, "time slack": 1.1}
INTERRUPT = 0.2  # fraction of the partitions staged when the client is interrupted, then resumed
KILLS = (0.45, 0.75)  # ... when the worker process is killed, during the resumed run (whose manifest counts the redone)
EXTRA = 0.01  # images added before `update`, as a fraction of the run's
SIGINT_EXIT_S = 120  # a client that has not exited this long after SIGINT is killed (still resumable)
PROGRESS = re.compile(r"\|\s*\d+/\d+ \[")  # a tqdm progress bar's line
LISTING = """
import json, re, sys, time
import dask, psutil
from pipeline import source
before = psutil.Process().memory_info().rss
started = time.perf_counter()
listing = source.list_images(sys.argv[1], json.loads(sys.argv[2]), tuple(dask.config.get("pipeline.extensions")))
# VmHWM, not ru_maxrss: Linux carries a parent's ru_maxrss into a child across fork and exec, and
# the benchmark's own process (which holds the moto server) is far bigger than the listing.
peak = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print(json.dumps({"seconds": time.perf_counter() - started, "images": len(listing.rows), "rss_before": before, "peak": peak}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="images of the big run (default 1000000)")
    parser.add_argument("--small", type=int, default=100_000, help="images of the run to compare with (default 100000)")
    parser.add_argument("--s3", type=int, default=100_000, help="objects of the run from moto S3; 0 skips it (default 100000)")
    parser.add_argument("--image-size", type=int, default=32, help="model input side (default 32: the model made cheap)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads of the one worker process (default: this machine's cores)")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/pipeline-million"),
                        help="images (kept between invocations) and outputs (replaced) (default /tmp/pipeline-million)")
    parser.add_argument("--source", type=pathlib.Path, default=SAMPLE, help=f"photos the images are made from (default {SAMPLE})")
    parser.add_argument("--no-kills", action="store_true", help="no worker kills and no interrupted client in the big run")
    parser.add_argument("--skip-small", action="store_true", help="leave out the --small run (no ratios)")
    parser.add_argument("--skip-big", action="store_true", help="leave out the --count run")
    parser.add_argument("--skip-after", action="store_true", help="leave out update, report and evaluate")
    return parser.parse_args(argv)


def child_env() -> dict[str, str]:
    """This environment, with this checkout first on the path: the client, scheduler and worker run its code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def shown(argv: list[str]) -> str:
    return " ".join(repr(a) if " " in a else a for a in argv)


def mib(n_bytes: float | None) -> str:
    return "" if n_bytes is None else f"{n_bytes / 2**20:,.0f} MiB"


# --- the images --------------------------------------------------------------------------------------


def image_set(workdir: pathlib.Path, name: str, source: pathlib.Path, count: int, start: int = 0) -> dict:
    """Images start … start + count - 1 of the set in workdir/name, made unless an earlier invocation made them."""
    folder, marker = workdir / name, workdir / f"{name}.json"
    wanted = {"count": count, "start": start, "source": str(source), "colour": True}
    if marker.exists():
        made = json.loads(marker.read_text())
        if {key: made.get(key) for key in wanted} == wanted and folder.is_dir():
            print(f"kept {count:,} images in {folder} (made earlier: {made['count'] / made['seconds']:,.0f} images/s)", flush=True)
            return made | {"folder": folder, "kept": True}
    marker.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    print(f"making {count:,} images in {folder} ...", flush=True)
    started = time.perf_counter()
    written = make_images.make_images(source, folder, count, start=start, colour=True)
    made = wanted | {"seconds": time.perf_counter() - started, "bytes": written}
    marker.write_text(json.dumps(made))
    print(f"  made {count:,} images ({written / 2**20:,.0f} MiB) in {made['seconds']:.0f} s: "
          f"{count / made['seconds']:,.0f} images/s", flush=True)
    return made | {"folder": folder, "kept": False}


def relative_images(folder: pathlib.Path) -> list[str]:
    """The image files under `folder`, relative, as the pipeline names them."""
    found = []
    for top, _, files in os.walk(folder):
        base = os.path.relpath(top, folder).replace(os.sep, "/")
        found += [name if base == "." else f"{base}/{name}" for name in files if name.lower().endswith((".jpg", ".jpeg"))]
    return found


def link_in(extra: pathlib.Path, folder: pathlib.Path, relative: list[str]) -> None:
    """Hard-link the extra images into the input folder (same inode: same size and mtime as made)."""
    for name in relative:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and os.path.samefile(target, extra / name):
            continue  # left by an interrupted invocation
        os.link(extra / name, target)


def unlink(extra: pathlib.Path, folder: pathlib.Path, relative: list[str]) -> None:
    """Take the extra images out of the input folder again (only the links to them)."""
    for name in relative:
        target = folder / name
        if target.exists() and os.path.samefile(target, extra / name):
            target.unlink()


# --- the cluster and the commands ----------------------------------------------------------------------


class Cluster:
    """A `dask scheduler` process and a `dask worker` process (its nanny, and the worker it starts) on loopback."""

    def __init__(self, folder: pathlib.Path, threads: int):
        from distributed import Client

        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.folder, self.file = folder, folder / "scheduler.json"
        self.scheduler_log, self.worker_log = open(folder / "scheduler.log", "w"), open(folder / "worker.log", "w")
        started = time.perf_counter()
        self.scheduler = subprocess.Popen(
            [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
             "127.0.0.1:0", "--scheduler-file", str(self.file)],
            cwd=REPO, env=child_env(), stdout=self.scheduler_log, stderr=subprocess.STDOUT)
        self.scheduler_watch = throughput.TreeWatch(self.scheduler.pid, 0.25)
        while not self.file.exists() or not self.file.read_text().strip():
            if self.scheduler.poll() is not None or time.perf_counter() - started > 120:
                raise RuntimeError(f"the scheduler did not start: see {folder / 'scheduler.log'}")
            time.sleep(0.2)
        self.address = json.loads(self.file.read_text())["address"]
        self.nanny = subprocess.Popen(
            [sys.executable, "-m", "dask", "worker", self.address, "--nworkers", "1", "--nthreads", str(threads), "--host",
             "127.0.0.1", "--no-dashboard", "--name", "worker", "--local-directory", str(folder / "worker-space")],
            cwd=REPO, env=child_env(), stdout=self.worker_log, stderr=subprocess.STDOUT)
        self.worker_watch = throughput.TreeWatch(self.nanny.pid, 0.25)
        with Client(self.address, timeout=120) as client:
            client.wait_for_workers(1, timeout=120)
        print(f"  cluster: scheduler {self.address} (pid {self.scheduler.pid}), a worker process with {threads} threads "
              f"under its nanny (pid {self.nanny.pid}); up in {time.perf_counter() - started:.1f} s", flush=True)

    def worker_pid(self) -> int | None:
        """The worker process the nanny runs now (its child from multiprocessing's spawn), or None while it restarts."""
        import psutil

        try:
            for child in psutil.Process(self.nanny.pid).children():
                if "spawn_main" in " ".join(child.cmdline()):
                    return child.pid
        except psutil.Error:
            pass
        return None

    def stop(self) -> dict:
        """Stop both; their peaks (the scheduler's process, the largest of the worker processes) and what was lost."""
        for process in (self.nanny, self.scheduler):
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        scheduler, worker = self.scheduler_watch.finish(), self.worker_watch.finish()
        workers = [p for p in worker["processes"] if p["name"].startswith("worker")]
        self.scheduler_log.close()
        self.worker_log.close()
        log = (self.folder / "scheduler.log").read_text(errors="replace")
        lost = set()
        for line in log.splitlines():
            if "lose already computed task" in line:
                lost |= set(re.findall(r"featurize-(\d+)-", line))
        root = lambda watch: next((p["peak"] for p in watch["processes"] if p["name"] == "client"), None)  # noqa: E731
        return {"scheduler": root(scheduler), "worker": max((p["peak"] for p in workers), default=None),
                "worker processes": len(workers), "nanny": root(worker), "lost computed": len(lost)}


class Command:
    """A command run as a user would: its process tree's peak RSS sampled, its stderr lines timed."""

    def __init__(self, argv: list[str]):
        print(f"  $ {shown(argv)}", flush=True)
        self.started = time.perf_counter()
        self.process = subprocess.Popen(argv, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        preexec_fn=interruptible)
        self.watch = throughput.TreeWatch(self.process.pid, 0.25)
        self.stdout: list[str] = []
        self.lines: list[tuple[float, str]] = []  # (seconds since start, line) of stderr, progress bars apart
        self.bars: dict[str, str] = {}  # the last line of each progress bar
        self.readers = [threading.Thread(target=self.read, args=(stream, timed), daemon=True)
                        for stream, timed in ((self.process.stdout, False), (self.process.stderr, True))]
        for reader in self.readers:
            reader.start()

    def read(self, stream, timed: bool) -> None:
        for line in stream:  # text mode: a progress bar's \r ends a line too
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if not timed:
                self.stdout.append(line)
            elif PROGRESS.search(line):
                self.bars[line.split(":", 1)[0].strip()] = line.strip()
            else:
                self.lines.append((time.perf_counter() - self.started, line))

    def said(self, start: str) -> float | None:
        """Seconds from the start to the first stderr line starting with `start`."""
        return next((at for at, line in self.lines if line.startswith(start)), None)

    def finish(self, timeout: float = throughput.TIMEOUT_S) -> dict:
        try:
            rc = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            rc = self.process.wait()
        seconds = time.perf_counter() - self.started
        for reader in self.readers:
            reader.join(10)
        peak = self.watch.finish()["peak_total"]
        print(f"    exit code {rc} after {seconds:.1f} s; peak RSS {mib(peak)}", flush=True)
        if rc not in (0, 130):
            self.show()
        return {"rc": rc, "seconds": seconds, "peak": peak}

    def show(self, last: int = 20) -> None:
        kept = [line for _, line in self.lines if not line.startswith(throughput.NOISE)][-last:]
        print("    stderr (last lines):\n      " + "\n      ".join(kept + list(self.bars.values())), flush=True)


def interruptible() -> None:
    """In a command's process, before it starts: SIGINT as a terminal sends it. A benchmark started in the
    background by a non-interactive shell has SIGINT ignored, and its children would inherit that: the
    interrupt would then be ignored (2026-12-02, twice, until this)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(argv: list[str]) -> dict:
    command = Command(argv)
    return command.finish()


def listing_alone(url: str, storage: dict) -> dict:
    """source.list_images on its own, in its own process: seconds, and the peak RSS (and before listing)."""
    result = subprocess.run([sys.executable, "-c", LISTING, url, json.dumps(storage)], cwd=REPO, env=child_env(),
                            capture_output=True, text=True)
    data = throughput.last_json(result.stdout)
    if result.returncode or not data:
        print(f"  listing alone failed (exit code {result.returncode}): {result.stderr[-2000:]}", flush=True)
        return {"seconds": None, "peak": None, "images": None}
    print(f"  listing alone: {data['images']:,} images in {data['seconds']:.1f} s, peak RSS {mib(data['peak'])} "
          f"({mib(data['rss_before'])} before listing)", flush=True)
    return data


class Staged:
    """Watches OUTPUT/_staging/features while a run goes: files staged, files written again, and a schedule of actions."""

    def __init__(self, out: pathlib.Path):
        self.folder = out / "_staging" / "features"
        self.inodes: dict[str, int] = {}
        self.rewrites, self.rewritten = 0, set()

    def scan(self) -> int:
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return len(self.inodes)
        for entry in entries:
            if entry.name.startswith("part-") and entry.name.endswith(".parquet"):
                inode, before = entry.inode(), self.inodes.get(entry.name)
                if before is not None and before != inode:  # a file published again (written beside, renamed)
                    self.rewrites += 1
                    self.rewritten.add(entry.name)
                self.inodes[entry.name] = inode
        return len(self.inodes)

    def follow(self, command: Command, actions: list[tuple[int, str]], cluster: Cluster, events: list[dict]) -> None:
        """Scan every second until the command ends, doing each (staged files, action) when that many are staged.

        Each action waits for at least one partition staged since the one before (small runs stage several a second).
        """
        actions, last = sorted(actions), -1
        while command.process.poll() is None:
            staged = self.scan()
            while actions and staged >= max(actions[0][0], last + 1):
                at = time.perf_counter() - command.started
                if actions[0][1] == "kill worker":
                    pid = cluster.worker_pid()
                    if pid is None:
                        break  # the nanny is starting another: kill that one at the next scan
                    os.kill(pid, signal.SIGKILL)
                    print(f"    {at:.0f} s, {staged:,} partitions staged: SIGKILL the worker process (pid {pid})", flush=True)
                    events.append({"action": "kill worker", "at_s": at, "staged": staged, "pid": pid})
                else:
                    command.process.send_signal(signal.SIGINT)
                    print(f"    {at:.0f} s, {staged:,} partitions staged: SIGINT the client (pid {command.process.pid})", flush=True)
                    events.append({"action": "interrupt client", "at_s": at, "staged": staged})
                    timer = threading.Timer(SIGINT_EXIT_S, lambda: command.process.poll() is None and command.process.kill())
                    timer.daemon = True  # kills a client that does not exit (it is resumable all the same)
                    timer.start()
                actions.pop(0)
                last = staged
            time.sleep(1.0)
        self.scan()


# --- one run size: run, update, report, evaluate -------------------------------------------------------


def pipeline_run(label: str, tag: str, url: str, out: str, expected: list[str], args: argparse.Namespace, storage: dict,
                 kills: bool, images_per_partition: int) -> dict:
    """`pipeline run` on a fresh cluster (with the kill schedule if `kills`); its figures and checks."""
    n = len(expected)
    partitions = math.ceil(n / images_per_partition)
    endpoint = ["--endpoint-url", storage["endpoint_url"]] if storage.get("endpoint_url") else []
    print(f"\n{label}: run on {n:,} images ({partitions:,} partitions of {images_per_partition})", flush=True)
    result = {"images": n, "tasks": partitions, "listing": listing_alone(url, storage), "checks": [], "events": []}
    cluster = Cluster(args.workdir / f"dask-{tag}-run", args.threads)
    invocations = []
    try:
        argv = [sys.executable, "-m", "pipeline", "run", "--input", url, "--output", out, "--cluster", cluster.address,
                "--image-size", str(args.image_size), "--weights", "random", *endpoint]
        command = Command(argv)
        staged = Staged(pathlib.Path(out)) if not storage else None  # a local output's staged files, watched
        if staged:
            staged.follow(command, [(math.ceil(INTERRUPT * partitions), "interrupt client")] if kills else [], cluster,
                          result["events"])
        first = command.finish() | {"command": command}
        invocations.append(first)
        if kills and first["rc"] != 0:
            result["staged at exit"] = staged.scan()
            print(f"    {result['staged at exit']:,} partitions staged when the client had exited; resuming", flush=True)
            command = Command(argv + ["--resume"])
            staged.follow(command, [(math.ceil(f * partitions), "kill worker") for f in KILLS], cluster, result["events"])
            invocations.append(command.finish() | {"command": command})
    finally:
        result |= cluster.stop()
    result["invocations"] = invocations
    result["rc"] = invocations[-1]["rc"]
    result["seconds"] = sum(i["seconds"] for i in invocations)
    result["client"] = max(i["peak"] for i in invocations)
    if staged:
        result["rewritten"], result["rewrites"] = len(staged.rewritten), staged.rewrites
    fs, path = open_output(out, storage)
    result["manifest"] = manifest = read_manifest(fs, path)
    result["timings"] = combined_timings(invocations, manifest, result["events"])
    if manifest:
        print(f"  manifest counts: {json.dumps(manifest['counts'])}", flush=True)
        result["k"] = manifest["pca"]["n_components"]
        result["failed"] = manifest["counts"]["failed"]
        result["tasks"] = math.ceil(n / manifest["settings"]["images_per_partition"])
    result["checks"] += [(f"{label}: run exit code", " then ".join(str(i["rc"]) for i in invocations),
                          result["rc"] == 0 and manifest is not None)]
    if manifest:
        result["checks"] += exactly_once(f"{label}: run", fs, path, set(expected))
    if kills:
        result["checks"] += kill_checks(label, result, partitions)
    return result


def combined_timings(invocations: list[dict], manifest: dict | None, events: list[dict]) -> dict:
    """Each stage's seconds: the manifest's, plus what an interrupted first invocation spent (from its stderr's times).

    An interrupted run said "N images under …" after listing, then "dashboard: …" once its cluster
    was up, and featurized from then to the SIGINT; its resumed run lists nothing (the listing is
    the interrupted run's): the listing alone stands for it.
    """
    timings = dict((manifest or {}).get("timings_s", {}))
    if len(invocations) > 1 and manifest:
        command = invocations[0]["command"]
        listed, up = command.said(f"{manifest['counts']['listed']} images under"), command.said("dashboard: ")
        interrupted = next((e["at_s"] for e in events if e["action"] == "interrupt client"), None)
        if listed is not None and up is not None:
            timings["cluster start"] = timings.get("cluster start", 0.0) + up - listed
            end = interrupted if interrupted is not None else invocations[0]["seconds"]
            timings["featurize"] = timings.get("featurize", 0.0) + end - up
    return timings


def kill_checks(label: str, result: dict, partitions: int) -> list[tuple[str, str, bool]]:
    """The kills and the interrupt happened as scheduled, the resumed run resumed what was staged, and what was redone."""
    events, manifest = result["events"], result["manifest"] or {}
    counts = manifest.get("counts", {})
    kills = [e for e in events if e["action"] == "kill worker"]
    interrupted = [e for e in events if e["action"] == "interrupt client"]
    resumed, at_exit = counts.get("partitions_resumed"), result.get("staged at exit")
    gap = f", {kills[1]['at_s'] - kills[0]['at_s']:.0f} s apart" if len(kills) == 2 else ""
    checks = [
        (f"{label}: worker killed twice, a new one started each time",
         f"{len(kills)} kills{gap}; {result.get('worker processes')} worker processes in all",
         len(kills) == 2 and (result.get("worker processes") or 0) >= 3),
        (f"{label}: client interrupted, then resumed", f"exit code {result['invocations'][0]['rc']} after SIGINT at "
         f"{interrupted[0]['staged']:,} staged" if interrupted else "no interrupt", bool(interrupted) and len(result["invocations"]) == 2),
        (f"{label}: partitions resumed (manifest)", f"{resumed} (staged when the client exited: {at_exit}; of {partitions:,})",
         resumed is not None and at_exit is not None and at_exit <= resumed < partitions),
    ]
    redone = counts.get("partitions_redone")
    checks.append((f"{label}: partitions redone (manifest)",
                   "n/a (the manifest has no counts.partitions_redone)" if redone is None else str(redone),
                   None if redone is None else redone >= 1))
    return checks


def after(label: str, tag: str, out: str, folder: pathlib.Path, extra: dict, expected: list[str],
          args: argparse.Namespace) -> dict:
    """1% more images, `update`, then `report` and `evaluate`: their seconds and peaks, and the update checked."""
    added = relative_images(extra["folder"])
    link_in(extra["folder"], folder, added)
    result: dict = {"checks": []}
    try:
        print(f"\n{label}: update after adding {len(added):,} images ({EXTRA:.0%})", flush=True)
        cluster = Cluster(args.workdir / f"dask-{tag}-update", args.threads)
        try:
            update = run([sys.executable, "-m", "pipeline", "update", "--output", out, "--cluster", cluster.address])
        finally:
            stopped = cluster.stop()
        result["update"] = update | stopped
        fs, path = open_output(out, {})
        manifest = read_manifest(fs, path)
        result["update"]["manifest"] = manifest
        if manifest:
            print(f"  manifest counts: {json.dumps(manifest['counts'])}", flush=True)
        last = (manifest or {}).get("history", [{}])[-1]
        ok = result["update"]["rc"] == 0 and last.get("command") == "update" and last.get("added") == len(added)
        result["checks"].append((f"{label}: update exit code, images added", f"{result['update']['rc']}, "
                                 f"{last.get('added')} added of {len(added)}", ok))
        if manifest:
            result["checks"] += exactly_once(f"{label}: update", fs, path, set(expected) | set(added))
    finally:
        unlink(extra["folder"], folder, added)
    for name in ("report", "evaluate"):
        print(f"\n{label}: {name}", flush=True)
        result[name] = run([sys.executable, "-m", "pipeline", name, out])
        result["checks"].append((f"{label}: {name} exit code", str(result[name]["rc"]), result[name]["rc"] == 0))
    return result


# --- the output, read back -----------------------------------------------------------------------------


def open_output(url: str, storage: dict):
    from pipeline import source

    return source.open_url(url, storage)


def read_manifest(fs, path: str) -> dict | None:
    try:
        fs.invalidate_cache()
        with fs.open(f"{path}/manifest.json", "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def exactly_once(what: str, fs, path: str, expected: set[str]) -> list[tuple[str, str, bool]]:
    """Every image exactly once in images.parquet or errors.parquet (read part by part, the path column only)."""
    import pyarrow.parquet as pq

    seen: set[str] = set()
    duplicates = rows = errors = 0
    in_order, last = True, ""
    fs.invalidate_cache()
    for part in sorted(fs.find(f"{path}/images.parquet")):
        with fs.open(part, "rb") as f:
            paths = pq.ParquetFile(f).read(columns=["path"])["path"].to_pylist()
        rows += len(paths)
        in_order = in_order and paths == sorted(paths) and (not paths or paths[0] > last)
        last = paths[-1] if paths else last
        duplicates += sum(p in seen for p in paths)
        seen.update(paths)
    with fs.open(f"{path}/errors.parquet", "rb") as f:
        failed = pq.ParquetFile(f).read(columns=["path"])["path"].to_pylist()
    errors = len(failed)
    duplicates += sum(p in seen for p in failed)
    seen.update(failed)
    missing, unexpected = len(expected - seen), len(seen - expected)
    leftovers = fs.find(f"{path}/_staging")
    return [
        (f"{what}: one row or one error per image",
         f"{rows:,} rows + {errors:,} errors = {rows + errors:,} of {len(expected):,} images; {duplicates} duplicates, "
         f"{missing} missing, {unexpected} unexpected", not duplicates and not missing and not unexpected and rows + errors == len(expected)),
        (f"{what}: rows sorted by path across parts, _staging gone", f"{'sorted' if in_order else 'NOT sorted'}, "
         f"{len(leftovers)} staged files left", in_order and not leftovers),
    ]


# --- S3 --------------------------------------------------------------------------------------------------


def s3_run(made: dict, args: argparse.Namespace, images_per_partition: int) -> dict:
    """Upload the images to a moto S3 server on loopback and `pipeline run` from it to the same bucket."""
    import s3fs

    server, endpoint = throughput.start_s3()
    try:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        relative = sorted(relative_images(made["folder"]))
        prefix = f"images-{len(relative)}"
        print(f"\nS3: uploading {len(relative):,} objects to s3://{throughput.BUCKET}/{prefix} at {endpoint} ...", flush=True)
        upload_s = throughput.upload(fs, made["folder"], relative, prefix)
        print(f"  uploaded in {upload_s:.0f} s: {len(relative) / upload_s:,.0f} objects/s", flush=True)
        result = pipeline_run("S3", f"s3-{len(relative)}", f"s3://{throughput.BUCKET}/{prefix}", f"s3://{throughput.BUCKET}/out-{len(relative)}",
                              relative, args, {"endpoint_url": endpoint}, False, images_per_partition)
        result["upload"] = {"seconds": upload_s, "objects": len(relative)}
        return result
    finally:
        server.stop()


# --- the table -----------------------------------------------------------------------------------------


def print_table(columns: dict[str, dict], small: str | None, big: str | None) -> list[tuple[str, str, bool]]:
    """The table (columns: small, big, ratio, S3) and the goals as (name, value, met) rows."""
    names = list(columns)
    ratio = small in columns and big in columns
    header = [*(names[:2] if ratio else names), *(["ratio"] if ratio else []), *names[2 if ratio else len(names):]]
    print(f"\n{'':46}" + "".join(f"{h:>16}" for h in header))

    def line(label: str, get, fmt, with_ratio: bool = True) -> tuple[float, float] | None:
        values = {name: safe(get, columns[name]) for name in names}
        cells = {name: (fmt(v) if v is not None else "n/a") for name, v in values.items()}
        pair = (values[small], values[big]) if ratio else None
        if ratio:
            cells["ratio"] = f"{pair[1] / pair[0]:.2f}" if with_ratio and pair[0] and pair[1] is not None else ""
        print(f"{label:46}" + "".join(f"{cells[h]:>16}" for h in header))
        return pair if ratio and with_ratio and pair[0] and pair[1] is not None else None

    count = lambda v: f"{v:,.0f}"  # noqa: E731
    secs = lambda v: f"{v:,.1f}" if v >= 10 else f"{v:.2f}"  # noqa: E731
    rate = lambda v: f"{v:,.0f}"  # noqa: E731
    pairs: dict[str, tuple[float, float]] = {}
    pairs["images"] = line("images", lambda c: c["images"], count)
    line("images made / s (make_images)", lambda c: c["made"]["count"] / c["made"]["seconds"], rate, False)
    line("S3 upload, objects / s", lambda c: c["upload"]["objects"] / c["upload"]["seconds"], rate, False)
    pairs["listing"] = line("listing alone s (own process)", lambda c: c["listing"]["seconds"], secs)
    pairs["listing peak"] = line("listing alone, peak RSS", lambda c: c["listing"]["peak"], mib)
    line("featurize tasks", lambda c: c["tasks"], count)
    for stage in STAGES:
        pairs[stage] = line(f"{stage} s" + (" (manifest)" if stage == "list" else ""), lambda c: c["timings"][stage], secs)
    pairs["whole"] = line("whole command s (all invocations)", lambda c: c["seconds"], secs)
    line("images/s featurize", lambda c: c["images"] / c["timings"]["featurize"], rate)
    line("images/s list to output (no cluster start)", list_to_output, rate)
    line("failed images; PCA components kept", lambda c: f"{c['failed']}; {c['k']}", str, False)
    pairs["client"] = line("client peak RSS", lambda c: c["client"], mib)
    pairs["scheduler"] = line("scheduler peak RSS", lambda c: c["scheduler"], mib)
    line("worker peak RSS (largest worker process)", lambda c: c["worker"], mib)
    line("nanny peak RSS", lambda c: c["nanny"], mib)
    line("worker processes (restarts after kills)", lambda c: c["worker processes"], count, False)
    line("staged files written again (benchmark)", lambda c: c["rewritten"], count, False)
    line("lost results recomputed (scheduler log)", lambda c: c["lost computed"], count, False)
    line("partitions resumed (manifest)", lambda c: c["manifest"]["counts"]["partitions_resumed"], count, False)
    line("partitions redone (manifest)", lambda c: c["manifest"]["counts"]["partitions_redone"], count, False)
    update_stages = []
    for c in columns.values():
        for stage in (c.get("after", {}).get("update", {}).get("manifest") or {}).get("timings_s", {}):
            if stage not in update_stages:
                update_stages.append(stage)
    if any("after" in c for c in columns.values()):
        line("update: images added and featurized", lambda c: c["after"]["update"]["manifest"]["history"][-1]["featurized"], count)
        pairs["update"] = line("update: whole command s", lambda c: c["after"]["update"]["seconds"], secs)
        for stage in update_stages:
            line(f"update: {stage} s", lambda c: c["after"]["update"]["manifest"]["timings_s"][stage], secs)
        pairs["update client"] = line("update: client peak RSS", lambda c: c["after"]["update"]["peak"], mib)
        pairs["update scheduler"] = line("update: scheduler peak RSS", lambda c: c["after"]["update"]["scheduler"], mib)
        line("update: worker peak RSS", lambda c: c["after"]["update"]["worker"], mib)
        for name in ("report", "evaluate"):
            pairs[name] = line(f"{name}: whole command s", lambda c: c["after"][name]["seconds"], secs)
            pairs[f"{name} peak"] = line(f"{name}: peak RSS", lambda c: c["after"][name]["peak"], mib)

    goals = []
    if big in columns:
        for what, key in (("client", "client"), ("scheduler", "scheduler")):
            value = safe(lambda c: c[key], columns[big])
            goals.append((f"{what} peak RSS at {big} ≤ 1 GiB", f"{mib(value)}", value is not None and value <= GOALS["peak"]))
    if ratio and pairs["images"]:
        n = pairs["images"][1] / pairs["images"][0]
        for key in ("client", "scheduler", "update client", "update scheduler"):
            if pairs.get(key):
                r = pairs[key][1] / pairs[key][0]
                goals.append((f"{key} peak RSS, {big} / {small} ≤ {GOALS['peak ratio']}", f"{r:.2f}", r <= GOALS["peak ratio"]))
        limit = n * GOALS["time slack"]
        for key in ("listing", *STAGES[1:], "update", "report", "evaluate"):
            if pairs.get(key):
                r = pairs[key][1] / pairs[key][0]
                goals.append((f"{key} s, {big} / {small} ≤ images ratio × {GOALS['time slack']}", f"{r:.2f} (≤ {limit:.2f})", r <= limit))
    return goals


def safe(get, column: dict):
    try:
        return get(column)
    except (KeyError, TypeError, ZeroDivisionError, IndexError):
        return None


def list_to_output(c: dict) -> float:
    """Images per second of listing, featurizing, fitting and writing (the listing alone where the manifest has none)."""
    timings = c["timings"]
    listing = timings["list"] if "list" in timings else c["listing"]["seconds"]
    return c["images"] / (listing + sum(timings[stage] for stage in STAGES[2:]))


# --- the whole benchmark -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    source = args.source.resolve()
    import dask.config

    from pipeline import config  # noqa: F401  (loads pipeline.yaml's defaults)

    images_per_partition = int(dask.config.get("pipeline.images-per-partition"))
    print(f"machine: {throughput.machine()}; {throughput.load()} at the start", flush=True)
    print(f"workdir {args.workdir}; images from {source}; --image-size {args.image_size}; one worker process × {args.threads} "
          f"threads; {'no kills' if args.no_kills or args.skip_big else 'kills and an interrupt in the big run'}", flush=True)
    started = time.perf_counter()
    sizes = {}
    if not args.skip_small and args.small:
        sizes[f"{args.small:,} local"] = (args.small, False)
    if not args.skip_big and args.count:
        sizes[f"{args.count:,} local"] = (args.count, not args.no_kills)
    made = {name: image_set(args.workdir, f"images-{n}", source, n) for name, (n, _) in sizes.items()}
    extras = {name: image_set(args.workdir, f"extra-{n}", source, max(1, round(n * EXTRA)), start=n)
              for name, (n, _) in sizes.items() if not args.skip_after}
    s3_made = None
    if args.s3:
        s3_made = next((m for (n, _), m in zip(sizes.values(), made.values()) if n == args.s3), None) \
            or image_set(args.workdir, f"images-{args.s3}", source, args.s3)

    columns: dict[str, dict] = {}
    checks: list[tuple[str, str, bool | None]] = []
    for name, (n, kills) in sizes.items():
        folder = made[name]["folder"]
        if name in extras:  # links an interrupted invocation may have left
            unlink(extras[name]["folder"], folder, relative_images(extras[name]["folder"]))
        expected = relative_images(folder)
        if len(expected) != n:
            sys.exit(f"error: {folder} holds {len(expected):,} images, not {n:,}: remove it and {folder}.json to make it again")
        out = args.workdir / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        columns[name] = pipeline_run(name, str(n), str(folder), str(out), expected, args, {}, kills, images_per_partition)
        columns[name]["made"] = made[name]
        checks += columns[name]["checks"]
        if name in extras and columns[name]["manifest"]:
            columns[name]["after"] = after(name, str(n), str(out), folder, extras[name], expected, args)
            checks += columns[name]["after"]["checks"]
    if s3_made:
        name = f"{args.s3:,} S3"
        columns[name] = s3_run(s3_made, args, images_per_partition)
        columns[name]["made"] = s3_made
        checks += columns[name]["checks"]

    small = f"{args.small:,} local" if f"{args.small:,} local" in columns else None
    big = f"{args.count:,} local" if f"{args.count:,} local" in columns else None
    goals = print_table(columns, small, big)
    resumed = big and len(columns[big]["invocations"]) > 1
    print("(stage seconds are the manifests' timings_s" + (
        f"; the {big} run's add up its interrupted invocation's, timed from its stderr, and its resumed one's, whose "
        "manifest has no `list`: the listing alone stands for it in images/s" if resumed else "") +
        ". Peaks: RSS sampled every 0.25 s; client = the `python -m pipeline` process tree; a fresh scheduler and worker "
        "for each run (and its resume) and each update; report and evaluate use no cluster. Time goals allow 10% over "
        "the images ratio.)")
    print(f"({throughput.load()} at the end; the benchmark took {(time.perf_counter() - started) / 60:.1f} minutes)")
    print()
    width = max((len(name) for name, _, _ in checks + goals), default=10)
    for name, value, ok in goals:
        print(f"{'GOAL' if ok else 'MISS'}  {name:{width}}  {value}")
    for name, value, ok in checks:
        print(f"{'n/a ' if ok is None else 'OK  ' if ok else 'FAIL'}  {name:{width}}  {value}")
    print(f"\noutputs under {args.workdir} (out-N), cluster logs in {args.workdir}/dask-*")
    return 0 if all(ok is not False for _, _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
