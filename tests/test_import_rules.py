"""The import rules are import-linter contracts in pyproject.toml; ``lint-imports`` keeps them all.

Two of them are contract types of our own (``tools/import_contracts.py``): the layers never import
the package ``freezeguard`` itself, and no two sibling modules reach each other, both counting
imports made only for type checking. The second test applies exactly those pyproject declarations
to a small package that breaks both, so a contract that stopped checking would fail here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from importlinter.api import read_configuration

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("cli", "apps", "integrations", "core", "ops", "backends")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    # As CI runs it (scripts/test.sh): from the folder of the config, which goes first on sys.path;
    # the repository root joins it so that a config elsewhere still finds tools.import_contracts.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    code = "from importlinter.cli import lint_imports_command; lint_imports_command(prog_name='lint-imports')"
    return subprocess.run([sys.executable, "-c", code, "--no-logo", "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_lint_imports_keeps_every_contract():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Contracts: 5 kept, 0 broken." in proc.stdout, proc.stdout[-3000:]


def _toml_table(header: str, table: dict) -> str:
    # import-linter reads every value as a string or a list of strings: their JSON is TOML as well.
    return "\n".join([header, *(f"{key} = {json.dumps(value)}" for key, value in table.items())]) + "\n"


def test_our_contract_types_break_on_a_package_that_breaks_them(tmp_path):
    configuration = read_configuration(str(ROOT / "pyproject.toml"))
    settings = configuration["session_options"]
    ours = {entry.split(":")[0] for entry in settings["contract_types"]}
    contracts = [c for c in configuration["contracts_options"] if c["type"] in ours]
    assert len(contracts) == 2, contracts

    def renamed(value):  # the pyproject declarations, aimed at badpkg instead of freezeguard
        return [renamed(v) for v in value] if isinstance(value, list) else value.replace("freezeguard", "badpkg")

    config = _toml_table("[tool.importlinter]", {key: renamed(v) if key == "root_packages" else v
                                                for key, v in settings.items()})
    config += "".join(_toml_table("[[tool.importlinter.contracts]]", {k: renamed(v) for k, v in c.items()})
                      for c in contracts)
    (tmp_path / "pyproject.toml").write_text(config)

    pkg = tmp_path / "badpkg"
    for layer in LAYERS:
        (pkg / layer).mkdir(parents=True)
        (pkg / layer / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from badpkg import core\n")
    (pkg / "core" / "root_user.py").write_text("import badpkg\n")
    # a circle that only type checking sees: a -> b at run time, b -> a under TYPE_CHECKING
    (pkg / "ops" / "a.py").write_text("from badpkg.ops import b\n")
    (pkg / "ops" / "b.py").write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                                      "    from badpkg.ops import a\n")

    proc = _lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = " ".join(proc.stdout.split())  # rich wraps long lines
    assert "Contracts: 0 kept, 2 broken." in out, out[-3000:]
    assert "badpkg.core.root_user is not allowed to import badpkg itself (l.1)" in out, out[-3000:]
    assert "badpkg.ops.a and badpkg.ops.b import each other" in out, out[-3000:]
