"""The command line: `python -m pipeline run [options]`; defaults shown are those in force."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from datetime import datetime, timezone

import dask.config

from . import config
from .making import incremental, job
from .making.featurize import MODELS


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, exit code 2, no usage dump."""

    def error(self, message: str):
        fail(f"{self.prog}: {message} (see --help)")


def fail(message: str, code: int = 2):
    print(f"error: {config.masked(message)}", file=sys.stderr)
    sys.exit(code)


def mask_credentials(record: logging.LogRecord) -> bool:
    """A logging filter: the message as config.masked leaves it (a URL's password, a signature)."""
    record.msg, record.args = config.masked(record.getMessage()), ()
    return True


def default(key: str) -> str:
    """The value in force for a setting (pipeline.yaml, then DASK_PIPELINE__* variables)."""
    return repr(dask.config.get(f"pipeline.{key}"))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m pipeline", description="Images in a bucket → CNN features → PCA → parquet, on Dask.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = commands.add_parser(
        "run",
        help="featurize every image under --input and write features and their PCA to --output",
        description="List the images under --input, featurize them with a CNN on the Dask workers, fit an "
        "exact PCA on all features (from each partition's moments), and write one parquet row per image to --output, with "
        "errors.parquet, pca.npz and manifest.json beside it. Defaults come from pipeline/pipeline.yaml; "
        "DASK_PIPELINE__<KEY> variables override them, and these flags override both.",
    )
    where(run, input_help=f"fsspec URL or folder of images, an S3 Inventory's manifest.json, or a listing file (.parquet, .csv); 'sample' = the shipped sample (default {default('input')})")
    run.add_argument("--model", choices=sorted(MODELS), help=f"CNN without its top (default {default('model')})")
    run.add_argument(
        "--weights",
        help="auto: ImageNet, else seeded random weights with a warning; imagenet: ImageNet or fail; "
        f"random: seeded random weights; or a path/URL of a weights file (default {default('weights')})",
    )
    run.add_argument("--n-components", help=f"components kept: an integer, or a fraction of variance such as 0.95 (default {default('n-components')})")
    run.add_argument("--image-size", help=f"model input side in pixels (default {default('image-size')})")
    run.add_argument("--batch-size", help=f"images per model call; auto: 32 on a CPU, 256 on a GPU (default {default('batch-size')})")
    run.add_argument("--images-per-partition", help=f"images per Dask task, or auto: growing with the input (default {default('images-per-partition')})")
    run.add_argument("--seed", help=f"seed of random weights (default {default('seed')})")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="finish an interrupted run into the same --output, featurizing only what it had not")
    again.add_argument("--overwrite", action="store_true", help="replace what --output holds (the old output stays until the new one is complete)")
    incremental = commands.add_parser(
        "update",
        help="bring a finished --output up to date with its input: featurize only new or replaced images, drop deleted ones",
        description="List the input again and compare it with --output by path and identity (ETag, or size and mtime). "
        "New and replaced images are featurized, deleted ones dropped, the PCA goes on fitting with the new features "
        "only (partial_fit), and every row is projected again with it. The model, weights and PCA settings are the "
        "output's own (see its manifest.json); its history lists every update. It removes the output's report/ and "
        "evaluation/, which described the old rows. Run it again to finish an interrupted update.",
    )
    where(incremental, input_help="fsspec URL or folder of images, a newer inventory's manifest.json or a listing file (default: the input the output was made from)")
    incremental.add_argument("--pca-batch-size", help="rows per IncrementalPCA step of the new features; "
                             f"default 5 × features ({default('pca-batch-size')})")
    photos = commands.add_parser(
        "preprocess",
        help="camera photos under --input → the fruit cropped square on white, 100 × 100 JPEGs under --output, for `run`",
        description="For every photo under --input: decode at reduced scale, find the fruit (no model needed), crop a "
        "square around it with a margin, make everything else white, resize, and write it as a JPEG under --output in the "
        "same label/split layout, with photos.parquet (source, crop box, fruit fraction, size, EXIF time, GPS and camera), "
        "errors.parquet (photos without a fruit found, unreadable ones) and preprocess.json. Run again, it preprocesses "
        "only new or replaced photos and removes deleted ones' thumbnails; interrupted, it finishes what it had not done. "
        "`run --input` that output carries the photos' details into images.parquet, and `recognize` preprocesses new "
        "photos alike. Settings: the `preprocess` section of pipeline/pipeline.yaml.",
    )
    photos.add_argument("--input", help="fsspec URL or folder of photos (label folders, as for run); default: the "
                        "input --output was preprocessed from")
    photos.add_argument("--output", required=True, help="folder or fsspec URL for the thumbnails and their table")
    photos.add_argument("--cluster", help=f"where to preprocess, as for run; a CPU cluster is enough (default {default('cluster')})")
    photos.add_argument("--method", help=f"grabcut or colour (default {default('preprocess.method')})")
    photos.add_argument("--size", help=f"thumbnail side in pixels (default {default('preprocess.size')})")
    photos.add_argument("--margin", help=f"white space each side of the fruit, a fraction of its size (default {default('preprocess.margin')})")
    photos.add_argument("--quality", help=f"JPEG quality of the thumbnails (default {default('preprocess.quality')})")
    photos.add_argument("--images-per-partition", help=f"photos per Dask task (default {default('images-per-partition')})")
    storage_flags(photos, "for input and output")
    photos.add_argument("--quiet", action="store_true", help="print nothing but warnings and errors")
    photos.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout instead of the summary")
    tune = commands.add_parser(
        "finetune",
        help="teach the CNN the labels of --input (label folders) and write a weights file for `run --weights`",
        description="Train the configured model at its image size (from ImageNet's weights when they can be had, else "
        "from the seeded random ones, or from --weights) with a softmax head on the labelled images under --input, "
        "augmented to look like preprocessed camera photos, a validation set held out by series, early stopping, and "
        "batch-norm statistics re-estimated after training. Writes the network without its head to --output (a "
        "WEIGHTS.weights.h5 file, any fsspec URL) and WEIGHTS.weights.h5.json beside it; `run --weights`, `update` and "
        "`recognize` use it as any weights file. Interrupted, the same command resumes from its last finished epoch. "
        "Settings: the `finetune` section of pipeline/pipeline.yaml.",
    )
    tune.add_argument("--input", required=True, help="fsspec URL or folder of labelled images (a folder per label, as for run)")
    tune.add_argument("--output", required=True, metavar="WEIGHTS.weights.h5", help="where to write the weights (fsspec URL or path)")
    tune.add_argument("--model", choices=sorted(MODELS), help=f"CNN to train (default {default('model')})")
    tune.add_argument("--image-size", help=f"model input side in pixels (default {default('image-size')})")
    tune.add_argument("--weights", help=f"starting weights: auto, imagenet, random or a weights file (default {default('weights')})")
    tune.add_argument("--seed", help=f"seed of random weights, the split and the augmentations (default {default('seed')})")
    tune.add_argument("--epochs", help=f"at most this many epochs (default {default('finetune.epochs')})")
    tune.add_argument("--batch-size", help=f"images per training step (default {default('finetune.batch-size')})")
    tune.add_argument("--learning-rate", help=f"Adam's learning rate (default {default('finetune.learning-rate')})")
    tune.add_argument("--cluster", help="train as one task on a worker of this cluster (a GPU worker when it has one), "
                      "as for run: 'local', tcp://host:8786 or a cluster file (default: in this process)")
    storage_flags(tune, "for input and output")
    tune.add_argument("--json", action="store_true", help="print WEIGHTS.json on stdout instead of the summary")
    clusters = commands.add_parser("cluster", help="cluster files: plan what one would start, clean up what a killed run left")
    actions = clusters.add_subparsers(dest="action", required=True, parser_class=Parser)
    plan = actions.add_parser("plan", help="print the instances, their cost per hour and the settings of cluster files, "
                              "and with --images what featurizing that many would take and cost; launches nothing")
    plan.add_argument("file", nargs="+", help="cluster files, e.g. cluster/ec2-gpu.yaml; several with --images: side by side")
    plan.add_argument("--images", metavar="N", help="estimate the hours and USD of featurizing N images; N may be an S3 Inventory's "
                      "manifest.json or a listing file, whose keys are counted")
    plan.add_argument("--from", dest="rate_from", metavar="OUTPUT", help="a finished run's --output whose images/s per worker "
                      "to plan with (default: the measured rates of cluster/rates.yaml)")
    plan.add_argument("--preprocess", metavar="CPU_FILE", help="with --megapixels and --images: N camera photos preprocessed on "
                      "this cluster file then featurized on each FILE, against everything on FILE's workers (raw photos decoded there)")
    plan.add_argument("--megapixels", metavar="MP", help="the photos' size as taken, for --preprocess (1.9 for 1600 × 1200, 12 for 4000 × 3000)")
    cleanup = actions.add_parser("cleanup", help="list what pipeline runs left in the file's region (instances, security "
                                 "groups, TLS secrets), run by run, and which are kept because a live client may own them")
    cleanup.add_argument("file", help="an EC2 cluster file (for its region)")
    cleanup.add_argument("--run", help="only this run id (printed when the run started)")
    cleanup.add_argument("--yes", action="store_true", help="remove the runs not kept (with --run: that run, whatever its state)")
    report = commands.add_parser(
        "report",
        help="pictures of a finished run: PNG files and one self-contained HTML page",
        description="Read a finished run's manifest.json, pca.npz, errors.parquet and images.parquet (labels and "
        "first two PCA coordinates only) and write the explained variance, the images on the first two principal "
        "components, the stage timings and the counts as PNG files, with report.html holding them all, to OUTPUT/report/.",
    )
    finished_output_arguments(report, "the pictures and the page", "report")
    evaluate = commands.add_parser(
        "evaluate",
        help="how well the PCA features tell the labels apart: a logistic regression's accuracy, per label and by k",
        description="Train a logistic regression on a finished run's PCA coordinates (its Training split, or a seeded "
        "75% of each label when there is no Test split, or one series of Fruits-360's frames with --holdout series), score it on "
        "the Test split (or the other 25%, or the other series) for the k kept "
        "and a few smaller k, and write evaluation.json, a confusion matrix, accuracy against k and evaluation.html to "
        "OUTPUT/evaluation/. The weights that produced the features are stated. An output of more than --max-images "
        "images is evaluated on a seeded sample of that many, each part of images.parquet giving its share, as the scores say.",
    )
    finished_output_arguments(evaluate, "the files", "evaluation")
    evaluate.add_argument("--max-images", metavar="N", help="evaluate a seeded sample of N images when the output has more "
                          f"(default {default('evaluate.max-images')}; null in pipeline.yaml: every image)")
    evaluate.add_argument("--holdout", choices=["random", "series"], help="without a Test split, the images tested: a seeded 25%% "
                          "of each label (random: flatters where images come in series), or Fruits-360's later series "
                          f"of frames, file names r_*, r2_* (series) (default {default('evaluate.holdout')})")
    evaluate.add_argument("--json", action="store_true", help="print evaluation.json on stdout instead of the summary")
    recognize = commands.add_parser(
        "recognize",
        help="which fruit is in new photos: a label with its confidence, and the nearest images of a finished output",
        description="Featurize the images with the output's own model, weights and image size, project them with its "
        "PCA, and answer for each the label of a logistic regression trained on the output's PCA rows (the one evaluate "
        "scores, saved as OUTPUT/recognizer.npz), its probability, and the nearest images of the output in PCA space, "
        "found by the output's index (OUTPUT/index/; --exact scans every row instead). "
        f"Up to {default('recognize.in-process-images')} images are answered in this process; a folder or prefix of more "
        "runs on the cluster and writes predictions.parquet and errors.parquet to OUTPUT/predictions/.",
    )
    recognize.add_argument("output", metavar="OUTPUT", help="the --output of a finished run: folder or fsspec URL")
    recognize.add_argument("images", metavar="IMAGE", nargs="+", help="image files, folders or fsspec URLs (s3://bucket/photo.jpg, s3://bucket/prefix)")
    recognize.add_argument("--neighbours", help=f"nearest images answered with each label (default {default('recognize.neighbours')})")
    recognize.add_argument("--to", metavar="FOLDER", help="where a folder of many images writes its predictions (default OUTPUT/predictions/)")
    recognize.add_argument("--cluster", help=f"where a folder of many images is featurized, as for run (default {default('cluster')})")
    storage_flags(recognize, "of the output and the images")
    recognize.add_argument("--json", action="store_true", help="print the answers (or what was written) as JSON on stdout")
    recognize.add_argument("--exact", action="store_true", help="find the nearest images by an exact scan of every row of the "
                           "output instead of its index (slow on a large output: to check the index's answers)")
    serve = commands.add_parser(
        "serve",
        help="answer photos over HTTP from a finished output, with a phone page at / and corrections at /labels",
        description="An HTTP service (FastAPI + uvicorn): POST /recognize answers a photo with its label, confidence, "
        "details and nearest images; GET /thumbnails/{row}; POST /labels stores a corrected photo under the output's "
        "input in Contributed/<label>/ (needs the token of DASK_PIPELINE__SERVE__TOKEN); /healthz, /metrics, /docs, "
        "and a page at / for a phone. Concurrent photos are answered in one model call. See docs/serve.md.",
    )
    serve.add_argument("output", metavar="OUTPUT", help="the --output of a finished run: folder or fsspec URL")
    serve.add_argument("--host", help=f"address to listen on (default {default('serve.host')})")
    serve.add_argument("--port", help=f"port to listen on (default {default('serve.port')})")
    serve.add_argument("--details", metavar="FILE", help="YAML or JSON of details per label (default: OUTPUT/details.yaml "
                       "or .json; for an output of the shipped sample, its apples' details)")
    serve.add_argument("--update-every", metavar="DURATION", help="check for contributions this often (30s, 10m, 1h) and "
                       "run `update` when some are not in the output yet, then answer from the new version "
                       f"(default {default('serve.update-every')}: never)")
    serve.add_argument("--reload-every", metavar="DURATION", help="check this often whether the output has a new version "
                       "(made by another replica's --update-every, or an `update`) and answer from it "
                       f"(default {default('serve.reload-every')}: never)")
    storage_flags(serve, "of the output and its input")
    return parser


