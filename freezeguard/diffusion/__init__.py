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

_SUBMODULES = ("data", "judge", "layouts", "loss", "models", "pipeline", "toy")


def __getattr__(name: str):
    # fg.diffusion.toy and friends keep working without importing them all up front.
    if name in _SUBMODULES:
        return importlib.import_module(f"freezeguard.integrations.diffusers.{name}")
    raise AttributeError(f"module 'freezeguard.diffusion' has no attribute {name!r}")
