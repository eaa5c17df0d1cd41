"""Does a trainable tensor share memory with a frozen one? (Updating it would change the frozen tensor.)

Tensors are compared by the *absolute* byte range they can read or write on their device
(``data_ptr()`` plus the extent of their strides), not by storage object: two numpy views of one
buffer (``torch.from_numpy``) have different storages over the same memory. The frozen ranges
are sorted and merged once, and each trainable range is placed by binary search, so the check is
O(n log n) (a naive pairwise test took seconds on 20k views). Ranges are conservative: a strided
view that interleaves with a frozen one without touching it is still refused (fail closed).

Example:
    >>> import torch
    >>> w = torch.zeros(4, 4)
    >>> check_no_alias([w], [("row", w[1])])
    Traceback (most recent call last):
    ...
    ValueError: parameter 'row' shares memory with a frozen tensor: updating it would change the frozen tensor, so it cannot be optimized under this mask
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Iterable

import torch

from freezeguard.core.optim.plan import local


def memory_span(t: torch.Tensor) -> tuple[tuple[str, int | None], int, int] | None:
    """(device, first byte address, end byte address) a tensor can touch; None when it owns no memory
    to compare (meta tensors, empty tensors, wrapper subclasses other than DTensor)."""
    t = local(t)  # a DTensor (FSDP2): its local shard holds the memory
    if t.device.type == "meta" or not t.numel():
        return None
    try:
        start = t.data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
    return (t.device.type, t.device.index), start, start + extent * t.element_size()


def check_no_alias(frozen: Iterable[torch.Tensor], trainable: Iterable[tuple[str, torch.Tensor]]) -> None:
    """ValueError naming the first trainable tensor whose memory overlaps a frozen tensor's."""
    ranges: dict[tuple[str, int | None], list[tuple[int, int]]] = {}
    for p in frozen:
        span = memory_span(p)
        if span is not None:
            ranges.setdefault(span[0], []).append(span[1:])
    if not ranges:
        return
    merged: dict[tuple[str, int | None], tuple[list[int], list[int]]] = {}
    for device, spans in ranges.items():
        starts: list[int] = []
        ends: list[int] = []
        for lo, hi in sorted(spans):
            if ends and lo < ends[-1]:
                ends[-1] = max(ends[-1], hi)
            else:
                starts.append(lo)
                ends.append(hi)
        merged[device] = (starts, ends)
    for name, p in trainable:
        span = memory_span(p)
        if span is None or span[0] not in merged:
            continue
        starts, ends = merged[span[0]]
        lo, hi = span[1], span[2]
        # the last merged frozen range starting before hi is the only one that can overlap [lo, hi)
        k = bisect_left(starts, hi) - 1
        if k >= 0 and ends[k] > lo:
            raise ValueError(f"parameter {name!r} shares memory with a frozen tensor: updating it would change the "
                             f"frozen tensor, so it cannot be optimized under this mask")


__all__ = ["check_no_alias", "memory_span"]
