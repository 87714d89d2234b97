#!/usr/bin/env bash
# GPU check: the bare model and the pipeline side by side on a machine with an NVIDIA GPU, in
# under 8 minutes, printing the same table as benchmarks/throughput.py (without the PySpark peer).
#
#     bash benchmarks/gpu_check.sh            # from the repository root
#     COUNT=20000 bash benchmarks/gpu_check.sh
#
# What it assumes (a bare machine image with a copy of this repository, no internet but perhaps a
# pip mirror):
#   - python3 ≥ 3.10 with venv; an NVIDIA driver (nvidia-smi) for the GPU.
#   - .venv/ in the repository is used when it is there and imports the pipeline; otherwise it is
#     created with `pip install -e ".[test]"` (through whatever index pip is configured with).
#   - TensorFlow finds CUDA either on the machine or in pip's nvidia-* wheels; when it sees no GPU,
#     the script tries `pip install "tensorflow[and-cuda]==<the installed version>"` once, and if
#     TensorFlow still sees none it runs on the CPU and says so loudly (the figures are then CPU ones).
#   - Images: ../shared/data/fruits-360-apples or shared/data/fruits-360-apples when present,
#     otherwise the 129 photos shipped in pipeline/sample; COUNT images (default 10000) are made from
#     them with flips, rotations and crops (benchmarks/make_images.py) in a temporary folder.
#   - No ImageNet weights (no internet): seeded random weights, as in every benchmark here.
# Steps are bounded by `timeout` so the whole stays under 8 minutes; exit code: the benchmark's.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
COUNT=${COUNT:-10000}
LIMIT_S=${LIMIT_S:-470}   # the whole script, setup included, stays under 8 minutes
say() { echo "[gpu_check $(( $(date +%s) - started ))s] $*"; }
left() { echo $(( LIMIT_S - ($(date +%s) - started) )); }

say "machine: $(nproc) cores, $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/  GPU: /'
else
    say "WARNING: no nvidia-smi: no NVIDIA driver on this machine"
fi

PY=.venv/bin/python
if ! [ -x "$PY" ] || ! "$PY" -c "import pipeline, moto" 2>/dev/null; then
    say "setting up .venv (pip install -e '.[test]')"
    python3 -m venv .venv && timeout 300 .venv/bin/pip install -q -e ".[test]" \
        || { say "ERROR: could not install the project (no package index reachable?)"; exit 2; }
fi

gpus() { "$PY" -c "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))" 2>/dev/null | tail -1; }
n_gpus=$(gpus)
if [ "${n_gpus:-0}" = "0" ] && command -v nvidia-smi >/dev/null; then
    version=$("$PY" -c "import importlib.metadata as m; print(m.version('tensorflow'))")
    say "TensorFlow $version sees no GPU: trying pip install tensorflow[and-cuda]==$version"
    timeout 240 .venv/bin/pip install -q "tensorflow[and-cuda]==$version" || say "could not install the CUDA wheels"
    n_gpus=$(gpus)
fi
if [ "${n_gpus:-0}" = "0" ]; then
    say "WARNING: TensorFlow sees NO GPU: the figures below are CPU figures, not a GPU check"
else
    say "TensorFlow sees $n_gpus GPU(s)"
fi

# Mixed precision keeps features within 1e-2 of float32 on this device (the pipeline uses it on GPUs).
timeout 120 "$PY" - <<'EOF' 2>&1 | grep -v -E '^(I0000|W0000|E0000|WARNING: All log)'
import numpy as np
from pipeline import featurize, images
from pipeline.config import SAMPLE_DIR

paths = sorted((SAMPLE_DIR / "Training").rglob("*.jpg"))[:32]
arrays = [images.decode(p.read_bytes(), 224) for p in paths]
key = featurize.ModelKey("mobilenet_v2", 224, "random", 0)
featurize.configure_tensorflow()
mixed = featurize.Featurizer(key, {}, mixed_precision=True)
full = featurize.Featurizer(key, {}, mixed_precision=False)
a, b = full(arrays, 32)[0], mixed(arrays, 32)[0]
error = float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)).max())
print(f"device {mixed.device}: mixed precision vs float32, largest relative error of a feature vector {error:.1e}"
      f" ({'within' if error <= 1e-2 else 'NOT within'} 1e-2)")
EOF

images=pipeline/sample/fruits-360
for candidate in ../shared/data/fruits-360-apples shared/data/fruits-360-apples; do
    [ -d "$candidate" ] && images=$candidate && break
done
budget=$(left)
say "benchmark: $COUNT images made from $images; $budget s left"
timeout "$budget" "$PY" benchmarks/throughput.py --no-spark --local --images "$images" --count "$COUNT" --baseline 0
status=$?
[ $status -eq 124 ] && say "ERROR: the benchmark ran out of time (COUNT=$COUNT): try COUNT=5000"
say "done (exit code $status)"
exit $status
