"""The AdamW simulated user: a stronger attacker than the reference's plain SGD.

What the simulated user trains. The live weights are theta = theta_ft + m * Delta with
Delta = theta_pre - theta_ft, i.e. theta = (1 - m) theta_ft + m theta_pre: the user owns theta_ft
and only its unfrozen share (1 - m) reaches the model. The reference's SGD user therefore steps
theta_ft by u = -lr * dL/dtheta_ft = -lr (1 - m) g. The AdamW user takes the AdamW step of
torch.optim.AdamW on theta_ft with the gradient (1 - m) g instead:

    g_ft  = (1 - m_i) g                       (the gradient the user's optimizer sees)
    mu    = beta1 mu + (1 - beta1) g_ft;  nu = beta2 nu + (1 - beta2) g_ft^2
    u     = -lr wd theta_ft - lr/bc1 * mu / (sqrt(nu)/sqrt(bc2) + eps),  theta_ft = theta - m_i Delta
    theta += (1 - m_i) u;  Delta -= u         (theta_pre = theta_ft + Delta stays fixed)

which is exactly "run torch.optim.AdamW on theta_ft, then rebuild theta" (tests check that). The
moments mu, nu live on theta_ft's scale and cost two extra model-sized buffers; m is constant
during user steps (only releaser steps move it), so one step count serves every tensor.

Why not ``ops.masked_adamw_``: it updates its ``params`` argument in place, but here the parameter
(theta_ft) is not held anywhere and the step lands on theta scaled by (1 - m) and on Delta
negated. Until a fused backend op exists, fp32 tensors go through ``torch._foreach_*``
(multi-tensor kernels: a few launches per op for the whole model, no per-tensor Python loop);
bf16/fp16 tensors take the per-tensor fp32 reference below so that low precision rounds once.

Example:
    >>> import torch
    >>> th, de, g = [torch.ones(3)], [torch.ones(3)], [torch.ones(3)]
    >>> mu, nu = [torch.zeros(3)], [torch.zeros(3)]
    >>> user_adamw_update_(th, de, g, mu, nu, torch.tensor([0.5]), 1, lr=0.1, beta1=0.9,
    ...                    beta2=0.999, eps=1e-8, weight_decay=0.0)
    >>> [round(v, 4) for v in th[0].tolist()], [round(v, 4) for v in de[0].tolist()]
    ([0.95, 0.95, 0.95], [1.1, 1.1, 1.1])
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

Tensors = Sequence[torch.Tensor]


def reference_user_adamw_(theta: Tensors, delta: Tensors, grads: Tensors, exp_avgs: Tensors,
                          exp_avg_sqs: Tensors, m: torch.Tensor, step: int, *, lr: float, beta1: float,
                          beta2: float, eps: float, weight_decay: float) -> None:
    """Per-tensor fp32 reference of the AdamW user step (the spec; also the low-precision path)."""
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


def _foreach_user_adamw_(theta: list[torch.Tensor], delta: list[torch.Tensor], grads: list[torch.Tensor],
                         exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], m: list[float],
                         step: int, *, lr: float, beta1: float, beta2: float, eps: float,
                         weight_decay: float) -> None:
    keep = [1.0 - mi for mi in m]
    # The gradients are consumed here (the learner clears them after the step), so they are
    # reused as scratch: the step needs one temporary model-sized buffer, not three.
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


@torch.no_grad()
def user_adamw_update_(theta: Tensors, delta: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                       m: torch.Tensor, step: int, *, lr: float, beta1: float, beta2: float, eps: float,
                       weight_decay: float) -> None:
    """One AdamW simulated-user step over the whole model, in place (see the module docstring).

    ``step`` counts user steps including this one (>= 1). ``grads`` may be overwritten.
    """
    n = len(theta)
    if not (len(delta) == len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n == m.numel()):
        raise ValueError("user_adamw_update_: theta, delta, grads, exp_avgs, exp_avg_sqs and m differ in length")
    if step < 1:
        raise ValueError("user_adamw_update_: step counts the current update and must be >= 1")
    ms = m.detach().float().cpu().tolist()
    fast = [i for i in range(n) if theta[i].dtype == torch.float32 and grads[i].dtype == torch.float32]
    slow = sorted(set(range(n)) - set(fast))
    hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    if fast:
        pick = lambda ts: [ts[i] for i in fast]  # noqa: E731
        _foreach_user_adamw_(pick(theta), pick(delta), pick(grads), pick(exp_avgs), pick(exp_avg_sqs),
                             [ms[i] for i in fast], step, **hp)
    if slow:
        pick = lambda ts: [ts[i] for i in slow]  # noqa: E731
        reference_user_adamw_(pick(theta), pick(delta), pick(grads), pick(exp_avgs), pick(exp_avg_sqs),
                              torch.tensor([ms[i] for i in slow]), step, **hp)


__all__ = ["user_adamw_update_", "reference_user_adamw_"]
