"""The service under load: real HTTP clients over loopback against `python -m pipeline serve` in its own process.

1. The bare model, in a process of its own before the server starts and after it stops: the output's featurizer
   (Recognizer.features) on decoded photos, one image per call (median ms) and batches of 32 (images/s).
2. The server, with its defaults (serve.max-batch 32): N clients (1, 8, 32), each sending one photo
   after the other (raw JPEG bodies, keep-alive) for --seconds: latency p50/p95/p99, images/s.
3. A soak: --soak requests from 8 clients, one in ten a bad upload (truncated, not an image, a
   body over the upload limit, a decompression bomb): counts by status, that no request got a 5xx
   and every good one an answer, and the server's memory (RSS) at the end against where it
   settled (after the first tenth).

    .venv/bin/python benchmarks/serve.py --output OUTPUT        # an output of the apples, MobileNetV2 at 224 px
    .venv/bin/python benchmarks/serve.py                        # makes one first (random weights, some 2 minutes)

Prints a Markdown table. Run it on a quiet machine: the clients share the cores with the server.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import pathlib
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "fruits-360-apples"
BARE = """
import json, statistics, sys, time
import numpy as np
from pipeline import images
from pipeline.reading import recognize
recognizer = recognize.Recognizer.load(sys.argv[1])
arrays = [images.decode(open(path, "rb").read(), 224, 10**8) for path in sys.argv[2:]]
recognizer.features(arrays[:1]); recognizer.features(arrays[:32])  # built and warm
one = []
for array in arrays[:40]:
    started = time.perf_counter(); recognizer.features([array]); one.append(time.perf_counter() - started)
started, rounds = time.perf_counter(), 10
for i in range(rounds):
    recognizer.features(arrays[(i * 32) % (len(arrays) - 32):][:32])
