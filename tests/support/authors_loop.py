"""The authors' per-tensor learner updates, written as in pittisl/FreezeAsGuard ``src/mask_learner.py``.

Statement by statement (one ``sigmoid``, ``sum`` and ``.data`` update per tensor, logits indexed
one at a time, ``copy.deepcopy`` of the previous logit), with the authors' variable names. It is
the one rendering of their loop in this project: the equivalence test runs the fused
:class:`freezeguard.MaskLearner` against it, and every learner benchmark times it as the anchor.
It is deliberately slow; do not "fix" it.

Gradients are read from ``param.grad`` unless ``grads`` is given (a list in the same order).

Example:
    >>> import torch
    >>> params = [torch.nn.Parameter(torch.ones(3))]
    >>> params[0].grad = torch.ones(3)
    >>> diffs = [torch.full((3,), 0.1)]
    >>> x = torch.zeros(1)
    >>> user_update(params, diffs, x, T=0.2, user_lr=0.5)
    >>> params[0].data
    tensor([0.8750, 0.8750, 0.8750])
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch

Tensors = Sequence[torch.Tensor]


def releaser_update(params: Tensors, diffs: Tensors, x_for_mask: torch.Tensor, *, T: float, freeze_ratio: float,
                    c_sparsity: float, mask_lr: float, grads: Tensors | None = None) -> None:
    """The releaser's logit step and mask shift. ``x_for_mask`` must require grad (budget term)."""
    grads = [p.grad for p in params] if grads is None else grads
    m = torch.sigmoid(x_for_mask / T)
    sparsity_loss = torch.square(freeze_ratio - torch.sum(m) / m.shape[0])
    d_x_for_sparsity = c_sparsity * torch.autograd.grad(sparsity_loss, x_for_mask)[0]
    for i, (param_diff, param, grad) in enumerate(zip(diffs, params, grads, strict=True)):
        m = torch.sigmoid(x_for_mask[i] / T)
        grad_for_mask_i = mask_lr * torch.sum(param_diff.data * grad) * m * (1 - m) / T
        prev_x_for_mask_i = copy.deepcopy(x_for_mask.data[i])
        x_for_mask.data[i] = x_for_mask.data[i] - grad_for_mask_i - d_x_for_sparsity[i]
        d_mask = torch.sigmoid(x_for_mask[i] / T) - torch.sigmoid(prev_x_for_mask_i / T)
        param.data += param_diff.data * d_mask


def user_update(params: Tensors, diffs: Tensors, x_for_mask: torch.Tensor, *, T: float, user_lr: float,
                grads: Tensors | None = None) -> None:
    """The simulated user's SGD step on the unfrozen share of each tensor."""
    grads = [p.grad for p in params] if grads is None else grads
    for i, (param_diff, param, grad) in enumerate(zip(diffs, params, grads, strict=True)):
        m = torch.sigmoid(x_for_mask[i] / T)
        grad_for_param_ft = -user_lr * (1 - m) * grad
        param.data += grad_for_param_ft * (1 - m)
        param_diff.data -= grad_for_param_ft


__all__ = ["releaser_update", "user_update"]
