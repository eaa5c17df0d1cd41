"""Masked AdamW over a whole tensor list: one Triton launch per dtype group.

The caller lists only trainable tensors, so "masked" costs nothing here: frozen tensors are
not in the tables and are never read or written. Per-tensor step counts give per-tensor bias
corrections, computed on the host in float64 (as torch.optim.AdamW does) and shipped as a
tiny fp32 table with a non-blocking copy, so a step never waits for the GPU.

Example (on CPU this needs ``TRITON_INTERPRET=1`` before triton is first imported):
    >>> import torch
    >>> p, g = [torch.ones(3)], [torch.ones(3)]
    >>> m, v = [torch.zeros(3)], [torch.zeros(3)]
    >>> masked_adamw_(p, g, m, v, [1.0], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    >>> p[0]
    tensor([0.9000, 0.9000, 0.9000])
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from freezeguard.kernels.addressing import chunk_coords, tensor_ptr, to_storage
from freezeguard.kernels.launch import launch_chunked, per_tensor_scalars


@triton.jit
def _adamw_chunk(ptrs, S, tid, offs, n, scal, wd_factor, one_minus_beta1, beta2, one_minus_beta2, eps,
                 DTYPE: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr, WD_IN_TABLE: tl.constexpr):
    p_ptr = tensor_ptr(ptrs, 0, S, tid, DTYPE, ALIGNED) + offs
    g_ptr = tensor_ptr(ptrs, 1, S, tid, DTYPE, ALIGNED) + offs
    m_ptr = tensor_ptr(ptrs, 2, S, tid, DTYPE, ALIGNED) + offs
    v_ptr = tensor_ptr(ptrs, 3, S, tid, DTYPE, ALIGNED) + offs
    if MASKED:
        inb = offs < n
        p = tl.load(p_ptr, mask=inb, other=0.0).to(tl.float32)
        g = tl.load(g_ptr, mask=inb, other=0.0).to(tl.float32)
        m = tl.load(m_ptr, mask=inb, other=0.0).to(tl.float32)
        v = tl.load(v_ptr, mask=inb, other=0.0).to(tl.float32)
    else:
        p = tl.load(p_ptr).to(tl.float32)
        g = tl.load(g_ptr).to(tl.float32)
        m = tl.load(m_ptr).to(tl.float32)
        v = tl.load(v_ptr).to(tl.float32)
    neg_step_size = tl.load(scal + tid)          # -lr / (1 - beta1**step)
    bc2_sqrt = tl.load(scal + S + tid)           # sqrt(1 - beta2**step)
    if WD_IN_TABLE:                              # capturable: 1 - lr * wd computed on the device
        wd_factor = tl.load(scal + 2 * S)
    # torch.optim.AdamW's order of operations (reference.py), rounded once at the store.
    p = p * wd_factor
    m = m + (g - m) * one_minus_beta1
    v = v * beta2 + one_minus_beta2 * g * g
    # IEEE sqrt/div (torch's), not the approximate ones: free in a memory-bound kernel.
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + neg_step_size * tl.div_rn(m, denom)
    if MASKED:
        tl.store(p_ptr, to_storage(p, DTYPE), mask=inb)
        tl.store(m_ptr, to_storage(m, DTYPE), mask=inb)
        tl.store(v_ptr, to_storage(v, DTYPE), mask=inb)
    else:
        tl.store(p_ptr, to_storage(p, DTYPE))
        tl.store(m_ptr, to_storage(m, DTYPE))
        tl.store(v_ptr, to_storage(v, DTYPE))


@triton.jit
def _masked_adamw_kernel(ptrs, S, chunk_tid, chunk_local, numels, scal, wd_factor, one_minus_beta1, beta2,
                         one_minus_beta2, eps, DTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
                         WD_IN_TABLE: tl.constexpr = False):
    tid, offs, n, full = chunk_coords(chunk_tid, chunk_local, numels, BLOCK)
    # Only a tensor's last chunk needs bounds masks; full chunks stay unmasked so they vectorize.
    if full:
        _adamw_chunk(ptrs, S, tid, offs, n, scal, wd_factor, one_minus_beta1, beta2, one_minus_beta2, eps,
                     DTYPE, ALIGNED, False, WD_IN_TABLE)
    else:
        _adamw_chunk(ptrs, S, tid, offs, n, scal, wd_factor, one_minus_beta1, beta2, one_minus_beta2, eps,
                     DTYPE, ALIGNED, True, WD_IN_TABLE)


def _bias_corrections(steps: Sequence[float], lr: float, beta1: float, beta2: float) -> list[float]:
    """[-lr/bc1 per tensor] + [sqrt(bc2) per tensor], in float64, memoised per distinct step."""
    memo: dict[float, tuple[float, float]] = {}
    for s in steps:
        if s not in memo:
            memo[s] = (-lr / (1.0 - beta1 ** s), math.sqrt(1.0 - beta2 ** s))
    return [memo[s][0] for s in steps] + [memo[s][1] for s in steps]


def _launch(params, grads, exp_avgs, exp_avg_sqs, scal: torch.Tensor, wd_factor: float, *, beta1: float,
            beta2: float, eps: float, wd_in_table: bool, block: int | None, num_warps: int | None) -> None:
    launch_chunked(_masked_adamw_kernel, "masked_adamw_", (params, grads, exp_avgs, exp_avg_sqs), scal, wd_factor,
                   1.0 - beta1, beta2, 1.0 - beta2, eps, block=block, num_warps=num_warps, WD_IN_TABLE=wd_in_table)


def masked_adamw_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                  steps: Sequence[float], *, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, block: int | None = None, num_warps: int | None = None) -> None:
    """One AdamW step of every listed tensor, in place (contract: see freezeguard.ops)."""
    scal = per_tensor_scalars(_bias_corrections(steps, lr, beta1, beta2), params[0].device)
    _launch(params, grads, exp_avgs, exp_avg_sqs, scal, 1.0 - lr * weight_decay, beta1=beta1, beta2=beta2, eps=eps,
            wd_in_table=False, block=block, num_warps=num_warps)


def masked_adamw_capturable_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                             exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                             steps: torch.Tensor, *, lr: float | torch.Tensor, beta1: float, beta2: float, eps: float,
                             weight_decay: float, block: int | None = None, num_warps: int | None = None) -> None:
    """:func:`masked_adamw_` with ``steps`` [S] and ``lr`` read on the device (CUDA-graph capturable).

    The same scalar table, built by a few tensor ops on the device instead of on the host, plus
    ``1 - lr * weight_decay`` at its end. The pointer tables must already be cached (run one
    step before capturing), as for any launch inside a graph.
    """
    device = params[0].device
    s = steps.to(device=device, dtype=torch.float64)
    lr64 = lr.to(device=device, dtype=torch.float64).reshape(1) if isinstance(lr, torch.Tensor) \
        else torch.full((1,), lr, dtype=torch.float64, device=device)
    scal = torch.cat([-lr64 / (1.0 - torch.pow(beta1, s)), torch.sqrt(1.0 - torch.pow(beta2, s)),
                      1.0 - lr64 * weight_decay]).to(torch.float32)
    _launch(params, grads, exp_avgs, exp_avg_sqs, scal, 0.0, beta1=beta1, beta2=beta2, eps=eps, wd_in_table=True,
            block=block, num_warps=num_warps)
