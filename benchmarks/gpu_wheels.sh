#!/usr/bin/env bash
# The wheels the lent GPU machine lacks to run the pipeline, downloaded here into .whl/ (ignored by
# git), for the device's Python 3.12 on x86-64. That machine has numpy, pandas, pyarrow,
# scikit-learn, pillow, JAX and PyTorch but none of what follows, and reaches no package index:
# benchmarks/gpu_check.sh installs these from .whl/ with pip --no-index.
#
#     bash benchmarks/gpu_wheels.sh            # then carry .whl to the device with the repository
#
# Versions are this project's pins (pyproject.toml) and what they resolved to here; each wheel's
# own needs were checked against the device's package list (../.library/device/KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
    dask==2026.8.0 distributed==2026.8.0 dask-ml==2025.1.0 dask-glm==0.4.0 sparse==0.19.3
    keras==3.15.1 namex==0.1.0 optree==0.20.0
    s3fs==2026.9.0 fsspec==2026.9.0 aiobotocore==3.10.0 aioitertools==0.13.0 botocore==1.43.117 jmespath==1.1.0
    tblib==3.2.2 zict==3.0.0 locket==1.0.0 partd==1.4.2 tornado==6.6.1
    moto==5.2.5 boto3==1.43.117 s3transfer==0.19.3 xmltodict==1.0.4 responses==0.26.3 cryptography==50.0.2
    cffi==2.1.1 pycparser==3.12 flask==3.1.3 flask-cors==6.0.5 itsdangerous==2.2.0 blinker==1.9.0
)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
    -d .whl "${WHEELS[@]}"
echo "$(ls .whl/*.whl | wc -l) wheels, $(du -sm .whl | cut -f1) MiB in .whl/"
