"""The input rules of every fused op, checked once per call, with errors that name the tensor.

Lists of one op have one length; tensor i of every list has tensor i's shape and dtype; every
tensor is a dense, plain (not a subclass), floating tensor of a supported dtype on one device.
Per-tensor scalars are fp32 tensors [S] on that device. Kernels then get contiguous tensors
(``Contiguous`` copies rare strided views in and back out).

Example:
    >>> import torch
    >>> from freezeguard.ops.validation import validate
    >>> validate("demo", {"a": [torch.ones(2)], "b": [torch.zeros(2)]})
    (1, True)
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from freezeguard.backends.record import DTYPES_IN_ORDER
from freezeguard.ops import native_shortcuts

SUPPORTED_DTYPES = DTYPES_IN_ORDER  # the ops take exactly the reference's dtypes
Tensors = Sequence[torch.Tensor]


def check_lists(op: str, lists: Mapping[str, Tensors]) -> int:
    """Same lengths, shapes, device; floating dense tensors; a clear error otherwise."""
    names = list(lists)
    n = len(lists[names[0]])
    for k in names[1:]:
        if len(lists[k]) != n:
            raise ValueError(f"{op}: list lengths differ: "
                             + ", ".join(f"{name}={len(lists[name])}" for name in names))
    device = None
    for k in names:
        for i, t in enumerate(lists[k]):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {k}[{i}] is a {type(t).__name__}, not a torch.Tensor")
            if t.layout != torch.strided:
                raise TypeError(f"{op}: {k}[{i}] is a {t.layout} tensor; only dense (strided) tensors are supported")
            if is_traceable_wrapper_subclass(t):
                raise TypeError(f"{op}: {k}[{i}] is a {type(t).__name__} (a tensor subclass); the fused kernels "
                                "take plain tensors: pass local shards (DTensor.to_local()) or use fg.optim.AdamW, "
                                "which does")
            if t.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{op}: {k}[{i}] has dtype {t.dtype}; supported: fp32, bf16, fp16")
            if device is None:
                device = t.device
            elif t.device != device:
                raise ValueError(f"{op}: {k}[{i}] is on {t.device} but other tensors are on {device}")
    first = lists[names[0]]
    for k in names[1:]:
        for i, (a, b) in enumerate(zip(first, lists[k], strict=True)):
            if a.shape != b.shape:
                raise ValueError(f"{op}: {names[0]}[{i}] has shape {tuple(a.shape)} "
                                 f"but {k}[{i}] has shape {tuple(b.shape)}")
    return n


def check_same_dtype(op: str, lists: Mapping[str, Tensors]) -> None:
    first = next(iter(lists))
    ref = lists[first]
    for k, ts in lists.items():
        for i, (a, b) in enumerate(zip(ref, ts, strict=True)):
            if a.dtype != b.dtype:
                raise TypeError(f"{op}: {k}[{i}] is {b.dtype} but {first}[{i}] is {a.dtype}")


def validate(op: str, lists: Mapping[str, Tensors]) -> tuple[int, bool]:
    """(list length, whether every tensor is contiguous) after every check of this module.

    The native shortcut (``native_shortcuts.fast_check``) answers for valid input; anything it
    refuses goes through the Python checks above, which raise the error naming the tensor.
    """
    fast = native_shortcuts.fast_check(list(lists.values()))
    if fast is not None and fast[0]:
        return len(next(iter(lists.values()))), fast[1]
    n = check_lists(op, lists)
    check_same_dtype(op, lists)
    return n, all(t.is_contiguous() for ts in lists.values() for t in ts)


def per_tensor_scalars(op: str, name: str, x: torch.Tensor | Sequence[float], n: int,
                       device: torch.device) -> torch.Tensor:
    """``x`` as a contiguous fp32 tensor [n] on ``device``, or an error naming ``name``."""
    t = torch.as_tensor(x, dtype=torch.float32)
    if t.dim() != 1 or t.numel() != n:
        raise ValueError(f"{op}: {name} must hold one value per tensor ({n}), got shape {tuple(t.shape)}")
    if t.device != device:
        t = t.to(device)
    return t.contiguous()


def device_of(*lists: Tensors) -> torch.device:
    for ts in lists:
        if len(ts):
            return ts[0].device
    return torch.device("cpu")


class Contiguous:
    """Give kernels contiguous tensors; copy results back into non-contiguous outputs.

    Parameters and their states are contiguous in practice; this keeps rare strided views
    correct without asking every backend to handle strides.
    """

    def __init__(self, inputs: Mapping[str, Tensors], outputs: Mapping[str, Tensors], *,
                 all_contiguous: bool = False):
        self._writeback: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.lists: dict[str, list[torch.Tensor]] = {}
        if all_contiguous:  # the common case, known from validate: nothing to copy or check
            self.lists = {k: list(ts) for k, ts in (*inputs.items(), *outputs.items())}
            return
        for k, ts in inputs.items():
            self.lists[k] = [t if t.is_contiguous() else t.contiguous() for t in ts]
        for k, ts in outputs.items():
            out = []
            for t in ts:
                if t.is_contiguous():
                    out.append(t)
                else:
                    c = t.contiguous()
                    self._writeback.append((t, c))
                    out.append(c)
            self.lists[k] = out

    def write_back(self) -> None:
        for original, compact in self._writeback:
            original.copy_(compact)


__all__ = ["SUPPORTED_DTYPES", "Contiguous", "check_lists", "check_same_dtype", "device_of", "per_tensor_scalars",
           "validate"]
