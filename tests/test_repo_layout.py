"""The repository root is a safe place to run Python from.

Python puts the current folder first on ``sys.path`` (``python -c``, ``python -m pytest``,
``python -m freezeguard``). A regular package named ``kernels`` in the root once shadowed the
package-index ``kernels`` that transformers imports, and every diffusers model import failed there.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_in_root(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_top_level_kernels_folder_is_not_a_regular_package():
    assert (ROOT / "kernels" / "triton" / "adamw.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists()
    # Without site-packages (-S, -I: only the root and the standard library), `kernels` from the root
    # is at most a namespace portion: no file of ours runs, and transformers' check (namespace ->
    # not installed) ignores it.
    proc = _python_in_root("import sys; sys.path.insert(0, '.'); import importlib.util as u; "
                           "s = u.find_spec('kernels'); print(s.origin, list(s.submodule_search_locations))", "-I", "-S")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("None "), proc.stdout


def test_transformers_hub_kernels_and_diffusers_import_from_the_repo_root():
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    code = ("import importlib.util, transformers.integrations.hub_kernels as hub; "
            "from diffusers import UNet2DConditionModel; UNet2DConditionModel; "
            "import freezeguard.kernels.adamw as fk; "
            "spec = importlib.util.find_spec('kernels'); "
            "print(spec.origin or 'namespace'); print(fk.__file__)")
    proc = _python_in_root(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin, ours = proc.stdout.split()[-2:]
    assert not origin.startswith(str(ROOT / "kernels" / "__init__")), origin  # never our folder as `kernels`
    assert Path(ours).name == "adamw.py"