def where(command: argparse.ArgumentParser, input_help: str) -> None:
    """The flags `run` and `update` share: where the images are and go, where to compute, what to print."""
    command.add_argument("--input", help=input_help)
    command.add_argument("--prefix", help="with an S3 Inventory's manifest.json or a listing file as --input: only the "
                         "keys under this prefix, as if --input named it")
    command.add_argument("--output", help=f"folder or fsspec URL for the results (default {default('output')})")
    command.add_argument("--cluster", help=f"'local', a scheduler address tcp://host:8786, or a cluster file such as cluster/ec2-gpu.yaml (default {default('cluster')})")
    command.add_argument("--backend", choices=list(config.BACKENDS), help="what runs the model on the workers: auto (onnxruntime on "
                         f"CPU workers, tensorflow on GPU ones), onnxruntime, or Keras 3's tensorflow, jax or torch (default {default('backend')})")
    command.add_argument("--gpu", choices=["auto", "true", "false"], help="featurize on the workers declaring a GPU resource: "
                         f"auto (when any does), true (only there) or false (anywhere) (default {default('gpu')})")
    storage_flags(command, "for input and output")
    command.add_argument("--report", metavar="FILE.html", help="save a Dask performance report of the run")
    command.add_argument("--quiet", action="store_true", help="print nothing but warnings and errors: no progress, no summary")
    command.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout instead of the summary")


