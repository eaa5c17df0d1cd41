"""The `torch` backend: pure PyTorch, usable on any device.

Every op is the reference (``reference.py``, the spec) except ``user_adamw_``, which on fp32
tensors runs as ``torch._foreach_*`` multi-tensor kernels (a few launches per op for the whole
model instead of a Python loop over tensors) and is tested against the reference.

Example:
    >>> BACKEND.implements("masked_sgd_momentum_"), BACKEND.availability()[0]
    (True, True)
"""
from __future__ import annotations

import math

import torch

from freezeguard.backends import reference
from freezeguard.backends.record import ALL_DTYPES, BackendRecord


def _foreach_user_adamw_(theta, delta, grads, exp_avgs, exp_avg_sqs, m: list[float], step: int, *, lr: float,
                         beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    keep = [1.0 - mi for mi in m]
    # The gradients are scratch (the op's contract): the step needs one temporary model-sized
    # buffer, not three.
    g = grads
    torch._foreach_mul_(g, keep)
    torch._foreach_lerp_(exp_avgs, g, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1.0 - beta2)
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    u = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(u, bc2_sqrt)
    torch._foreach_add_(u, eps)
    torch._foreach_reciprocal_(u)
    torch._foreach_mul_(u, exp_avgs)
    torch._foreach_mul_(u, -lr / bc1)
    if weight_decay:
        # theta_ft = theta - m Delta, built in the spent gradient buffers.
        torch._foreach_copy_(g, delta)
        torch._foreach_mul_(g, [-mi for mi in m])
        torch._foreach_add_(g, theta)
        torch._foreach_add_(u, g, alpha=-lr * weight_decay)
    torch._foreach_sub_(delta, u)
    torch._foreach_mul_(u, keep)
    torch._foreach_add_(theta, u)


def user_adamw_(theta, delta, grads, exp_avgs, exp_avg_sqs, m: torch.Tensor, step: int, *, lr: float, beta1: float,
                beta2: float, eps: float, weight_decay: float) -> None:
    """fp32 tensors through foreach kernels; bf16/fp16 through the reference, so they round once."""
    ms = m.detach().float().cpu().tolist()
    fast = [i for i, t in enumerate(theta) if t.dtype == torch.float32]
    slow = [i for i, t in enumerate(theta) if t.dtype != torch.float32]
    hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    if fast:
        def pick(ts):
            return [ts[i] for i in fast]

        _foreach_user_adamw_(pick(theta), pick(delta), pick(grads), pick(exp_avgs), pick(exp_avg_sqs),
                             [ms[i] for i in fast], step, **hp)
    if slow:
        def pick(ts):
            return [ts[i] for i in slow]

        reference.user_adamw_(pick(theta), pick(delta), pick(grads), pick(exp_avgs), pick(exp_avg_sqs),
                              m[slow] if len(slow) != len(ms) else m, step, **hp)


BACKEND = BackendRecord(
    name="torch", devices=frozenset(("cpu", "cuda")), dtypes=ALL_DTYPES,
    availability=lambda: (True, "pure PyTorch reference (always available)"),
    kernels={"masked_adamw_": reference.masked_adamw_,
             "masked_adamw_capturable_": reference.masked_adamw_capturable_,
             "segment_dot": reference.segment_dot,
             "mask_shift_": reference.mask_shift_,
             "user_update_": reference.user_update_,
             "user_adamw_": user_adamw_,
             "masked_sgd_momentum_": reference.masked_sgd_momentum_},
)
