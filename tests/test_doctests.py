"""The examples in the docstrings run: every module of freezeguard and of the Triton kernels.

scripts/test.sh runs ``pytest --doctest-modules freezeguard`` as well; the kernels are checked
here, by their installed name ``freezeguard.kernels.*``, because pytest names a module by its
folder and kernels/triton/ would be collected as a package ``triton``, hiding the real one.
"""
from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _kernel_modules() -> list[str]:
    return [f"freezeguard.kernels.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "kernels" / "triton")])]


@pytest.mark.parametrize("name", _kernel_modules())
def test_kernel_docstring_examples_run(name, monkeypatch):
    pytest.importorskip("triton.language")
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
    written = Path(module.__file__).read_text().count(">>> ")
    assert result.attempted >= written, f"{name}: {written} examples written, {result.attempted} run"


def test_ci_runs_the_package_doctests():
    script = (ROOT / "scripts" / "test.sh").read_text()
    assert "--doctest-modules freezeguard" in script
