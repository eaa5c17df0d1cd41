"""Per-call bookkeeping of the fused ops and the optimizer, natively when the C++ extension is here.

Validating a 686-tensor list in Python reads half a dozen attributes of every tensor of every
list (~1.5 ms a call), and bumping 686 step counters through the dispatcher costs ~0.7 ms; a
fused H100 AdamW step of an SD-1.5 UNet takes 3-12 ms. The native versions (``csrc/cpu/list_checks.cpp``)
do the same in well under 0.2 ms. They are shortcuts only: the rules and every error message stay
in Python (``freezeguard.ops``), which runs whenever the shortcut is missing or says no.

The extension is used only when it is already loaded or installed prebuilt; nothing here starts a
JIT build (``FREEZEGUARD_SKIP_BUILD=1`` installs simply take the Python path).

Example:
    >>> import torch
    >>> from freezeguard.ops import bookkeeping
    >>> bookkeeping.fast_check([[torch.ones(2)], [torch.zeros(2)]]) in (None, (True, True))
    True
"""
from __future__ import annotations

from typing import Sequence

import torch

from freezeguard.backends import _build

Tensors = Sequence[torch.Tensor]


def _native():
    return _build.loaded_or_prebuilt("cpu")


def fast_check(lists: Sequence[Tensors]) -> tuple[bool, bool] | None:
    """(ok, all_contiguous) under ``freezeguard.ops``' list rules, or None when there is no native check.

    ``ok`` False means "run the Python checks": they raise the error that names the tensor.
    """
    native = _native()
    if native is None:
        return None
    try:
        return native.check_tensor_lists([ts if isinstance(ts, list) else list(ts) for ts in lists])
    except (TypeError, RuntimeError):  # e.g. a non-tensor in a list: the Python checks say which
        return False, False


def read_steps(counters: Sequence[torch.Tensor]) -> list[float]:
    """The values of float32 CPU scalar tensors (``fg.optim.AdamW``'s ``state["step"]``)."""
    native = _native()
    if native is not None:
        try:
            return native.read_step_counters(list(counters))
        except (TypeError, RuntimeError):  # a counter that is not a float32 CPU scalar
            pass
    return [c.item() for c in counters]


def add_to_steps_(counters: Sequence[torch.Tensor], value: float) -> None:
    """``counters[i] += value`` for every counter, in place."""
    native = _native()
    if native is not None:
        try:
            native.add_to_step_counters_(list(counters), float(value))
            return
        except (TypeError, RuntimeError):  # checked before any write, so nothing was half-applied
            pass
    torch._foreach_add_(list(counters), value)
