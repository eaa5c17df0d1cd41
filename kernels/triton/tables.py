"""Host-built device tables that let one kernel launch cover a whole tensor list.

Two tables per call, cached separately because they change for different reasons:

* the *layout* (chunk table, per-tensor numels, segment ranges) depends only on the tensors'
  sizes and dtypes and the block size: it is built once per model;
* the *pointer table* (int64 data pointers, role-major) depends on where the tensors live.
  Parameters and optimizer states never move, but gradients may be reallocated between steps
  (``zero_grad(set_to_none=True)``), so this one is rebuilt when any address changes; it is a
  few kilobytes.

The key of each cache holds every fact the table encodes (addresses, numels, dtypes, block,
device), so a hit can never hand out a stale table. Both caches are small LRUs.

Example:
    >>> import torch
    >>> lay = layout([torch.zeros(5), torch.zeros(0, dtype=torch.bfloat16)], block=4)
    >>> [(g.dtype, g.num_chunks) for g in lay.groups]
    [(torch.float32, 2), (torch.bfloat16, 0)]
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

# Base addresses 16-byte aligned -> kernels may use 128-bit vector accesses.
VECTOR_BYTES = 16
_CACHE_SIZE = 16


@dataclass(frozen=True)
class Group:
    """The tensors of one dtype: one kernel launch."""

    dtype: torch.dtype
    indices: tuple[int, ...]      # positions in the caller's list
    chunk_offset: int             # first chunk of this group in the concatenated chunk table
    num_chunks: int
    chunk_tid: torch.Tensor       # int32 [num_chunks] (device), view into one buffer
    chunk_local: torch.Tensor     # int32 [num_chunks] (device), chunk index inside its tensor


@dataclass(frozen=True)
class Layout:
    key: tuple                    # everything it was built from (device, block, numels, dtypes)
    block: int
    num_tensors: int
    num_chunks: int               # over all groups
    groups: tuple[Group, ...]
    numels: torch.Tensor          # int64 [S] (device)
    seg_first: torch.Tensor       # int32 [S] (device): first chunk of tensor i (global numbering)
    seg_count: torch.Tensor       # int32 [S] (device): number of chunks of tensor i


@dataclass(frozen=True)
class Pointers:
    table: torch.Tensor           # int64 [roles * S] (device), role-major
    aligned: tuple[bool, ...]     # per group of the layout: every base address vector-aligned


class _LRU:
    def __init__(self, size: int):
        self.size = size
        self.data: OrderedDict = OrderedDict()
        self.builds = 0

    def get(self, key, build):
        hit = self.data.get(key)
        if hit is not None:
            self.data.move_to_end(key)
            return hit
        value = build()
        self.builds += 1
        self.data[key] = value
        if len(self.data) > self.size:
            self.data.popitem(last=False)
        return value

    def clear(self) -> None:
        self.data.clear()
        self.builds = 0


_layouts = _LRU(_CACHE_SIZE)
_pointers = _LRU(_CACHE_SIZE)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        # Pinned + non_blocking: the copy is queued on the current stream, no host sync.
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _build_layout(key: tuple) -> Layout:
    device, block, numels, dtypes = key
    s = len(numels)
    counts = torch.tensor([(n + block - 1) // block for n in numels], dtype=torch.int64)
    order: dict[torch.dtype, list[int]] = {}
    for i, dt in enumerate(dtypes):
        order.setdefault(dt, []).append(i)
    tids, locals_, spans = [], [], []
    seg_first = torch.zeros(s, dtype=torch.int64)
    offset = 0
    for dt, idx in order.items():
        idx_t = torch.tensor(idx, dtype=torch.int64)
        c = counts[idx_t]
        total = int(c.sum())
        starts = torch.cumsum(c, 0) - c                      # exclusive prefix sum
        seg_first[idx_t] = starts + offset
        tid = torch.repeat_interleave(idx_t, c)
        local = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(starts, c)
        tids.append(tid)
        locals_.append(local)
        spans.append((dt, tuple(idx), offset, total))
        offset += total
    if offset >= 2**31:
        raise ValueError(f"triton backend: {offset} chunks of {block} elements exceed one launch grid")
    # One host buffer, one copy: [chunk_tid | chunk_local | seg_first | seg_count].
    host = torch.cat([torch.cat(tids) if tids else torch.empty(0, dtype=torch.int64),
                      torch.cat(locals_) if locals_ else torch.empty(0, dtype=torch.int64),
                      seg_first, counts]).to(torch.int32)
    dev = _to_device(host, device)
    chunk_tid, chunk_local = dev[:offset], dev[offset:2 * offset]
    groups = tuple(Group(dt, idx, off, n, chunk_tid[off:off + n], chunk_local[off:off + n])
                   for dt, idx, off, n in spans)
    numels_dev = _to_device(torch.tensor(list(numels), dtype=torch.int64), device)
    return Layout(key, block, s, offset, groups, numels_dev, dev[2 * offset:2 * offset + s], dev[2 * offset + s:])


def layout(tensors: Sequence[torch.Tensor], block: int) -> Layout:
    """The (cached) chunk layout of ``tensors`` for blocks of ``block`` elements."""
    numels = tuple(t.numel() for t in tensors)
    dtypes = tuple(t.dtype for t in tensors)
    device = tensors[0].device
    key = (device, block, numels, dtypes)
    return _layouts.get(key, lambda: _build_layout(key))


def pointers(roles: Sequence[Sequence[torch.Tensor]], lay: Layout) -> Pointers:
    """The (cached) pointer table of ``roles`` (lists of equal length, one per tensor role)."""
    addrs = tuple(t.data_ptr() for ts in roles for t in ts)
    device = lay.key[0]
    key = (lay.key, addrs)

    def build() -> Pointers:
        s = lay.num_tensors
        aligned = []
        for g in lay.groups:
            # Empty tensors are never dereferenced, whatever their address.
            live = [i for i in g.indices if roles[0][i].numel() > 0]
            aligned.append(all(addrs[r * s + i] % VECTOR_BYTES == 0 for r in range(len(roles)) for i in live))
        table = _to_device(torch.tensor(addrs, dtype=torch.int64), device)
        return Pointers(table, tuple(aligned))

    return _pointers.get(key, build)


def cache_stats() -> dict[str, int]:
    """How many layouts / pointer tables were built since the last ``clear_caches()``."""
    return {"layout_builds": _layouts.builds, "pointer_builds": _pointers.builds,
            "layouts_cached": len(_layouts.data), "pointers_cached": len(_pointers.data)}


def clear_caches() -> None:
    _layouts.clear()
    _pointers.clear()
