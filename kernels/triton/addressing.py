"""Device-side addressing shared by the multi-tensor kernels.

One launch covers every tensor of a dtype group: program ``pid`` handles chunk ``pid`` of the
group's chunk table, i.e. elements ``[local * BLOCK, (local + 1) * BLOCK)`` of tensor ``tid``.
The tensors themselves are reached through a table of int64 data pointers built on the host
(``kernels/triton/tables.py``), laid out role-major: ``ptrs[role * S + tid]``.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_coords(chunk_tid, chunk_local, numels, BLOCK: tl.constexpr):
    """(tid, int64 element offsets of this program's chunk, tensor numel, chunk is full)."""
    pid = tl.program_id(0)
    tid = tl.load(chunk_tid + pid)
    # int64 before multiplying: tensors past 2**31 elements must not wrap around.
    start = tl.load(chunk_local + pid).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    n = tl.load(numels + tid)
    return tid, offs, n, start + BLOCK <= n


@triton.jit
def tensor_ptr(ptrs, role, S, tid, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed base pointer of tensor ``tid`` in table row ``role``."""
    p = tl.load(ptrs + role * S + tid).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # The host checked every base address is 16-byte aligned. Pointers read from memory
        # carry no alignment facts, so without this hint the full chunks compile to scalar
        # 4-byte accesses instead of 16-byte vectors (checked in the PTX for sm_90).
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    """Round fp32 ``x`` to the storage dtype, to nearest even (as torch's ``copy_`` does)."""
    if DTYPE == tl.bfloat16:
        # Rounded by hand: the Triton interpreter truncates fp32 -> bf16 casts (and its RTNE
        # mode mishandles carries), so this keeps the CPU tests and the GPU on one code path.
        # A handful of integer ops per element is free in these memory-bound kernels.
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
