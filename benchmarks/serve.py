"""The service under load: real HTTP clients over loopback against `python -m pipeline serve` in its own process.

1. The bare model, in a process of its own that lives through the whole run: the output's featurizer
   (Recognizer.features) on decoded photos, one image per call (median ms) and batches of 32
   (images/s). It is measured right before and right after each level of clients, and each level
   is compared with the mean of the two: on a shared machine the floor moves from minute to minute.
2. The server, with its defaults (serve.max-batch auto: 8 on a CPU): N clients (1, 8, 32), each sending one photo
   after the other (raw JPEG bodies, keep-alive; aiohttp, whose client costs the shared cores
   about a tenth of httpx's) for --seconds: latency p50/p95/p99, images/s, photos per model call.
3. A soak: --soak requests from --soak-clients clients, one in ten a bad upload (truncated, not an
   image, a 50 MB body, a decompression bomb): counts by status, that no request got a 5xx and
   every good one an answer, and the server's memory (RSS) at the end against where it settled
   (after the first tenth). Large bodies are sent with `Expect: 100-continue`, as curl sends them:
   the server refuses them from their Content-Length before a byte of them travels.

    .venv/bin/python benchmarks/serve.py --output OUTPUT        # an output of the apples, MobileNetV2 at 224 px
    .venv/bin/python benchmarks/serve.py                        # makes one first (random weights, some 2 minutes)

Prints a Markdown table, with the load average (the machine's other work) beside each level.
Run it on a quiet machine: the clients share the cores with the server.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import pathlib
import random
import re
import socket
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "fruits-360-apples"
BARE = """
import json, statistics, sys, time
from pipeline import images
from pipeline.reading import recognize
recognizer = recognize.Recognizer.load(sys.argv[1])
arrays = [images.decode(open(path, "rb").read(), 224, 10**8) for path in sys.argv[2:]]
recognizer.features(arrays[:1]); recognizer.features(arrays[:32])  # built and warm
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:  # one measure per line asked: seconds to spend on batches of 32
    one = []
    for array in arrays[:40]:
        started = time.perf_counter(); recognizer.features([array]); one.append(time.perf_counter() - started)
    started, images = time.perf_counter(), 0
    while images < 96 or time.perf_counter() - started < float(line):
        recognizer.features(arrays[images % (len(arrays) - 32):][:32]); images += 32
    print(json.dumps({"one_ms": statistics.median(one) * 1000, "batch32_per_s": images / (time.perf_counter() - started)}), flush=True)
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="a finished output of the apples (default: made from --source into a temporary folder)")
    parser.add_argument("--source", type=pathlib.Path, default=DEFAULT_SOURCE, help=f"folder of photos (default {DEFAULT_SOURCE})")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients of each level (default 1,8,32)")
    parser.add_argument("--seconds", type=float, default=15, help="length of each level (default 15)")
    parser.add_argument("--bare-seconds", type=float, default=3, help="length of each measure of the bare model's batches (default 3)")
    parser.add_argument("--soak", type=int, default=2000, help="requests of the soak, one in ten bad (default 2000; 0: none)")
    parser.add_argument("--soak-clients", type=int, default=32, help="concurrent clients of the soak (default 32)")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pipeline(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"error: `pipeline {' '.join(args)}` failed:\n{result.stderr[-3000:]}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def load_average() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def bad_uploads(good: bytes, limit: int) -> dict[str, bytes]:
    from PIL import Image

    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, "PNG")
    return {"truncated": good[: len(good) // 3], "not an image": b"%PDF-1.4 not a photo" * 50,
            "50 MB body": os.urandom(1024) * max(50 * 1024, limit // 1024 + 1), "decompression bomb": bomb.getvalue()}


async def load(url: str, bodies: list[bytes], clients: int, seconds: float | None = None, total: int | None = None,
               expected: list[int] | None = None) -> dict:
    """`clients` loops of requests, for `seconds` or until `total` are sent: latencies of the 200s and every status."""
    import aiohttp

    latencies, statuses, failures, sent = [], {}, [], 0
    stop = time.perf_counter() + seconds if seconds else None
    large = 1 << 20  # bodies above 1 MB ask first (Expect: 100-continue)

    async def client(session):
        nonlocal sent
        while (stop is None or time.perf_counter() < stop) and (total is None or sent < total):
            number, sent = sent, sent + 1
            body = bodies[number % len(bodies)]
            started = time.perf_counter()
            try:
                async with session.post("/recognize", data=body, headers={"content-type": "image/jpeg"},
                                        expect100=len(body) > large) as response:
                    await response.read()
                    status = response.status
            except aiohttp.ClientError as error:  # the server may close a connection whose body it refused
                status = type(error).__name__
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append(time.perf_counter() - started)
            if expected is not None and expected[number % len(bodies)] != status:
                failures.append((number % len(bodies), status))

    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return {"latencies": latencies, "statuses": statuses, "failures": failures, "elapsed": time.perf_counter() - started}


class Bare:
    """The output's featurizer alone, in a process of its own kept for the run: measured when asked."""

    def __init__(self, output: str, photos: list[pathlib.Path]):
        self.process = subprocess.Popen([sys.executable, "-c", BARE, output, *map(str, photos[:100])], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
        self.reply()

    def reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            sys.exit(f"error: the bare model's process ended (exit {self.process.wait()})")
        return json.loads(line)

    def measure(self, seconds: float) -> dict:
        """Median ms of one image, and images/s in batches of 32 for about `seconds`."""
        self.process.stdin.write(f"{seconds}\n")
        self.process.stdin.flush()
        bare = self.reply()
        print(f"bare model: {bare['one_ms']:.1f} ms one image, {bare['batch32_per_s']:.1f} images/s in batches of 32 "
              f"(load {load_average()})", file=sys.stderr)
        return bare

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


def rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def model_calls(url: str) -> tuple[float, float]:
    """The server's model calls so far, and the photos they took (its /metrics)."""
    import httpx

    text = httpx.get(f"{url}/metrics").text
    found = [re.search(rf"^pipeline_serve_batch_size_{name} (\S+)", text, re.M) for name in ("count", "sum")]
    return tuple(float(match[1]) if match else 0.0 for match in found)


def soak_bodies(good: list[bytes], limit: int) -> tuple[list[bytes], list[int]]:
    """A hundred bodies, one in ten bad (the four kinds in turn), and the status each must get."""
    bad = bad_uploads(good[0], limit)
    bodies, expected, kinds = [], [], list(bad)
    for i in range(100):
        if i % 10 == 9:
            kind = kinds[(i // 10) % len(kinds)]
            bodies.append(bad[kind])
            expected.append({"truncated": 400, "not an image": 415}.get(kind, 413))
        else:
            bodies.append(good[i])
            expected.append(200)
    return bodies, expected


def soak(url: str, pid: int, good: list[bytes], limit: int, requests: int, clients: int) -> dict:
    """`requests` with one in ten bad, from `clients`; the server's memory where it settled (after a tenth) and after."""
    bodies, expected = soak_bodies(good, limit)
    settle = asyncio.run(load(url, bodies, clients, total=requests // 10, expected=expected))
    settled = rss(pid)
    peak, done = settled, []

    async def with_memory():
        nonlocal peak
        task = asyncio.create_task(load(url, bodies, clients, total=requests - requests // 10, expected=expected))
        while not task.done():
            peak = max(peak, rss(pid))
            await asyncio.sleep(0.2)
        done.append(task.result())

    asyncio.run(with_memory())
    statuses = {}
    for part in (settle, done[0]):
        for status, count in part["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    return {"requests": requests, "clients": clients, "statuses": statuses, "failures": settle["failures"] + done[0]["failures"],
            "settled_mib": settled / 2**20, "peak_mib": peak / 2**20, "end_mib": rss(pid) / 2**20,
            "seconds": settle["elapsed"] + done[0]["elapsed"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    photos = sorted(p for p in args.source.rglob("*.jpg"))
    random.Random(0).shuffle(photos)
    photos = photos[:256]
    if len(photos) < 100:
        sys.exit(f"error: {args.source} holds {len(photos)} .jpg photos; give --source a folder of at least 100")
    work = pathlib.Path(tempfile.mkdtemp(prefix="serve-bench-"))
    output = args.output
    if output is None:
        output = str(work / "out")
        print(f"making an output of {args.source} (random weights) in {output}", file=sys.stderr)
        pipeline("run", "--input", str(args.source), "--output", output, "--weights", "random", "--quiet")

    import httpx

    bare = Bare(output, photos)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", output, "--port", str(port)], stdout=log,
                              stderr=subprocess.STDOUT, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
    rows, result = [], None
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        info = httpx.get(f"{url}/info").json()
        limit, batch = info["max_upload_bytes"], info["max_batch"]
        good = [p.read_bytes() for p in photos]
        asyncio.run(load(url, good, 8, total=64))  # warm
        for clients in map(int, args.clients.split(",")):
            before = bare.measure(args.bare_seconds)
            calls = model_calls(url)
            loaded = load_average()
            level = asyncio.run(load(url, good, clients, seconds=args.seconds))
            calls = [after - before_ for after, before_ in zip(model_calls(url), calls)]
            after = bare.measure(args.bare_seconds)
            lat = level["latencies"]
            rows.append({"clients": clients, "answered": len(lat), "p50": percentile(lat, 50) * 1000, "p95": percentile(lat, 95) * 1000,
                         "p99": percentile(lat, 99) * 1000, "rate": len(lat) / level["elapsed"], "per_call": calls[1] / max(calls[0], 1),
                         "one_ms": (before["one_ms"] + after["one_ms"]) / 2,
                         "batch32": (before["batch32_per_s"] + after["batch32_per_s"]) / 2,
                         "load": f"{loaded} → {load_average()}", "statuses": sorted(map(str, level["statuses"]))})
            print(f"{clients} clients: {rows[-1]}", file=sys.stderr)
        if args.soak:
            result = soak(url, server.pid, good, limit, args.soak, args.soak_clients)
    finally:
        server.terminate()
        server.wait(30)
        log.close()
        bare.close()

    print(f"\nserver: at most {batch} photos a model call (serve.max-batch); bare model: its own process, measured right before "
          "and right after each level; ratios against their mean\n")
    print("| clients | answered | p50 ms | p95 ms | p99 ms | images/s | photos a model call | bare one image ms | bare batch-32 images/s "
          "| p50 / bare one image | images/s / bare batch-32 rate | load average (1/5/15 min) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['answered']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | {r['rate']:.1f} | "
              f"{r['per_call']:.1f} | {r['one_ms']:.1f} | {r['batch32']:.1f} | {r['p50'] / r['one_ms']:.2f} | "
              f"{r['rate'] / r['batch32']:.2f} | {r['load']} |")
    if result:
        fives = sum(count for status, count in result["statuses"].items() if isinstance(status, int) and status >= 500)
        print(f"\nsoak: {result['requests']} requests from {result['clients']} clients in {result['seconds']:.0f} s, one in ten bad; "
              f"statuses {dict(sorted(result['statuses'].items(), key=str))}; 5xx: {fives}; requests not answered as expected: "
              f"{len(result['failures'])}{' ' + str(result['failures'][:5]) if result['failures'] else ''} (load {load_average()})")
        print(f"server memory: settled {result['settled_mib']:.0f} MiB, peak {result['peak_mib']:.0f} MiB "
              f"({result['peak_mib'] / result['settled_mib']:.2f}x), at the end {result['end_mib']:.0f} MiB "
              f"({result['end_mib'] / result['settled_mib']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
