"""``freezeguard.diffusion``: the public name of the diffusers integration (``freezeguard.integrations.diffusers``).

Example:
    >>> import freezeguard as fg
    >>> fg.diffusion.make_loss_fn          # doctest: +ELLIPSIS
    <function make_loss_fn at ...>
"""
from __future__ import annotations

import importlib

from freezeguard.integrations.diffusers import *  # noqa: F403  (the alias re-exports the whole surface)
from freezeguard.integrations.diffusers import __all__ as __all__

_SUBMODULES = ("bench_presets", "data", "judge", "loss", "models", "pipeline", "toy")
_RENAMED = {"layouts": "bench_presets"}   # former name -> the module's name now


def __getattr__(name: str):
    # fg.diffusion.toy and friends keep working without importing them all up front.
    if name in _RENAMED:
        import warnings
        warnings.warn(f"freezeguard.diffusion.{name} was renamed freezeguard.diffusion.{_RENAMED[name]}",
                      DeprecationWarning, stacklevel=2)
        name = _RENAMED[name]
    if name in _SUBMODULES:
        return importlib.import_module(f"freezeguard.integrations.diffusers.{name}")
    raise AttributeError(f"module 'freezeguard.diffusion' has no attribute {name!r}")
