#!/usr/bin/env bash
# Create .venv and install freezeguard with its C++ extension built for real, every dependency at
# the version in scripts/constraints.txt (the versions the suite last passed with; CPU torch pinned:
# an unpinned torch may pull a multi-GB CUDA build). Idempotent, and a second run is quick: when
# nothing the install depends on changed (this script, the constraints, pyproject.toml, setup.py,
# csrc/), the installed versions are the pinned ones and the pieces still import, it stops after a
# few checks instead of reinstalling and rebuilding.
#   bash scripts/setup.sh           set up, or say "up to date"
#   bash scripts/setup.sh --check   only check: exit 0 when up to date, 1 when a setup run is needed
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.freezeguard-setup-stamp
PINS=scripts/constraints.txt

inputs_hash() {
    { cat scripts/setup.sh "$PINS" pyproject.toml setup.py; find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' \
        -o -name '*.py' \) | LC_ALL=C sort | xargs cat; } | sha256sum | cut -d' ' -f1
}

up_to_date() {
    [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(inputs_hash)" ] || return 1
    [ -x .venv/bin/ruff ] && [ -x .venv/bin/lint-imports ] || return 1
    # every pinned version installed, the deps and freezeguard with its compiled extension importable
    .venv/bin/python - "$PINS" <<'PY' >/dev/null 2>&1 || return 1
import importlib.metadata as md
import sys
import torch, diffusers, transformers, accelerate, peft, safetensors, pytest, lycoris, optimum.quanto  # noqa: F401
import freezeguard, freezeguard._C  # noqa: F401
for line in open(sys.argv[1]):
    name, sep, version = line.split("#")[0].strip().partition("==")
    try:  # a constraint caps a version; it installs nothing (a pin the setup never installs is fine)
        installed = md.version(name) if sep else None
    except md.PackageNotFoundError:
        continue
    if sep:  # "torch==2.13.0" also matches the installed 2.13.0+cpu
        assert installed.split("+")[0] == version, (name, installed, version)
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
python -m pip install -q -c "$PINS" --upgrade pip
python -m pip install -q -c "$PINS" torch triton ninja setuptools wheel pybind11
python -m pip install -q -c "$PINS" diffusers transformers accelerate peft safetensors numpy tqdm pillow \
    matplotlib pytest pytest-benchmark ruff import-linter lycoris-lora optimum-quanto
# --no-build-isolation: the extension is compiled against the torch installed above.
python -m pip install -q -c "$PINS" --no-build-isolation -e .
inputs_hash > "$STAMP"
