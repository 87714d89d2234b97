"""Fine-tuning measured: does a CNN taught the apples recognize held-out apples in camera-like photos?

    .venv/bin/python benchmarks/finetune.py accuracy --work /tmp/finetune-bench [--model mobilenet_v2 --image-size 96]
    .venv/bin/python benchmarks/finetune.py pruning --work /tmp/finetune-bench --epochs 4 [--cells 1.0x96,0.5x96]
    .venv/bin/python benchmarks/finetune.py speed

accuracy  The apples of ../shared/data less every 10th photo of each variety, preprocessed (`python -m pipeline
          preprocess`), fine-tuned on (`python -m pipeline finetune`), then `run --weights` on them; the held-out
          fruits recognized as thumbnails and as composites (benchmarks/make_photos.py: the held-out fruits pasted on
          scikit-image's photographs, 1600 × 1200), both preprocessed by `recognize` as the output's images were.
          The same with seeded random weights, as the baseline. One table: weights, accuracies, training seconds.
speed     The bare model's images/s for each cell of the pruning table, without training (random weights).
pruning   MobileNetV2 at width 1.0, 0.5 and 0.35 × image size 224, 128 and 96 (the cells asked for), each trained for
          the same fixed number of epochs (--epochs): accuracy on the composites, images/s of the bare model (one
          process, batches of 32) and of `run` (its featurize rate), features per image.

Everything is made under --work and kept (the preprocessed images, composites, weights, outputs): rerunning
skips what is there. Figures come with the machine's load average: the machine may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import photos  # noqa: E402  (benchmarks/photos.py: the hold-out and the composites)

WIDTHS = {"1.0": "mobilenet_v2", "0.5": "mobilenet_v2_050", "0.35": "mobilenet_v2_035"}


def load() -> str:
    """The machine's load average over the last minute, to print beside each figure."""
    return f"{os.getloadavg()[0]:.1f}"


def pipeline_command(*args: str) -> None:
    """`python -m pipeline ARGS` in a child process (as a user runs it), its output shown; fails loudly."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-m", "pipeline", *args], check=True, env=env, cwd=REPO)


def prepared_training_set(work: pathlib.Path, source: pathlib.Path) -> pathlib.Path:
    """The training apples (every 10th of each variety held out), preprocessed once into work/prepared."""
    prepared = work / "prepared"
    if not (prepared / "preprocess.json").exists():
        pipeline_command("preprocess", "--input", str(photos.training_copy(work, source)), "--output", str(prepared), "--quiet")
    return prepared


def fine_tuned(work: pathlib.Path, prepared: pathlib.Path, model: str, size: int, epochs: int | None) -> tuple[pathlib.Path, dict]:
    """The weights fine-tuned on the prepared training set (trained once), and their JSON."""
    weights = work / f"{model}-{size}{'' if epochs is None else f'-{epochs}epochs'}.weights.h5"
    if not pathlib.Path(f"{weights}.json").exists():
        pipeline_command("finetune", "--input", str(prepared), "--output", str(weights), "--model", model,
                         "--image-size", str(size), *([] if epochs is None else ["--epochs", str(epochs)]))
    return weights, json.loads(pathlib.Path(f"{weights}.json").read_text())


def output(work: pathlib.Path, prepared: pathlib.Path, model: str, size: int, weights: str, name: str) -> pathlib.Path:
    """`run` on the prepared training set with these weights (once), its output folder."""
    out = work / f"output-{name}"
    if not (out / "manifest.json").exists():
        pipeline_command("run", "--input", str(prepared), "--output", str(out), "--model", model, "--image-size", str(size),
                         "--weights", weights, "--overwrite", "--quiet")
    return out


def accuracies(out: pathlib.Path, source: pathlib.Path, composites: pathlib.Path) -> dict[str, float]:
    """The held-out apples recognized against `out`: as thumbnails, and as composites on backgrounds (both preprocessed
    by the recognizer, as the output's images were)."""
    from pipeline.reading.recognize import Recognizer

    recognizer = Recognizer.load(str(out))
    _, test = photos.held_out(source)
    made = {row["path"] for row in photos.truths(composites)}
    names = [p.relative_to(source).as_posix() for p in test if p.relative_to(source).as_posix() in made]
    labels = [name.split("/")[-2] for name in names]

    def accuracy(blobs: list[bytes]) -> float:
        said = [answer.label for answer in recognizer.recognize(blobs)]
        return float(np.mean([a == b for a, b in zip(said, labels)]))

    return {"images": len(names), "thumbnails": accuracy([(source / n).read_bytes() for n in names]),
            "composites": accuracy([(composites / "photos" / n).read_bytes() for n in names])}


def bare_rate(model: str, size: int, weights: str, seconds: float = 10.0) -> float:
    """Images/s of the network alone in this process (TensorFlow, batches of 32 images of 100 × 100), after a warm-up."""
    from pipeline.making import featurize

    net = featurize.Featurizer(featurize.ModelKey(model, size, weights, 0, "tensorflow"), {})
    batch = [np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)] * 32
    net(batch, 32)
    started, done = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        net(batch, 32)
        done += 32
    return done / (time.perf_counter() - started)


