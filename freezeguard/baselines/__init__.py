"""``freezeguard.baselines``: the public name of the baselines (``freezeguard.apps.baselines``).

``import freezeguard.baselines`` and ``fg.baselines`` are the same module.

Example:
    >>> import freezeguard.baselines
    >>> import freezeguard as fg
    >>> fg.baselines is freezeguard.baselines and "uce_edit" in fg.baselines.__all__
    True
"""
from __future__ import annotations

import importlib

from freezeguard.apps.baselines import *  # noqa: F403  (the alias re-exports the whole surface)
from freezeguard.apps.baselines import __all__ as __all__

_SUBMODULES = ("ablation", "harness", "imma", "uce", "udp")


def __getattr__(name: str):
    # fg.baselines.harness and friends, without importing them all up front
    if name in _SUBMODULES:
        return importlib.import_module(f"freezeguard.apps.baselines.{name}")
    raise AttributeError(f"module 'freezeguard.baselines' has no attribute {name!r}")
