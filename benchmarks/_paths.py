"""Puts ``tests/`` on ``sys.path`` so benchmark scripts share the test fixtures (``support``).

The authors' per-tensor loop and the tiny-model builders are development tooling: they live in
``tests/support`` and never ship in the wheel. Import this module first (``import _paths``) in a
script that is run directly as ``python benchmarks/<script>.py``.
"""
import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parents[1] / "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
