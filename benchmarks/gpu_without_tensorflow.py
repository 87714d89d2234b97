"""The bare model on a GPU machine where TensorFlow cannot be installed, and that machine's decode rate.

benchmarks/gpu_check.sh measures the pipeline itself, which needs TensorFlow with CUDA. Where
only another framework is there (the machine this project is lent has PyTorch and JAX for
CUDA 13, while TensorFlow 2.21 needs CUDA 12 and no package index is reachable), this measures
the two rates that bound a GPU worker:

1. the same Keras MobileNetV2 (no top, average pooling, 224 × 224, random weights) on Keras'
   torch and jax backends, float32 and mixed float16, at batch 32 (the pipeline's default) and
   256, on images already decoded in memory: the GPU's rate;
2. pipeline/images.py's decoding of the shipped sample's JPEGs, on every core: the CPU's rate.

    KERAS_BACKEND is set per measurement; run from the repository root:
    python benchmarks/gpu_without_tensorflow.py [--seconds 10]

These are not the pipeline's figures: they say how many cores of decoding one GPU can use.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = REPO / "pipeline" / "sample" / "fruits-360" / "Training"


def model_rate(backend: str, precision: str, batch: int, seconds: float) -> dict:
    """Images/s of MobileNetV2 on `backend` (in this process: KERAS_BACKEND must already be set)."""
    import keras
    import numpy as np

    keras.config.set_dtype_policy(precision)
    model = keras.applications.MobileNetV2(include_top=False, weights=None, pooling="avg", input_shape=(224, 224, 3))
    images = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3)).astype("float32") / 127.5 - 1
    started = time.perf_counter()
    model.predict_on_batch(images)  # builds and, on jax, compiles
    first = time.perf_counter() - started
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        features = model.predict_on_batch(images)  # returns NumPy: the GPU has finished
        done += batch
    elapsed = time.perf_counter() - started
    return {"backend": backend, "precision": precision, "batch": batch, "images_per_s": done / elapsed,
            "first_call_s": first, "features": list(np.shape(features)), "device": device(backend)}


def device(backend: str) -> str:
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    if backend == "jax":
        import jax

        return str(jax.devices()[0])
    return "?"


def decode_all(paths: list[str]) -> int:
    """Decode each file with the pipeline's own decode(), as a featurize task does."""
    spec = importlib.util.spec_from_file_location("images", REPO / "pipeline" / "images.py")
    images = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(images)
    for path in paths:
        images.decode(pathlib.Path(path).read_bytes(), 224, 89_478_485)
    return len(paths)


def decode_rate(processes: int, copies: int = 40) -> dict:
    """Images/s of decoding the sample's JPEGs `copies` times over, on `processes` processes."""
    paths = [str(p) for p in sorted(SAMPLE.rglob("*.jpg"))] * copies
    chunks = [paths[i::processes * 4] for i in range(processes * 4)]
    started = time.perf_counter()
    with multiprocessing.Pool(processes) as pool:
        done = sum(pool.map(decode_all, chunks))
    elapsed = time.perf_counter() - started
    return {"processes": processes, "images": done, "images_per_s": done / elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="seconds timed per measurement (default 10)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # backend,precision,batch: one measurement, in a child
    args = parser.parse_args()
    if args.one:
        backend, precision, batch = args.one.split(",")
        print(json.dumps(model_rate(backend, precision, int(batch), args.seconds)))
        return 0

    cores = len(os.sched_getaffinity(0))
    print(f"machine: {cores} cores", flush=True)
    rows = []
    for backend in ("torch", "jax"):
        for precision in ("float32", "mixed_float16"):
            for batch in (32, 256):
                child = subprocess.run(
                    [sys.executable, __file__, "--one", f"{backend},{precision},{batch}", "--seconds", str(args.seconds)],
                    capture_output=True, text=True, timeout=300, env=os.environ | {"KERAS_BACKEND": backend},
                )
                if child.returncode != 0:
                    print(f"{backend} {precision} batch {batch}: FAILED\n{child.stderr[-1500:]}", flush=True)
                    break
                rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    decoding = [decode_rate(1), decode_rate(cores)]
    for d in decoding:
        print(json.dumps(d), flush=True)

    print("\n| backend | precision | batch | device | images/s | first call s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['precision']} | {r['batch']} | {r['device']} | {r['images_per_s']:.0f} | {r['first_call_s']:.1f} |")
    print("\n| decoding (pipeline/images.py, 100 × 100 JPEGs → 224) | processes | images/s |")
    print("|---|---|---|")
    for d in decoding:
        print(f"| | {d['processes']} | {d['images_per_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
