#!/usr/bin/env bash
# Create .venv (CPU torch pinned: an unpinned torch may pull a multi-GB CUDA build) and install
# freezeguard with its C++ extension built for real. Idempotent, and a second run is quick: when
# nothing the install depends on changed (this script, pyproject.toml, setup.py, csrc/) and the
# installed pieces still import, it stops after a few checks instead of reinstalling and rebuilding.
#   bash scripts/setup.sh           set up, or say "up to date"
#   bash scripts/setup.sh --check   only check: exit 0 when up to date, 1 when a setup run is needed
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.freezeguard-setup-stamp

inputs_hash() {
    { cat scripts/setup.sh pyproject.toml setup.py; find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' \
        -o -name '*.py' \) | LC_ALL=C sort | xargs cat; } | sha256sum | cut -d' ' -f1
}

up_to_date() {
    [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(inputs_hash)" ] || return 1
    [ -x .venv/bin/ruff ] && [ -x .venv/bin/lint-imports ] || return 1
    # the pinned torch, the deps, and freezeguard with its compiled extension, all importable
    .venv/bin/python - <<'PY' >/dev/null 2>&1 || return 1
import importlib.metadata as md
import torch, diffusers, transformers, accelerate, peft, safetensors, pytest, lycoris, optimum.quanto  # noqa: F401
import freezeguard, freezeguard._C  # noqa: F401
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert md.version("freezeguard") == freezeguard.__version__
PY
}

if [ "${1:-}" = "--check" ]; then
    if up_to_date; then echo "freezeguard setup: up to date"; exit 0; fi
    echo "freezeguard setup: a setup run is needed"; exit 1
fi
if up_to_date; then
    echo "freezeguard setup: .venv is up to date (nothing to install or rebuild)"
    exit 0
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
rm -f "$STAMP"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0" "triton==3.8.0" ninja "setuptools>=77" wheel pybind11
python -m pip install -q "diffusers>=0.30" "transformers>=4.40" "accelerate>=0.30" "peft>=0.10" \
    "lycoris-lora==4.1.3" "optimum-quanto==0.2.7" safetensors numpy tqdm pillow matplotlib pytest pytest-benchmark ruff import-linter
# --no-build-isolation: the extension is compiled against the torch installed above.
python -m pip install -q --no-build-isolation -e .
inputs_hash > "$STAMP"
