#!/usr/bin/env bash
# Outside CI: does freezeguard still pass with the NEWEST releases of its dependencies? Builds a
# throwaway venv with every dependency upgraded past scripts/constraints.txt (torch excepted: the
# package index's newest torch is a multi-GB CUDA build; set TORCH=torch to try it anyway), installs
# freezeguard from this checkout (not editable: the tree's own freezeguard/_C*.so stays untouched),
# prints each version that differs from the pins, then runs the suite from the repo root with the
# installed package (PYTHONSAFEPATH=1: the root is not put on sys.path). Arguments replace `tests`
# as pytest's (test files, -k, -x...). VENV=path reuses a venv of an earlier run.
#   bash scripts/check_newest.sh                       the whole suite
#   bash scripts/check_newest.sh tests/test_peft.py    a part of it
# Green? Refresh scripts/constraints.txt from that venv (its header says how). Needs Python >= 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=scripts/constraints.txt
VENV=${VENV:-$(mktemp -d /tmp/freezeguard-newest.XXXXXX)/venv}
"${PYTHON:-python3}" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q --upgrade "${TORCH:-$(grep '^torch==' "$PINS")}" triton ninja setuptools wheel pybind11
python -m pip install -q --upgrade diffusers transformers accelerate peft safetensors numpy tqdm pillow \
    matplotlib pytest pytest-benchmark ruff import-linter
python -m pip install -q --no-build-isolation .
echo "newest releases against $PINS (pinned -> installed):"
python - "$PINS" <<'PY'
import importlib.metadata as md
import sys
for line in open(sys.argv[1]):
    name, sep, pinned = line.split("#")[0].strip().partition("==")
    if not sep:
        continue
    try:
        installed = md.version(name)
    except md.PackageNotFoundError:
        continue
    if installed.split("+")[0] != pinned:
        print(f"  {name}: {pinned} -> {installed}")
PY
export HF_HUB_OFFLINE=1 PYTHONSAFEPATH=1
if [ $# -gt 0 ]; then python -m pytest -q -p no:cacheprovider "$@"; else python -m pytest tests -q -p no:cacheprovider; fi
echo "freezeguard with the newest releases: suite passed (venv: $VENV)"