def storage_flags(command: argparse.ArgumentParser, of: str) -> None:
    """--endpoint-url and --anon, which every command reading or writing a bucket takes."""
    command.add_argument("--endpoint-url", help=f"S3 endpoint {of} (MinIO, a local S3 server, another region)")
    command.add_argument("--anon", action="store_true", help="read a public bucket without credentials")


def finished_output_arguments(parser: argparse.ArgumentParser, written: str, folder: str) -> None:
    """OUTPUT and where to write, for the commands that read a finished run (report, evaluate)."""
    parser.add_argument("output", metavar="OUTPUT", help="the --output of a finished run: folder or fsspec URL")
    parser.add_argument("--to", metavar="FOLDER", help=f"write {written} here instead of OUTPUT/{folder}/")
    storage_flags(parser, "of the output")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(mask_credentials)
    if args.command == "cluster":
        return cluster_command(args)
    storage = dict(dask.config.get("pipeline.storage-options") or {})
    if args.endpoint_url:
        storage["endpoint_url"] = args.endpoint_url
    if args.anon:
        storage["anon"] = True
    if args.command == "report":
        return write_report(args.output, args.to, storage)
    if args.command == "evaluate":
        return write_evaluation(args.output, args.to, storage, args.json, args.max_images, args.holdout)
    if args.command == "recognize":
        return recognize_images(args, storage)
    if args.command == "serve":
        return serve_output(args, storage)
    if args.command == "preprocess":
        return preprocess_photos(args, storage)
    if args.command == "finetune":
        return finetune_model(args, storage)
    quiet = args.quiet or args.json
    say = (lambda message: None) if quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    started = datetime.now(timezone.utc).isoformat()  # an update that changed nothing returns an older manifest
    common = dict(output=args.output, input_prefix=args.prefix, cluster=args.cluster, report=args.report, gpu=args.gpu, backend=args.backend,
                  storage_options=storage)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout holds the summary or the JSON alone
            if args.command == "update":
                manifest = incremental.update(config.settings(pca_batch_size=args.pca_batch_size, **common), input=args.input,
                                              say=say, progress=not quiet)
            else:
                settings = config.settings(
                    input=args.input, model=args.model, weights=args.weights, n_components=args.n_components,
                    image_size=args.image_size, batch_size=args.batch_size, images_per_partition=args.images_per_partition,
                    seed=args.seed, **common,
                )
                manifest = job.run(settings, resume=args.resume, overwrite=args.overwrite, say=say, progress=not quiet)
    except config.UsageError as error:
        fail(str(error))
    except KeyboardInterrupt:
        again = "again" if args.command == "update" else "with --resume"
        fail(f"interrupted; the cluster was closed. Run the same command {again} to finish the {args.command}", code=130)
    if args.json:
        print(json.dumps(manifest, indent=2, ensure_ascii=False, default=str))
    elif not args.quiet:
        print(summary(manifest) if manifest["finished"] >= started else
              f"up to date     nothing new, replaced or removed under {manifest['input']}: nothing written\n"
              f"output         {manifest['output']}")
    return 0


