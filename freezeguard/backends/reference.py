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


def masked_adamw_capturable_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                             steps: torch.Tensor, *, lr: float | torch.Tensor, beta1: float, beta2: float,
                             eps: float, weight_decay: float) -> None:
    """:func:`masked_adamw_` with ``steps`` (a float tensor [S], counts including this update) and
    ``lr`` (a float or a one-element tensor) read where the math runs, never on the host.

    The bias corrections are computed in float64 tensors, as the float path computes them in
    Python floats.
    """
    steps64 = steps.to(torch.float64)
    lr64 = lr.to(torch.float64).reshape(()) if isinstance(lr, torch.Tensor) else lr
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        step = steps64[i]
        p32, g32, m32, v32 = p.float(), g.float(), m.float(), v.float()
        p32 = p32 * (1.0 - lr64 * weight_decay).float()
        m32 = m32 + (g32 - m32) * (1.0 - beta1)
        v32 = (v32 * beta2).addcmul(g32, g32, value=1.0 - beta2)
        bias_correction1 = 1.0 - torch.pow(beta1, step)
        bias_correction2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, step))
        denom = v32.sqrt() / bias_correction2_sqrt.float() + eps
        p32 = p32 - (lr64 / bias_correction1).float() * (m32 / denom)
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


def user_adamw_(theta: Tensors, delta: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                m: torch.Tensor, step: int, *, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float) -> None:
    """The AdamW simulated user: torch.optim.AdamW on theta_ft with gradient (1 - m_i) g.

    The live weights are theta = theta_ft + m Delta with Delta = theta_pre - theta_ft, so the user
    owns theta_ft and only its unfrozen share (1 - m_i) reaches the model:

        g_ft = (1 - m_i) g;  mu = beta1 mu + (1 - beta1) g_ft;  nu = beta2 nu + (1 - beta2) g_ft^2
        u    = -lr/bc1 * mu / (sqrt(nu)/sqrt(bc2) + eps) - lr wd theta_ft,  theta_ft = theta - m_i Delta
        theta += (1 - m_i) u;  Delta -= u         (theta_pre = theta_ft + Delta stays fixed)

    ``step`` (>= 1) includes this update; one count serves every tensor.
    """
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    for i, (t, d, g, mu, nu) in enumerate(zip(theta, delta, grads, exp_avgs, exp_avg_sqs, strict=True)):
        mi = float(m[i])
        t32, d32, mu32, nu32 = t.float(), d.float(), mu.float(), nu.float()
        g_ft = g.float() * (1.0 - mi)
        mu32 = mu32 + (g_ft - mu32) * (1.0 - beta1)
        nu32 = (nu32 * beta2).addcmul(g_ft, g_ft, value=1.0 - beta2)
        u = mu32 / (nu32.sqrt() / bc2_sqrt + eps) * (-lr / bc1)
        if weight_decay:
            u = u - (lr * weight_decay) * (t32 - mi * d32)
        t.copy_(t32 + (1.0 - mi) * u)
        d.copy_(d32 - u)
        mu.copy_(mu32)
        nu.copy_(nu32)


def masked_sgd_momentum_(params: Tensors, grads: Tensors, momentum_buffers: Tensors, *, lr: float,
                         momentum: float, dampening: float, weight_decay: float, nesterov: bool) -> None:
    """SGD with momentum (torch.optim.SGD's order of operations), buffers starting at zero.

    g' = g + weight_decay p;  buf = momentum buf + (1 - dampening) g';
    p -= lr (g' + momentum buf if nesterov else buf).
    """
    for p, g, b in zip(params, grads, momentum_buffers, strict=True):
        p32, g32, b32 = p.float(), g.float(), b.float()
        if weight_decay:
            g32 = g32 + weight_decay * p32
        b32 = b32 * momentum + g32 * (1.0 - dampening)
        step = g32 + momentum * b32 if nesterov else b32
        p.copy_(p32 - lr * step)
        b.copy_(b32)
