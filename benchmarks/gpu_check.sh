#!/usr/bin/env bash
# GPU check: the bare model against `python -m pipeline run` as a whole process, on a machine with
# an NVIDIA GPU, in under 8 minutes; one table from benchmarks/throughput.py (no PySpark peer).
#
#     bash benchmarks/gpu_wheels.sh                  # here, where pip reaches PyPI: the wheels into .whl/
#     bash benchmarks/gpu_check.sh                   # there, from the repository root (.whl/ carried along)
#     COUNT=20000 S3_COUNT=5000 bash benchmarks/gpu_check.sh   # a shorter try
#
# What it measures, on the same GPU, backend (BACKEND, default jax) and batch size (BATCH, 256):
#   - the bare model on images decoded in memory (the first BARE_COUNT, default 50,000);
#   - the pipeline from a local folder of COUNT images (default 200,000) and from a moto S3 server
#     on loopback holding the first S3_COUNT of them (default 50,000), each as a whole command;
#   - GPU utilisation sampled by nvidia-smi during the featurize stage, each stage's seconds, and
#     everything but the featurize stage (start-up, imports, compiling, listing, PCA, writing).
# Images are made there from the photos shipped in pipeline/sample (benchmarks/make_images.py),
# with seeded random weights (no internet there). The goal (issue "GPU workers for real"): the
# featurize stage at ≥ 0.8× the bare model's images/s, the GPU ≥ 80% busy during it, and all the
# rest of the process ≤ 20 s at 200,000 images.
#
# Python: .venv/ where there is one, else the machine's python3 with the carried wheels installed
# into /tmp/site (its own numpy, pandas, pyarrow, scikit-learn, pillow and JAX are used).
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
BACKEND=${BACKEND:-jax}
BATCH=${BATCH:-256}
COUNT=${COUNT:-200000}
S3_COUNT=${S3_COUNT:-50000}
BARE_COUNT=${BARE_COUNT:-50000}
LIMIT_S=${LIMIT_S:-470}   # the whole script, setup included, stays under 8 minutes
say() { echo "[gpu_check $(( $(date +%s) - started ))s] $*"; }
left() { echo $(( LIMIT_S - ($(date +%s) - started) )); }

say "machine: $(nproc) cores, $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}'), $(date -u +%Y-%m-%dT%H:%MZ)"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/  GPU: /'
else
    say "WARNING: no nvidia-smi: no NVIDIA driver on this machine, the figures below are CPU figures"
fi

if [ -x .venv/bin/python ] && .venv/bin/python -c "import pipeline, moto" 2>/dev/null; then
    PY=.venv/bin/python
elif [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    say "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { say "ERROR: the carried wheels did not install"; exit 2; }
    export PYTHONPATH="/tmp/site:$PWD"
    PY=python3
else
    say "ERROR: no .venv/ and no .whl/ (run benchmarks/gpu_wheels.sh where pip works, and carry .whl)"; exit 2
fi
"$PY" - <<PYEOF || { say "ERROR: the pipeline cannot run here (above: what is missing)"; exit 2; }
import importlib.metadata as m, os
os.environ["KERAS_BACKEND"] = "$BACKEND"
import keras, moto, pipeline
from pipeline.making import featurize
print("  python", __import__("platform").python_version(), "|", ", ".join(f"{n} {m.version(n)}" for n in
      ("dask", "distributed", "dask-ml", "keras", "$BACKEND", "numpy", "pandas", "pyarrow", "scikit-learn")))
print("  GPUs the pipeline sees:", featurize.visible_gpus(), "| on a GPU:", featurize.on_gpu("$BACKEND"))
PYEOF

images=pipeline/sample/fruits-360
for candidate in ../shared/data/fruits-360-apples shared/data/fruits-360-apples; do
    [ -d "$candidate" ] && images=$candidate && break
done
budget=$(left)
say "benchmark: $COUNT images made from $images, $S3_COUNT of them from S3; backend $BACKEND, batch $BATCH; $budget s left"
PYTHONUNBUFFERED=1 timeout "$budget" "$PY" benchmarks/throughput.py --no-spark --local --images "$images" --count "$COUNT" \
    --baseline 0 --s3-limit "$S3_COUNT" --bare-limit "$BARE_COUNT" --backend "$BACKEND" --batch-size "$BATCH"
status=$?
[ $status -eq 124 ] && say "ERROR: the benchmark ran out of time: try COUNT=50000 S3_COUNT=10000"
say "done (exit code $status)"
exit $status
