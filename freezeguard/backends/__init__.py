"""One registry for every backend of the fused ops.

A backend is a module whose ``BACKEND`` is a ``BackendRecord`` (``record.py``): its name, devices,
dtypes, kernels keyed by declared op (``opspecs.py``), ``availability()`` and ``supports(device)``
(both never compile), ``prepare()`` (may load or JIT-build once) and optional AdamW fast paths.
The record checks its kernels against the ops' declarations when it is built. Backends load
lazily: ``import freezeguard`` never compiles anything.

Choosing: ``backend="auto"`` (or ``FREEZEGUARD_BACKEND`` unset) picks the first backend in
``AUTO_ORDER[device.type]`` that is available, supports the tensors' device and dtypes and
implements the op. Naming a backend (argument or ``FREEZEGUARD_BACKEND``) forces it, and an
error says why it cannot run.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Iterable

import torch

from freezeguard.backends.record import ALL_DTYPES, BackendRecord

BACKEND_NAMES = ("torch", "cpp", "triton", "cuda")
ENV_VAR = "FREEZEGUARD_BACKEND"

# Preference order for "auto", fastest first. On CUDA the order between the CUDA and Triton
# kernels comes from measurement (benchmarks/RESULTS.md); the reference is always last.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpp", "torch"),
    # cuda before triton: measured, see benchmarks/RESULTS.md ("auto on CUDA").
    "cuda": ("cuda", "triton", "torch"),
}

_MODULES = {
    "torch": "freezeguard.backends.torch_backend",
    "cpp": "freezeguard.backends.cpp_backend",
    "triton": "freezeguard.backends.triton_backend",
    "cuda": "freezeguard.backends.cuda_backend",
}


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run here; the message says why."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str


_cache: dict[str, BackendRecord] = {}


def get_backend(name: str) -> BackendRecord:
    """The record of the backend called ``name`` (not checked for availability)."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(('auto',) + BACKEND_NAMES)}")
    if name not in _cache:
        record = getattr(importlib.import_module(_MODULES[name]), "BACKEND", None)
        if not isinstance(record, BackendRecord) or record.name != name:
            raise TypeError(f"{_MODULES[name]}.BACKEND is not the BackendRecord of backend {name!r}")
        _cache[name] = record
    return _cache[name]


def status(name: str) -> BackendStatus:
    """Whether backend ``name`` can run on this machine, and why (not). Never compiles."""
    try:
        ok, reason = get_backend(name).availability()
    except Exception as exc:  # a broken install must not break `freezeguard info`
        ok, reason = False, f"failed to load: {type(exc).__name__}: {exc}"
    return BackendStatus(name, ok, reason)


def available_backends() -> list[str]:
    """Names of the backends that can run here, e.g. ``["torch", "cpp", "triton"]``.

    Example:
        >>> import freezeguard as fg
        >>> "torch" in fg.available_backends()
        True
    """
    return [n for n in BACKEND_NAMES if status(n).available]


def _why_not(name: str, device: torch.device, op: str | None, dtypes: Iterable[torch.dtype] | None) -> str | None:
    """Why backend ``name`` cannot run ``op`` on these tensors, or None when it can (may prepare it)."""
    be = get_backend(name)
    st = status(name)
    if not st.available:
        return f"is unavailable: {st.reason}"
    ok, why = be.supports(device)
    if not ok:
        return f"cannot run on {device}: {why}"
    if not be.implements(op):
        return f"has no kernel for {op}"
    if dtypes is not None:
        missing = sorted(str(d).removeprefix("torch.") for d in set(dtypes) - be.dtypes)
        if missing:
            return f"does not support dtype {', '.join(missing)} (it takes {sorted(str(d) for d in be.dtypes)})"
    ok, why = be.prepare()  # cheap once done: backends remember what they loaded
    if not ok:
        return f"is unavailable: {why}"
    return None


def resolve(backend: str | None, device: torch.device, *, op: str | None = None,
            tensors: Iterable[torch.Tensor] | None = None) -> BackendRecord:
    """The backend object to run ``op`` on ``device``: forced by name, or the best available.

    ``tensors`` (any list of the op's) lets the registry enforce the backends' dtypes; their
    dtypes are only read when some candidate supports fewer than the reference.
    """
    name = backend or "auto"
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
    dtypes = None
    if tensors is not None:
        candidates = [name] if name != "auto" else AUTO_ORDER.get(device.type, ("torch",))
        if any(get_backend(c).dtypes != ALL_DTYPES for c in candidates):
            dtypes = {t.dtype for t in tensors}
    if name != "auto":
        why = _why_not(name, device, op, dtypes)
        if why is not None:
            raise BackendUnavailable(f"freezeguard backend {name!r} {why}")
        return get_backend(name)
    for candidate in AUTO_ORDER.get(device.type, ("torch",)):
        if _why_not(candidate, device, op, dtypes) is None:
            return get_backend(candidate)
    return get_backend("torch")


__all__ = ["BACKEND_NAMES", "AUTO_ORDER", "BackendRecord", "BackendUnavailable", "BackendStatus",
           "available_backends", "get_backend", "resolve", "status"]