print(json.dumps({"one_ms": statistics.median(one) * 1000, "batch32_per_s": rounds * 32 / (time.perf_counter() - started)}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="a finished output of the apples (default: made from --source into a temporary folder)")
    parser.add_argument("--source", type=pathlib.Path, default=DEFAULT_SOURCE, help=f"folder of photos (default {DEFAULT_SOURCE})")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients of each level (default 1,8,32)")
    parser.add_argument("--seconds", type=float, default=15, help="length of each level (default 15)")
    parser.add_argument("--soak", type=int, default=2000, help="requests of the soak, one in ten bad (default 2000; 0: none)")
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
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def bad_uploads(good: bytes, limit: int) -> dict[str, bytes]:
    from PIL import Image

    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, "PNG")
    return {"truncated": good[: len(good) // 3], "not an image": b"%PDF-1.4 not a photo" * 50,
            "50 MB body": os.urandom(1024) * max(50 * 1024, limit // 1024 + 1), "decompression bomb": bomb.getvalue()}


async def load(url: str, bodies: list[bytes], clients: int, seconds: float | None = None, total: int | None = None,
               expected: list[int] | None = None) -> dict:
    """`clients` loops of requests, for `seconds` or until `total` are sent: latencies of the 200s and every status."""
    import httpx

    latencies, statuses, failures, sent = [], {}, [], 0
    stop = time.perf_counter() + seconds if seconds else None

    async def client(index: int):
        nonlocal sent
        async with httpx.AsyncClient(base_url=url, timeout=120) as session:
            while (stop is None or time.perf_counter() < stop) and (total is None or sent < total):
                number, sent = sent, sent + 1
                body = bodies[number % len(bodies)]
                started = time.perf_counter()
                try:
                    response = await session.post("/recognize", content=body, headers={"content-type": "image/jpeg"})
                    status = response.status_code
                except httpx.HTTPError as error:  # the server may close a connection whose body it refused
                    status = type(error).__name__
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                if expected is not None and expected[number % len(bodies)] != status:
                    failures.append((number % len(bodies), status))

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return {"latencies": latencies, "statuses": statuses, "failures": failures, "elapsed": time.perf_counter() - started}


def bare_model(output: str, photos: list[pathlib.Path]) -> dict:
    """The output's featurizer alone, in a process of its own: median ms of one image, images/s in batches of 32."""
    result = subprocess.run([sys.executable, "-c", BARE, output, *map(str, photos[:100])], capture_output=True, text=True,
                            check=True, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
    bare = json.loads(result.stdout)
    print(f"bare model: {bare['one_ms']:.1f} ms one image, {bare['batch32_per_s']:.1f} images/s in batches of 32", file=sys.stderr)
    return bare


def rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


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

    before = bare_model(output, photos)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", output, "--port", str(port)], stdout=log,
                              stderr=subprocess.STDOUT, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
    try:
        import httpx

        for _ in range(240):
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        limit = httpx.get(f"{url}/info").json()["max_upload_bytes"]
        good = [p.read_bytes() for p in photos]
        asyncio.run(load(url, good, 8, total=64))  # warm: every batch size the levels will see
        rows = []
        for clients in map(int, args.clients.split(",")):
            result = asyncio.run(load(url, good, clients, seconds=args.seconds))
            lat = result["latencies"]
            rows.append((clients, len(lat), percentile(lat, 50) * 1000, percentile(lat, 95) * 1000, percentile(lat, 99) * 1000,
                         len(lat) / result["elapsed"], sorted(map(str, result["statuses"]))))
            print(f"{clients} clients: {rows[-1]}", file=sys.stderr)
        batches = httpx.get(f"{url}/metrics").text

        soak = None
        if args.soak:
            bad = bad_uploads(good[0], limit)
            bodies, expected, kinds = [], [], list(bad)
            for i in range(100):  # one in ten bad, the four kinds in turn
                if i % 10 == 9:
                    kind = kinds[(i // 10) % len(kinds)]
                    bodies.append(bad[kind]); expected.append({"truncated": 400, "not an image": 415}.get(kind, 413))
                else:
                    bodies.append(good[i]); expected.append(200)
            settle = asyncio.run(load(url, bodies, 8, total=args.soak // 10, expected=expected))
            settled = rss(server.pid)
            peak, done = settled, []

            async def soak_with_memory():
                task = asyncio.create_task(load(url, bodies, 8, total=args.soak - args.soak // 10, expected=expected))
                nonlocal peak
                while not task.done():
                    peak = max(peak, rss(server.pid))
                    await asyncio.sleep(0.2)
                done.append(task.result())

            asyncio.run(soak_with_memory())
            rest = done[0]
            statuses = {}
            for part in (settle, rest):
                for status, count in part["statuses"].items():
                    statuses[status] = statuses.get(status, 0) + count
            soak = {"requests": args.soak, "statuses": statuses, "failures": settle["failures"] + rest["failures"],
                    "settled_mib": settled / 2**20, "peak_mib": peak / 2**20, "end_mib": rss(server.pid) / 2**20,
                    "seconds": settle["elapsed"] + rest["elapsed"]}
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    after = bare_model(output, photos)  # again: on a shared machine the floor moves; the ratios use the mean of both
    bare = {key: (before[key] + after[key]) / 2 for key in before}

    print(f"\nbare model (same run, own process, before and after the server): one image {before['one_ms']:.1f} and "
          f"{after['one_ms']:.1f} ms; batches of 32: {before['batch32_per_s']:.1f} and {after['batch32_per_s']:.1f} images/s; "
          "ratios below against their means\n")
    print("| clients | answered | p50 ms | p95 ms | p99 ms | images/s | p50 / bare one image | images/s / bare batch-32 rate |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for clients, n, p50, p95, p99, rate, _ in rows:
        print(f"| {clients} | {n} | {p50:.1f} | {p95:.1f} | {p99:.1f} | {rate:.1f} | {p50 / bare['one_ms']:.2f} | {rate / bare['batch32_per_s']:.2f} |")
    import re

    calls = re.search(r"^pipeline_serve_batch_size_count (\S+)", batches, re.M)
    images = re.search(r"^pipeline_serve_batch_size_sum (\S+)", batches, re.M)
    if calls and images:
        print(f"\nmodel calls during warm-up and levels: {float(calls[1]):.0f} for {float(images[1]):.0f} photos "
              f"({float(images[1]) / float(calls[1]):.1f} a call on average)")
    if soak:
        fives = sum(count for status, count in soak["statuses"].items() if isinstance(status, int) and status >= 500)
        print(f"\nsoak: {soak['requests']} requests from 8 clients in {soak['seconds']:.0f} s, one in ten bad; statuses "
              f"{dict(sorted(soak['statuses'].items(), key=str))}; 5xx: {fives}; requests not answered as expected: "
              f"{len(soak['failures'])}{' ' + str(soak['failures'][:5]) if soak['failures'] else ''}")
        print(f"server memory: settled {soak['settled_mib']:.0f} MiB, peak {soak['peak_mib']:.0f} MiB "
              f"({soak['peak_mib'] / soak['settled_mib']:.2f}x), at the end {soak['end_mib']:.0f} MiB "
              f"({soak['end_mib'] / soak['settled_mib']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
