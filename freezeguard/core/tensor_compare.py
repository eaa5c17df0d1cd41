"""Is an uploaded tensor the released one? Bit for bit, or the release rounded where allowed.

"Unchanged" means the same bytes in the release's dtype: NaN equals NaN at the same bits, -0.0 is
not 0.0. A lossless upcast (fp16 release saved as fp32) keeps the value exactly and passes. A save
in lower precision passes only for the dtypes the caller allows, and then only when it equals the
release rounded to that dtype, or rounded twice (a bf16 run saved as fp16 holds fp16(bf16(x))).
Integers, bools, fp8 and tensor subclasses (quantized weights) cannot be shown equal: "cannot".

Example:
    >>> import torch
    >>> w = torch.tensor([0.1, 0.2])
    >>> compare(w, w.clone(), set())[0], compare(w, w + 1, set())[0]
    ('same', 'changed')
    >>> compare(w, w.half(), set())[0], compare(w, w.half(), parse_dtypes("fp16"))[0]
    ('cannot', 'same')
"""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["compare", "parse_dtypes", "LOWER_PRECISIONS", "SHORT_NAMES"]

#: dtypes a caller may allow a frozen tensor to be saved in (as the release rounded).
LOWER_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtypes(names: str | Iterable[str]) -> set[torch.dtype]:
    """``"fp16,bf16"`` (or a list of such strings) -> dtypes; ValueError on an unknown name.

    Example:
        >>> sorted(str(d) for d in parse_dtypes("fp16, bf16"))
        ['torch.bfloat16', 'torch.float16']
    """
    out = set()
    for n in [names] if isinstance(names, str) else list(names):
        for part in str(n).split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part not in LOWER_PRECISIONS:
                raise ValueError(f"unknown dtype {part!r} (choose from {', '.join(LOWER_PRECISIONS)})")
            out.add(LOWER_PRECISIONS[part])
    return out


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Bitwise, so NaN == NaN at the same bits and -0.0 != 0.0: "unchanged" means the same bytes.
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point and a.element_size() in _INT_VIEW:
        v = _INT_VIEW[a.element_size()]
        return torch.equal(a.contiguous().view(v), b.contiguous().view(v))
    return torch.equal(a, b)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    d = (a.double() - b.double()).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    return float(d.max())


_PLAIN_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
SHORT_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _roundings(ref: torch.Tensor, dtype: torch.dtype, allowed: set[torch.dtype]) -> list[torch.Tensor]:
    """The release as a run allowed to work in lower precision could have saved it in ``dtype``."""
    out = [ref.to(dtype)] if dtype in allowed else []
    # A bf16 run saved as fp16 (or the reverse) rounds twice: fp16(bf16(x)) is not fp16(x).
    for mid in allowed - {dtype}:
        if dtype in allowed and ref.element_size() > mid.itemsize:
            out.append(ref.to(mid).to(dtype))
    return out


def compare(ref: torch.Tensor, got: torch.Tensor, allowed: set[torch.dtype]) -> tuple[str, float | str]:
    """``("same", 0)``, ``("changed", max|diff|)`` or ``("cannot", reason)`` for ``got`` against ``ref``."""
    if type(got) is not torch.Tensor and not isinstance(got, torch.nn.Parameter):
        return "cannot", f"a {type(got).__name__} (a quantized or wrapped tensor) cannot be shown equal to the release"
    if got.dtype not in _PLAIN_FLOATS:
        return "cannot", (f"stored as {str(got.dtype).removeprefix('torch.')}: an integer, bool, fp8 or "
                          f"quantized frozen tensor cannot be shown equal to the release")
    if tuple(ref.shape) != tuple(got.shape):
        return "changed", float("inf")
    if got.dtype == ref.dtype:
        return ("same", 0.0) if _bit_equal(ref, got) else ("changed", _max_abs_diff(got, ref))
    if got.element_size() > ref.element_size():  # a lossless upcast keeps the value exactly
        exact = got.to(ref.dtype)
        if _bit_equal(exact, ref) and _bit_equal(exact.to(got.dtype), got):
            return "same", 0.0
        return "changed", _max_abs_diff(got, ref)
    if any(_bit_equal(r, got) for r in _roundings(ref, got.dtype, allowed)):
        return "same", 0.0
    every = set(LOWER_PRECISIONS.values())
    if any(_bit_equal(r, got) for r in _roundings(ref, got.dtype, every)):
        need = "fp16,bf16" if not _bit_equal(ref.to(got.dtype), got) else SHORT_NAMES[got.dtype]
        return "cannot", (f"saved in {SHORT_NAMES[got.dtype]}, the release rounded (a lower-precision run): accept "
                          f"with --allow-lower-precision {need}")
    return "changed", _max_abs_diff(got, ref)
