"""freezeguard: learn which tensors of a diffusion model to freeze, and enforce it fast.

Example:
    >>> import torch, freezeguard as fg
    >>> model = torch.nn.Linear(4, 4)
    >>> mask = fg.FreezeMask.from_names(model, ["bias"])
    >>> opt = fg.optim.AdamW(model.named_parameters(), lr=1e-3, mask=mask)

Importing this package compiles nothing; heavy parts (diffusers glue, the learner, the CLI
commands) load on first attribute access.
"""
from __future__ import annotations

import importlib

from . import ops
from ._version import __version__
from .backends import available_backends
from .fingerprint import model_fingerprint
from .mask import FreezeMask

# name -> module that defines it; loaded on first access (keeps `import freezeguard` light).
_LAZY = {
    "optim": "freezeguard.optim",
    "guard": "freezeguard.guard",
    "wrap": "freezeguard.guard",
    "verify": "freezeguard.verify",
    "VerifyReport": "freezeguard.verify",
    "MaskLearner": "freezeguard.learner",
    "diffusion": "freezeguard.diffusion",
    "evaluate": "freezeguard.evaluate",
}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__.endswith("." + name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'freezeguard' has no attribute {name!r}")


__all__ = ["__version__", "available_backends", "ops", "FreezeMask", "model_fingerprint", *_LAZY]
