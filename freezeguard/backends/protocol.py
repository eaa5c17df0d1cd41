"""The contract every backend of the fused ops meets (``freezeguard.backends`` checks it).

A backend is a module (or any object) with these members. The registry reads ``name`` and
``dtypes`` (a backend is only chosen for tensors of dtypes it lists), asks ``availability()``
and ``supports(device)`` (both answer from what is already known: they never compile), and
calls ``prepare()`` once before the backend's first op (where a native extension may be loaded
or JIT-built; a failure there makes ``auto`` fall back and a forced backend say why).

Ops are optional per backend: the registry only picks a backend for an op it implements
(``OPS`` lists them; the ``torch`` backend implements all of them). Every op receives inputs
that ``freezeguard.ops`` already validated and made contiguous; ``reference.py`` states the
math of each.

Example:
    >>> from freezeguard.backends import get_backend
    >>> from freezeguard.backends.protocol import Backend
    >>> isinstance(get_backend("torch"), Backend)
    True
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

Tensors = Sequence[torch.Tensor]

# The storage dtypes of the reference; a backend lists the ones it takes in ``dtypes``.
ALL_DTYPES = frozenset((torch.float32, torch.bfloat16, torch.float16))

# The fused ops a backend may implement, by the name of its function.
OPS = ("masked_adamw_", "masked_adamw_capturable_", "segment_dot", "mask_shift_", "user_update_", "user_adamw_")


@runtime_checkable
class Backend(Protocol):
    name: str
    dtypes: frozenset[torch.dtype]

    def availability(self) -> tuple[bool, str]:
        """(ok, reason): whether it can run on this machine; never compiles."""

    def supports(self, device: torch.device) -> tuple[bool, str]:
        """(ok, reason): whether it takes tensors on ``device``; never compiles."""

    def prepare(self) -> tuple[bool, str]:
        """Load what the kernels need (may JIT-build once); (ok, reason)."""


def implements(backend: object, op: str | None) -> bool:
    return op is None or callable(getattr(backend, op, None))


__all__ = ["ALL_DTYPES", "Backend", "OPS", "implements"]