def measure_accuracy(args) -> None:
    print(f"machine: {os.cpu_count()} cores, load average {load()}; {args.model} at {args.image_size} px")
    prepared = prepared_training_set(args.work, args.source)
    composites = photos.composites(args.work, "1600x1200", None, args.source)
    weights, made = fine_tuned(args.work, prepared, args.model, args.image_size, args.epochs)
    rows = []
    for name, used, seconds in (("random (seed 0)", "random", None), ("fine-tuned", str(weights), made["seconds"])):
        out = output(args.work, prepared, args.model, args.image_size, used, f"{args.model}-{args.image_size}-{used == 'random' and 'random' or 'finetuned'}")
        scores = accuracies(out, args.source, composites)
        rows.append(f"| {name} | {args.model} | {args.image_size} | {scores['thumbnails']:.3f} | {scores['composites']:.3f} | "
                    + (f"{seconds:.0f} s, {made['epochs']} epochs (best {made['best_epoch']}), {made['device']}" if seconds else "–")
                    + f" | {load()} |")
    print(f"held-out apples: {scores['images']} thumbnails and as many composites (1600 × 1200, preprocessed by recognize)")
    print("| weights | model | image size | thumbnails | composites, preprocessed | training | load average |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def measure_pruning(args) -> None:
    print(f"machine: {os.cpu_count()} cores, load average {load()}; every cell trained for {args.epochs} epochs")
    prepared = prepared_training_set(args.work, args.source)
    composites = photos.composites(args.work, "1600x1200", None, args.source)
    print("| width | image size | composites, preprocessed | thumbnails | bare model, images/s | run, images/s | "
          "features per image | training s | load average |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cell in args.cells.split(","):
        width, size = cell.split("x")
        model = WIDTHS[width]
        weights, made = fine_tuned(args.work, prepared, model, int(size), args.epochs)
        out = output(args.work, prepared, model, int(size), str(weights), f"{model}-{size}-{args.epochs}epochs")
        scores = accuracies(out, args.source, composites)
        pipeline_rate = json.loads((out / "manifest.json").read_text())["images_per_s"]["featurize"]
        print(f"| {width} | {size} | {scores['composites']:.3f} | {scores['thumbnails']:.3f} | "
              f"{bare_rate(model, int(size), str(weights)):.0f} | {pipeline_rate:.0f} | {made['features']} | "
              f"{made['seconds']:.0f} | {load()} |", flush=True)


def measure_speed(args) -> None:
    """The bare model's images/s for every cell, with random weights (the speed does not depend on them): no training."""
    from pipeline.making import featurize

    print(f"machine: {os.cpu_count()} cores, load average {load()}; TensorFlow, batches of 32 images of 100 × 100")
    print("| width | image size | bare model, images/s | features per image | load average |")
    print("|---|---|---|---|---|")
    for cell in args.cells.split(","):
        width, size = cell.split("x")
        print(f"| {width} | {size} | {bare_rate(WIDTHS[width], int(size), 'random'):.0f} | "
              f"{featurize.MODELS[WIDTHS[width]].n_features} | {load()} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["accuracy", "pruning", "speed"])
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/finetune-bench"))
    parser.add_argument("--source", type=pathlib.Path, default=photos.APPLES, help="Fruits-360 apples (label folders)")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, help="epochs (default: pipeline.yaml's finetune.epochs, with early stopping)")
    parser.add_argument("--cells", default="1.0x224,1.0x128,1.0x96,0.5x224,0.5x128,0.5x96,0.35x224,0.35x128,0.35x96",
                        help="pruning: width x image size, comma-separated")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    {"accuracy": measure_accuracy, "pruning": measure_pruning, "speed": measure_speed}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
