"""The floor: the pipeline's model on images already decoded in memory, nothing else.

Decodes the images exactly as the workers do (pipeline.images.decode), builds the pipeline's
Featurizer (same CNN, backend, input size, batch, weights and threads), runs one warm-up batch,
then times featurizing every image. Prints a JSON line on stdout.

    .venv/bin/python benchmarks/bare_model.py IMAGES_FOLDER [--limit N] [--backend jax] [--batch-size 256]
"""
from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def image_paths(folder: pathlib.Path, limit: int | None) -> list[pathlib.Path]:
    """The .jpg files under `folder`, sorted by path, the first `limit`."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg"))
    return paths[:limit]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", type=pathlib.Path, help="folder of images (read recursively, *.jpg)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (sorted by path)")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", default="auto", help="images per model call, or auto (the pipeline's rule)")
    parser.add_argument("--backend", default="tensorflow", choices=["auto", "onnxruntime", "tensorflow", "jax", "torch"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from pipeline import images, settings
    from pipeline.making import featurize

    timings = {}
    started = time.perf_counter()
    max_pixels = settings().max_image_pixels
    with ThreadPoolExecutor() as pool:  # on every core, as a worker decodes
        arrays = list(pool.map(lambda path: images.decode(path.read_bytes(), args.image_size, max_pixels),
                               image_paths(args.images, args.limit)))
    timings["read + decode"] = time.perf_counter() - started
    if not arrays:
        sys.exit(f"error: no .jpg images under {args.images}")

    started, cpu = time.perf_counter(), time.process_time()
    model = featurize.Featurizer(featurize.ModelKey(args.model, args.image_size, "random", args.seed, args.backend), {})
    batch = featurize.batch_size_for("auto" if args.batch_size == "auto" else int(args.batch_size), model.on_gpu)
    model(arrays[:batch], batch)  # compiles the model once, as a worker's first batch does
    timings["model build + first batch"] = time.perf_counter() - started
    build_cpu = time.process_time() - cpu  # the process's CPU seconds (every thread): what a worker spends on the same

    started, cpu = time.perf_counter(), time.process_time()
    features, _ = model(arrays, batch)
    seconds = time.perf_counter() - started
    print(json.dumps({"images": len(arrays), "seconds": seconds, "cpu_s": time.process_time() - cpu, "build_cpu_s": build_cpu,
                      "timings_s": timings, "batch_size": batch, "device": model.device,
                      "features_finite": bool(features.size and (features == features).all())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
