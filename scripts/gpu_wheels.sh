#!/usr/bin/env bash
# Download, on a machine with the package index, the wheels scripts/gpu_bench.sh installs on the
# GPU machine (which has python3 3.12 with torch, triton, transformers, accelerate, peft, pytest,
# numpy, pillow, safetensors and huggingface_hub, but not diffusers, and no network; see
# /work/.library/device/KINDS.md). Into .whl/ (ignored by git; ~6.5 MB), carried with `carry: [".whl"]`.
#   bash scripts/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12, the GPU machine's
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-3.12}"
PY="${PYTHON:-python3}"
mkdir -p .whl
# diffusers and the two requirements of it that the GPU image lacks (checked against its METADATA:
# importlib_metadata, filelock, huggingface-hub>=1.32, numpy, regex, requests, safetensors>=0.8,
# Pillow, zipp, lazy-importer; the image has all but importlib_metadata and lazy-importer).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "diffusers==0.42.1" "importlib_metadata==10.2.0" "lazy-importer==0.1.0" "setuptools==84.2.1"
ls -la .whl
