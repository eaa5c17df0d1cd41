"""What a backend of the fused ops is: a validated record of what it declares it can do.

Each backend module (``torch_backend.py``, ``cpp_backend.py``, ...) builds one ``BackendRecord``
named ``BACKEND``; the registry (``freezeguard.backends``) reads only that record. Building it
checks the claims: every kernel is for a declared op (``opspecs.py``) and takes that op's
arguments, the dtypes and devices are ones the ops know, and the optional AdamW fast paths come
as a consistent set. A backend that claims what it does not implement fails at import, with
the reason, instead of at some later call.

The registry asks ``availability()`` and ``supports(device)`` (both answer from what is already
known: they never compile) and calls ``prepare()`` once before the first op (where a native
extension may be loaded or JIT-built; a failure there makes ``auto`` fall back and a forced
backend say why). Kernels receive inputs that ``freezeguard.ops`` already validated and made
contiguous; ``reference.py`` states the math of each.

Example:
    >>> from freezeguard.backends import get_backend
    >>> be = get_backend("torch")
    >>> be.implements("segment_dot"), sorted(be.devices)
    (True, ['cpu', 'cuda'])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from freezeguard.backends.opspecs import SPECS

# The storage dtypes of the reference; a backend lists the ones it takes in ``dtypes``.
DTYPES_IN_ORDER = (torch.float32, torch.bfloat16, torch.float16)
ALL_DTYPES = frozenset(DTYPES_IN_ORDER)
DEVICE_TYPES = frozenset(("cpu", "cuda"))


def _ready() -> tuple[bool, str]:
    return True, ""


@dataclass(frozen=True)
class AdamWFastPaths:
    """Optional shortcuts for the optimizer's AdamW step (``fg.ops.masked_adamw_step_``).

    ``native_step(params, grads, exp_avgs, exp_avg_sqs, step_counters, *, lr, beta1, beta2, eps,
    weight_decay) -> bool``: the whole step (checks, counters, update) in one call; False, having
    written nothing, for any input outside its contract.
    ``prepare_lists(params, exp_avgs, exp_avg_sqs, step_counters)`` -> a native handle or None, and
    ``prepared_step(handle, *, lr, beta1, beta2, eps, weight_decay, check_only) -> bool``: the same
    step over lists prepared once, each gradient read from its parameter's ``.grad``.
    """

    native_step: Callable[..., bool] | None = None
    prepare_lists: Callable[..., Any] | None = None
    prepared_step: Callable[..., bool] | None = None

    def __post_init__(self) -> None:
        if (self.prepare_lists is None) != (self.prepared_step is None):
            raise TypeError("AdamWFastPaths: prepare_lists and prepared_step come together")

    @property
    def capabilities(self) -> tuple[str, ...]:
        return tuple(n for n in ("native_step", "prepared_step") if getattr(self, n) is not None)


@dataclass(frozen=True)
class BackendRecord:
    """One backend: its name, where it runs, and its kernels keyed by op name."""

    name: str
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    kernels: Mapping[str, Callable[..., Any]]
    availability: Callable[[], tuple[bool, str]]
    supports_device: Callable[[torch.device], tuple[bool, str]] | None = None
    prepare: Callable[[], tuple[bool, str]] = _ready
    adamw_fast: AdamWFastPaths = field(default_factory=AdamWFastPaths)
    doc: str = ""

    def __post_init__(self) -> None:
        where = f"backend {self.name!r}"
        if not self.name.isidentifier():
            raise ValueError(f"{where}: the name must be an identifier")
        if not self.devices or not self.devices <= DEVICE_TYPES:
            raise ValueError(f"{where}: devices {sorted(self.devices)} must be a non-empty subset of "
                             f"{sorted(DEVICE_TYPES)}")
        if not self.dtypes or not self.dtypes <= ALL_DTYPES:
            raise ValueError(f"{where}: dtypes must be a non-empty subset of fp32, bf16, fp16")
        for op, kernel in self.kernels.items():
            spec = SPECS.get(op)
            if spec is None:
                raise TypeError(f"{where} has a kernel for {op!r}, which is not a declared op "
                                f"({', '.join(SPECS)})")
            why = spec.why_kernel_does_not_fit(kernel)
            if why is not None:
                raise TypeError(f"{where}: its {op} kernel does not fit the declaration: {why}")
        object.__setattr__(self, "kernels", MappingProxyType(dict(self.kernels)))

    def implements(self, op: str | None) -> bool:
        return op is None or op in self.kernels

    def supports(self, device: torch.device) -> tuple[bool, str]:
        """(ok, reason): whether it takes tensors on ``device``; never compiles."""
        device = torch.device(device)
        if device.type not in self.devices:
            where = " and ".join(d.upper() for d in sorted(self.devices))
            return False, f"the {self.name} backend runs on {where} tensors only, not {device.type}"
        return self.supports_device(device) if self.supports_device is not None else (True, "")


__all__ = ["ALL_DTYPES", "DTYPES_IN_ORDER", "DEVICE_TYPES", "AdamWFastPaths", "BackendRecord"]
