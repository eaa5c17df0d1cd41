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

from freezeguard import ops
from freezeguard._version import __version__
from freezeguard.backends import available_backends
from freezeguard.core.fingerprint import model_fingerprint
from freezeguard.core.mask import FreezeMask

# name -> (module, attribute or None for the module itself); loaded on first access, which keeps
# `import freezeguard` light. The package tree shows the layers (docs/DESIGN.md section 2): backends ->
# ops -> core (mask, optim, guard, verify) -> integrations -> apps -> cli; this module is only the
# public face over them, and no module inside the layers imports it for a name.
_LAZY = {
    "optim": ("freezeguard.optim", None),
    "guard": ("freezeguard.core.guard", "guard"),
    "wrap": ("freezeguard.core.guard", "wrap"),
    "unwrap": ("freezeguard.core.guard", "unwrap"),
    "lean_frozen_convs_": ("freezeguard.core.lean_convs", "lean_frozen_convs_"),
    "verify": ("freezeguard.core.verify", "verify"),
    "VerifyReport": ("freezeguard.core.verify_report", "VerifyReport"),
    "MaskLearner": ("freezeguard.apps.learn.learner", "MaskLearner"),
    "diffusion": ("freezeguard.diffusion", None),
    "evaluate": ("freezeguard.apps.evaluate", None),
    "baselines": ("freezeguard.baselines", None),
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
