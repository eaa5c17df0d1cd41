"""The pure-PyTorch reference of every fused op: the spec all backends are tested against.

Written for clarity, one tensor at a time, with every computation in fp32 and a single
rounding back to the storage dtype at the end, which is what the fused kernels do too.
It is also the fallback wherever no compiled backend can run.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

Tensors = Sequence[torch.Tensor]


def masked_adamw_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                  steps: Sequence[float], *, lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float) -> None:
    """AdamW with decoupled weight decay, torch.optim.AdamW's order of operations.

    ``steps[i]`` is tensor i's step count *including* this update (1 on the first step).
    """
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        p32, g32, m32, v32 = p.float(), g.float(), m.float(), v.float()
        p32 = p32 * (1.0 - lr * weight_decay)
        m32 = m32 + (g32 - m32) * (1.0 - beta1)            # lerp, as torch does
        v32 = (v32 * beta2).addcmul(g32, g32, value=1.0 - beta2)
        bias_correction1 = 1.0 - beta1 ** step
        bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
        denom = v32.sqrt() / bias_correction2_sqrt + eps
        p32 = p32.addcdiv(m32, denom, value=-(lr / bias_correction1))
        p.copy_(p32)
        m.copy_(m32)
        v.copy_(v32)


def segment_dot(a: Tensors, b: Tensors) -> torch.Tensor:
    """fp32 tensor [S] with <a_i, b_i> for each pair, accumulated in fp32."""
    device = a[0].device if len(a) else torch.device("cpu")
    out = torch.empty(len(a), dtype=torch.float32, device=device)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        out[i] = (x.float() * y.float()).sum()
    return out


def mask_shift_(theta: Tensors, delta: Tensors, dm: torch.Tensor) -> None:
    """theta_i += delta_i * dm[i]: move live weights after the soft mask changed by dm."""
    for i, (t, d) in enumerate(zip(theta, delta, strict=True)):
        t.copy_(t.float() + d.float() * dm[i].float())


def user_update_(theta: Tensors, delta: Tensors, grad: Tensors, m: torch.Tensor, lr: float) -> None:
    """The simulated user's SGD step on the unfrozen share (1 - m_i) of each tensor.

    u_i = -lr * (1 - m_i) * g_i;  theta_i += (1 - m_i) * u_i;  delta_i -= u_i.
    """
    for i, (t, d, g) in enumerate(zip(theta, delta, grad, strict=True)):
        keep = 1.0 - m[i].float()
        u = (-lr) * keep * g.float()
        t.copy_(t.float() + keep * u)
        d.copy_(d.float() - u)
