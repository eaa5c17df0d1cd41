"""Compatibility names for the AdamW simulated user, now the op ``freezeguard.ops.user_adamw_``.

The op (declared in ``freezeguard.ops``, reference in ``freezeguard.backends.reference``,
dispatched through the registry like every fused op) replaces this module's former own
implementation; these two names keep existing imports working.

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

from typing import Sequence

import torch

from freezeguard import ops
from freezeguard.backends.reference import user_adamw_ as reference_user_adamw_

Tensors = Sequence[torch.Tensor]


def user_adamw_update_(theta: Tensors, delta: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                       m: torch.Tensor, step: int, *, lr: float, beta1: float, beta2: float, eps: float,
                       weight_decay: float, backend: str = "auto") -> None:
    """``fg.ops.user_adamw_`` with the betas passed apart (the learner's former signature)."""
    n = len(theta)
    if not (len(delta) == len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n == m.numel()):
        raise ValueError("user_adamw_update_: theta, delta, grads, exp_avgs, exp_avg_sqs and m differ in length")
    ops.user_adamw_(theta, delta, grads, exp_avgs, exp_avg_sqs, m, step, lr=lr, betas=(beta1, beta2), eps=eps,
                    weight_decay=weight_decay, backend=backend)


__all__ = ["user_adamw_update_", "reference_user_adamw_"]