def preprocess_photos(args: argparse.Namespace, storage: dict) -> int:
    """`pipeline preprocess`: thumbnails of every photo under --input (or of what changed); print what was done."""
    from .making import preprocess

    quiet = args.quiet or args.json
    say = (lambda message: None) if quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            settings = config.settings(input=args.input or preprocess.last_input(args.output, storage), output=args.output, cluster=args.cluster, storage_options=storage,
                                       images_per_partition=args.images_per_partition)
            recipe = preprocess.recipe(method=args.method, size=args.size, margin=args.margin, quality=args.quality)
            manifest = preprocess.preprocess(settings, recipe, say=say, progress=not quiet)
    except config.UsageError as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail("interrupted; the cluster was closed. Run the same command again to finish the preprocess", code=130)
    if args.json:
        print(json.dumps(manifest, indent=2, ensure_ascii=False, default=str))
    elif not args.quiet:
        counts = manifest["counts"]
        print("\n".join([
            f"photos listed  {counts['listed']}  (non-image files skipped: {counts['skipped_non_images']})",
            f"preprocessed   {counts['preprocessed']}  (unchanged since the last time: {counts['unchanged']}, "
            f"removed: {counts['removed']})",
            f"no fruit found {counts['no_fruit']}, failed in all {counts['failed']}"
            + (f"  (see {manifest['output']}/errors.parquet)" if counts["failed"] else ""),
            f"photos/s       {manifest['images_per_s']:.1f} while preprocessing",
            f"output         {manifest['output']}  (thumbnails, photos.parquet; next: python -m pipeline run --input "
            f"{manifest['output']})",
        ]))
    return 0


