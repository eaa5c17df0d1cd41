"""scripts/setup.sh installs the tested versions of scripts/constraints.txt, and knows when they moved.

CI and a fresh clone run setup.sh: an unpinned install once pulled a transformers newer than the
suite had seen. Every package setup.sh installs is pinned, every pip call of setup.sh passes the
constraints, and ``setup.sh --check`` compares the installed versions with the pins.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP = (ROOT / "scripts" / "setup.sh").read_text()
PINS = dict(line.split("#")[0].strip().split("==", 1)
            for line in (ROOT / "scripts" / "constraints.txt").read_text().splitlines() if "==" in line.split("#")[0])


def _pip_calls() -> list[list[str]]:
    joined = SETUP.replace("\\\n", " ")
    return [shlex.split(line.split("pip install", 1)[1]) for line in joined.splitlines()
            if "pip install" in line and not line.lstrip().startswith("#")]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_pip_call_of_setup_passes_the_constraints():
    calls = _pip_calls()
    assert len(calls) >= 3
    for args in calls:
        assert "-c" in args and args[args.index("-c") + 1] == "$PINS", args
    assert 'PINS=scripts/constraints.txt' in SETUP


def test_every_package_setup_installs_has_an_exact_pin():
    pinned = {_normal(n) for n in PINS}
    named = [a for args in _pip_calls() for a in args if not a.startswith("-") and a not in ("$PINS", ".")]
    assert {"torch", "diffusers", "transformers", "peft"} <= {_normal(n) for n in named}
    for name in named:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", name), f"{name}: setup.sh names a bare package; the pin says which"
        assert _normal(name) in pinned, f"{name} has no pin in scripts/constraints.txt"
    # the dependencies of what setup installs are pinned too (a freeze, not a hand list)
    assert {"huggingface-hub", "tokenizers", "safetensors", "numpy"} <= pinned
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.]*", v) for v in PINS.values()), "no local labels (+cpu) in a pin"


def test_the_setup_stamp_and_the_check_cover_the_pins():
    # the stamp hashes the constraints (a new pin means a setup run), and --check compares versions
    assert re.search(r'cat scripts/setup.sh "\$PINS"', SETUP)
    assert ".venv/bin/python - \"$PINS\"" in SETUP and "md.version(name)" in SETUP
