"""One registry for every backend of the fused ops.

A backend is a module-like object exposing the four ops with the reference's signatures
(see ``reference.py``) plus ``availability()`` and ``supports(device)``, each returning
``(ok, reason)``. Backends load lazily: ``import freezeguard`` never compiles anything.

Choosing: ``backend="auto"`` (or ``FREEZEGUARD_BACKEND`` unset) picks the first backend in
``AUTO_ORDER[device.type]`` that is available and supports the tensors' device. Naming a
backend (argument or ``FREEZEGUARD_BACKEND``) forces it, and an error says why it cannot run.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

BACKEND_NAMES = ("torch", "cpp", "triton", "cuda")
ENV_VAR = "FREEZEGUARD_BACKEND"

# Preference order for "auto", fastest first. On CUDA the order between the CUDA and Triton
# kernels comes from measurement (benchmarks/RESULTS.md); the reference is always last.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpp", "torch"),
    # cuda before triton: through fg.ops on an H100 the CUDA kernels were as fast or faster in
    # most rows of benchmarks/RESULTS.md (2026-11-23).
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


_cache: dict[str, object] = {}


def get_backend(name: str):
    """The backend object called ``name`` (not checked for availability)."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(('auto',) + BACKEND_NAMES)}")
    if name not in _cache:
        _cache[name] = importlib.import_module(_MODULES[name])
    return _cache[name]


def status(name: str) -> BackendStatus:
    """Whether backend ``name`` can run on this machine, and why (not)."""
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


def resolve(backend: str | None, device: torch.device):
    """The backend object to run an op on ``device``: forced by name, or the best available."""
    name = backend or "auto"
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
    if name != "auto":
        be = get_backend(name)
        st = status(name)
        if not st.available:
            raise BackendUnavailable(f"freezeguard backend {name!r} is unavailable: {st.reason}")
        ok, why = be.supports(device)
        if not ok:
            raise BackendUnavailable(f"freezeguard backend {name!r} cannot run on {device}: {why}")
        return be
    for candidate in AUTO_ORDER.get(device.type, ("torch",)):
        if status(candidate).available and get_backend(candidate).supports(device)[0]:
            return get_backend(candidate)
    return get_backend("torch")


def clear_cache() -> None:
    """Forget loaded backends (tests use it after changing the environment)."""
    _cache.clear()


__all__ = ["BACKEND_NAMES", "AUTO_ORDER", "BackendUnavailable", "BackendStatus", "available_backends",
           "get_backend", "resolve", "status", "clear_cache"]
