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

# name -> (module, attribute or None for the module itself); loaded on first access, which keeps
# `import freezeguard` light. Functions live in modules of other names (guard in enforce.py,
# verify in audit.py) so that importing a submodule never shadows a function on the package.
_LAZY = {
    "optim": ("freezeguard.optim", None),
    "guard": ("freezeguard.enforce", "guard"),
    "wrap": ("freezeguard.enforce", "wrap"),
    "unwrap": ("freezeguard.enforce", "unwrap"),
    "lean_frozen_convs_": ("freezeguard.lean_convs", "lean_frozen_convs_"),
    "verify": ("freezeguard.audit", "verify"),
    "VerifyReport": ("freezeguard.audit", "VerifyReport"),
    "MaskLearner": ("freezeguard.learner", "MaskLearner"),
    "diffusion": ("freezeguard.diffusion", None),
    "evaluate": ("freezeguard.evaluate", None),
}


def __getattr__(name: str):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'freezeguard' has no attribute {name!r}")


__all__ = ["__version__", "available_backends", "ops", "FreezeMask", "model_fingerprint", *_LAZY]
