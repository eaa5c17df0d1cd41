"""The built wheel holds the library and nothing of the development tooling."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Development tooling that lives in tests/, benchmarks/ and tools/ and must never ship.
DEV_ONLY = ("tests/", "benchmarks/", "support/", "authors_loop", "reference_loop", "tune_triton", "tune_gpu",
            "compile_check", "demo_sweep", "learner_sweep", "tiny_models", "conftest", "learner_step", "import_contracts")


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "FREEZEGUARD_SKIP_BUILD": "1"}  # the package layout, not the compiler, is under test
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("freezeguard-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_wheel_has_every_layer_and_the_raw_kernels(wheel_files):
    for path in ("freezeguard/__init__.py", "freezeguard/backends/__init__.py", "freezeguard/ops/__init__.py",
                 "freezeguard/core/mask.py", "freezeguard/core/optim/adamw.py", "freezeguard/optim/__init__.py",
                 "freezeguard/integrations/diffusers/loss.py", "freezeguard/apps/learn/learner.py",
                 "freezeguard/cli/__init__.py", "freezeguard/kernels/adamw.py", "freezeguard/_csrc/cpu/inner_loops.cpp"):
        assert path in wheel_files, path


def test_wheel_ships_no_development_tooling(wheel_files):
    leaked = [f for f in wheel_files if any(mark in f for mark in DEV_ONLY)]
    assert not leaked, leaked
    # Only the freezeguard package (and the wheel's metadata) at the top: no stray top-level `kernels`.
    tops = {f.split("/", 1)[0] for f in wheel_files}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"freezeguard"}, tops
