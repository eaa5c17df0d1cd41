#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite on CPU (Triton kernels under TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
# The house first (docs/DESIGN.md section 2): lint, then the layer contract (no upward import, no circle).
ruff check .
lint-imports
python -m pytest tests -q -p no:cacheprovider "$@"
# Every docstring example of the package runs (the kernels' run in tests/test_doctests.py).
python -m pytest --doctest-modules freezeguard -q -p no:cacheprovider