def finetune_model(args: argparse.Namespace, storage: dict) -> int:
    """`pipeline finetune`: train, printing a line per epoch; print where the weights went and how to use them."""
    from .making import finetune

    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731 (progress on stderr, even with --json)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            settings = config.settings(input=args.input, model=args.model, image_size=args.image_size, weights=args.weights,
                                       seed=args.seed, storage_options=storage)
            settings = dataclasses.replace(settings, cluster=args.cluster)  # none given: in this process
            recipe = finetune.recipe(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate)
            made = finetune.finetune(settings, recipe, args.output, say)
    except config.UsageError as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail("interrupted; run the same command again to resume from the last finished epoch", code=130)
    if args.json:
        print(json.dumps(made, indent=2, ensure_ascii=False))
    else:
        print("\n".join([
            f"weights        {made['weights']}  ({made['model']} at {made['image_size']} px, without its top)",
            f"about them     {made['weights']}{finetune.ABOUT}",
            f"training       {made['epochs']} epochs in {made['seconds']:.0f} s on the {made['device']}, best epoch {made['best_epoch']}, "
            f"validation accuracy {made['validation_accuracy'] if made['validation_accuracy'] is None else round(made['validation_accuracy'], 3)}",
            f"next           python -m pipeline run --input {args.input} --model {made['model']} --image-size {made['image_size']} "
            f"--weights {made['weights']}",
        ]))
    return 0


