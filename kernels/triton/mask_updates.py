"""The mask learner's fused ops over a whole tensor list: one Triton launch per dtype group.

* ``segment_dot``: per-chunk fp32 partial sums, then one launch that folds each tensor's
  partials in a fixed order. No atomics, so the result is bitwise reproducible run to run.
* ``mask_shift_``: theta_i += delta_i * dm[i].
* ``user_update_``: u = -lr (1 - m_i) g_i; theta_i += (1 - m_i) u; delta_i -= u.

Per-tensor scalars (``dm``, ``m``) are read from fp32 device tensors, so nothing syncs.

Example (on CPU this needs ``TRITON_INTERPRET=1`` before triton is first imported):
    >>> import torch
    >>> segment_dot([torch.ones(3), torch.ones(2)], [torch.ones(3), torch.ones(2)])
    tensor([3., 2.])
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from freezeguard.kernels.addressing import chunk_coords, tensor_ptr, to_storage
from freezeguard.kernels.launch import REDUCE_BLOCK, chunk_tables, launch_chunked, launch_groups, on_device

Tensors = Sequence[torch.Tensor]


# --------------------------------------------------------------------------- segment_dot
@triton.jit
def _dot_chunk(ptrs, S, tid, offs, n, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    a_ptr = tensor_ptr(ptrs, 0, S, tid, DTYPE, ALIGNED) + offs
    b_ptr = tensor_ptr(ptrs, 1, S, tid, DTYPE, ALIGNED) + offs
    if MASKED:
        a = tl.load(a_ptr, mask=offs < n, other=0.0).to(tl.float32)
        b = tl.load(b_ptr, mask=offs < n, other=0.0).to(tl.float32)
    else:
        a = tl.load(a_ptr).to(tl.float32)
        b = tl.load(b_ptr).to(tl.float32)
    return tl.sum(a * b, axis=0)


@triton.jit
def _dot_partials_kernel(ptrs, S, chunk_tid, chunk_local, numels, partials,
                         DTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    tid, offs, n, full = chunk_coords(chunk_tid, chunk_local, numels, BLOCK)
    if full:
        part = _dot_chunk(ptrs, S, tid, offs, n, DTYPE, ALIGNED, False)
    else:
        part = _dot_chunk(ptrs, S, tid, offs, n, DTYPE, ALIGNED, True)
    tl.store(partials + tl.program_id(0), part)


@triton.jit
def _dot_reduce_kernel(partials, seg_first, seg_count, out, RBLOCK: tl.constexpr):
    # One program per tensor; its chunks' partials are contiguous in ``partials``.
    s = tl.program_id(0)
    first = tl.load(seg_first + s)
    count = tl.load(seg_count + s)
    acc = tl.zeros([RBLOCK], dtype=tl.float32)
    for k in range(0, count, RBLOCK):
        idx = k + tl.arange(0, RBLOCK)
        acc += tl.load(partials + first + idx, mask=idx < count, other=0.0)
    tl.store(out + s, tl.sum(acc, axis=0))


def segment_dot(a: Tensors, b: Tensors, *, block: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """fp32 tensor [S] with <a_i, b_i>, deterministic (contract: see freezeguard.ops)."""
    lay, ptr = chunk_tables("segment_dot", (a, b), block)
    device = a[0].device
    partials = torch.empty(lay.num_chunks, dtype=torch.float32, device=device)
    out = torch.empty(lay.num_tensors, dtype=torch.float32, device=device)
    with on_device(device):
        launch_groups(_dot_partials_kernel, "segment_dot", lay, ptr, num_warps=num_warps,
                      per_group=lambda g: (partials[g.chunk_offset:],))
        # Also covers empty tensors: zero chunks fold to 0.
        _dot_reduce_kernel[(lay.num_tensors,)](partials, lay.seg_first, lay.seg_count, out,
                                               RBLOCK=REDUCE_BLOCK, num_warps=4)
    return out


# --------------------------------------------------------------------------- mask_shift_
@triton.jit
def _shift_chunk(ptrs, S, tid, offs, n, dm, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    t_ptr = tensor_ptr(ptrs, 0, S, tid, DTYPE, ALIGNED) + offs
    d_ptr = tensor_ptr(ptrs, 1, S, tid, DTYPE, ALIGNED) + offs
    if MASKED:
        t = tl.load(t_ptr, mask=offs < n, other=0.0).to(tl.float32)
        d = tl.load(d_ptr, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(t_ptr, to_storage(t + d * dm, DTYPE), mask=offs < n)
    else:
        t = tl.load(t_ptr).to(tl.float32)
        d = tl.load(d_ptr).to(tl.float32)
        tl.store(t_ptr, to_storage(t + d * dm, DTYPE))


@triton.jit
def _mask_shift_kernel(ptrs, S, chunk_tid, chunk_local, numels, dm_ptr,
                       DTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    tid, offs, n, full = chunk_coords(chunk_tid, chunk_local, numels, BLOCK)
    dm = tl.load(dm_ptr + tid)
    if full:
        _shift_chunk(ptrs, S, tid, offs, n, dm, DTYPE, ALIGNED, False)
    else:
        _shift_chunk(ptrs, S, tid, offs, n, dm, DTYPE, ALIGNED, True)


def mask_shift_(theta: Tensors, delta: Tensors, dm: torch.Tensor, *, block: int | None = None,
                num_warps: int | None = None) -> None:
    """theta_i += delta_i * dm[i], in place (contract: see freezeguard.ops)."""
    launch_chunked(_mask_shift_kernel, "mask_shift_", (theta, delta), dm, block=block, num_warps=num_warps)


# --------------------------------------------------------------------------- user_update_
@triton.jit
def _user_chunk(ptrs, S, tid, offs, n, keep, lr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                MASKED: tl.constexpr):
    t_ptr = tensor_ptr(ptrs, 0, S, tid, DTYPE, ALIGNED) + offs
    d_ptr = tensor_ptr(ptrs, 1, S, tid, DTYPE, ALIGNED) + offs
    g_ptr = tensor_ptr(ptrs, 2, S, tid, DTYPE, ALIGNED) + offs
    if MASKED:
        t = tl.load(t_ptr, mask=offs < n, other=0.0).to(tl.float32)
        d = tl.load(d_ptr, mask=offs < n, other=0.0).to(tl.float32)
        g = tl.load(g_ptr, mask=offs < n, other=0.0).to(tl.float32)
    else:
        t = tl.load(t_ptr).to(tl.float32)
        d = tl.load(d_ptr).to(tl.float32)
        g = tl.load(g_ptr).to(tl.float32)
    # reference.py's order: ((-lr) * keep) * g.
    u = (-lr * keep) * g
    t = t + keep * u
    d = d - u
    if MASKED:
        tl.store(t_ptr, to_storage(t, DTYPE), mask=offs < n)
        tl.store(d_ptr, to_storage(d, DTYPE), mask=offs < n)
    else:
        tl.store(t_ptr, to_storage(t, DTYPE))
        tl.store(d_ptr, to_storage(d, DTYPE))


@triton.jit
def _user_update_kernel(ptrs, S, chunk_tid, chunk_local, numels, m_ptr, lr,
                        DTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    tid, offs, n, full = chunk_coords(chunk_tid, chunk_local, numels, BLOCK)
    keep = 1.0 - tl.load(m_ptr + tid)
    if full:
        _user_chunk(ptrs, S, tid, offs, n, keep, lr, DTYPE, ALIGNED, False)
    else:
        _user_chunk(ptrs, S, tid, offs, n, keep, lr, DTYPE, ALIGNED, True)


def user_update_(theta: Tensors, delta: Tensors, grad: Tensors, m: torch.Tensor, lr: float, *,
                 block: int | None = None, num_warps: int | None = None) -> None:
    """The simulated user's SGD step, in place (contract: see freezeguard.ops)."""
    launch_chunked(_user_update_kernel, "user_update_", (theta, delta, grad), m, float(lr), block=block,
                   num_warps=num_warps)
