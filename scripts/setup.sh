#!/usr/bin/env bash
# Create .venv (CPU torch pinned: an unpinned torch may pull a multi-GB CUDA build) and install
# freezeguard with its C++ extension built for real. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0" "triton==3.8.0" ninja setuptools wheel pybind11
python -m pip install -q "diffusers>=0.30" "transformers>=4.40" "accelerate>=0.30" "peft>=0.10" \
    safetensors numpy tqdm pillow matplotlib pytest pytest-benchmark ruff import-linter
# --no-build-isolation: the extension is compiled against the torch installed above.
python -m pip install -q --no-build-isolation -e .