def write_report(output: str, folder: str | None, storage: dict) -> int:
    """`pipeline report`: draw the pictures of a finished run; print the files written, the page first."""
    from .reading import report  # matplotlib is imported only to draw

    try:
        written = report.write(report.load(output, storage), folder, storage)
    except config.UsageError as error:
        fail(str(error))
    print("\n".join(written))
    return 0


def write_evaluation(output: str, folder: str | None, storage: dict, as_json: bool, max_images: str | None = None,
                     holdout: str | None = None) -> int:
    """`pipeline evaluate`: score a classifier on a finished run's features; print the summary and the files written."""
    from .reading import evaluate  # scikit-learn and matplotlib are imported only to evaluate

    try:
        scores = evaluate.evaluate(evaluate.load(output, storage, max_images), holdout)
        written = evaluate.write(scores, folder, storage)
    except config.UsageError as error:
        fail(str(error))
    if as_json:
        print(json.dumps(scores, indent=2, ensure_ascii=False))
    else:
        print("\n".join([*evaluate.summary(scores), f"written    {written[0]}", *(f"           {path}" for path in written[1:])]))
    return 0


def recognize_images(args: argparse.Namespace, storage: dict) -> int:
    """`pipeline recognize`: print each image's label and nearest images, or what a folder of many wrote."""
    from .reading import recognize  # TensorFlow is imported only to featurize

    say = (lambda message: None) if args.json else (lambda message: print(message, file=sys.stderr, flush=True))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout holds the answers alone
            result = recognize.command(args.output, args.images, to=args.to, neighbours=args.neighbours, storage_options=storage,
                                       cluster_address=args.cluster, say=say, progress=not args.json, exact=args.exact)
    except config.UsageError as error:
        fail(str(error))
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else "\n".join(recognize.summary(result)))
    return 0


def serve_output(args: argparse.Namespace, storage: dict) -> int:
    """`pipeline serve`: answer photos over HTTP until interrupted."""
    try:
        from .reading import serve  # FastAPI, uvicorn and TensorFlow are imported only to serve
    except ModuleNotFoundError as missing:
        fail(f"serve needs {missing.name}: pip install -e \".[serve]\"")

    try:
        serve.serve(args.output, storage, host=args.host, port=args.port, details=args.details, update_every=args.update_every,
                    reload_every=args.reload_every,
                    say=lambda message: print(message, file=sys.stderr, flush=True))
    except config.UsageError as error:
        fail(str(error))
    return 0


def cluster_command(args: argparse.Namespace) -> int:
    """`cluster plan FILE... [--images N [--from OUTPUT] [--preprocess CPU_FILE --megapixels MP]]` and `cluster cleanup FILE [--run ID] [--yes]`."""
    try:
        if args.action == "plan":
            from cluster.plan import plan

            print(plan(args.file, args.images, args.rate_from, args.preprocess, args.megapixels))
        else:
            from cluster.ec2 import cleanup

            print(cleanup(args.file, args.run, args.yes))
    except config.UsageError as error:
        fail(str(error))
    return 0


def summary(manifest: dict) -> str:
    """The few lines a user reads at the end of a run."""
    counts, pca, speed = manifest["counts"], manifest["pca"], manifest["images_per_s"]
    weights = manifest["weights"]
    last = manifest.get("history", [{}])[-1]
    lines = [
        f"images listed  {counts['listed']}  (non-image files skipped: {counts['skipped_non_images']})",
        f"images failed  {counts['failed']}" + (f"  (see {manifest['output']}/errors.parquet)" if counts["failed"] else ""),
        *([f"images/s       {speed['list_to_output']:.1f} from listing to output (cluster start excluded), "
           f"{speed['featurize']:.1f} while featurizing"] if last.get("command") != "update" else
          [f"images/s       {speed['featurize']:.1f} while featurizing the {last['featurized']} images of the last update, "
           f"{speed['list_to_output']:.1f} from its listing to output"]),
        *([f"last update    {last['added']} new, {last['replaced']} replaced, {last['removed']} removed: "
           f"{last['featurized']} featurized, {counts['written']} rows in all"] if last.get("command") == "update" else []),
        f"PCA            {pca['n_components']} components keep {pca['variance_kept']:.1%} of the variance",
        f"weights        {weights['used']}" + (f" (seed {manifest['settings']['seed']})" if weights["used"] == "random" else "")
        + (", not ImageNet's: they could not be downloaded" if weights["warning"] else ""),
        f"output         {manifest['output']}",
        f"dashboard      {manifest['dashboard']}",
    ]
    return "\n".join(lines)
