"""PNGs are optional everywhere: whether matplotlib can be imported, asked one way.

``freezeguard learn``, ``demo``, ``evaluate`` and ``bench`` say up front when their PNGs will be
missing (the masks, tables and JSON never depend on them).

Example:
    >>> isinstance(plots_available(), bool)
    True
"""
from __future__ import annotations

import importlib.util

__all__ = ["plots_available"]


def plots_available() -> bool:
    """True when matplotlib is installed (and not blocked: ``sys.modules["matplotlib"] = None``)."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        return False
