"""The releaser's update of the mask logits: one vectorized pass over the [S] logits.

Notation of docs/DESIGN.md section 4: soft mask m_i = sigmoid(x_i / T); s_i = <Delta_i, g_i> the
sensitivity of the releaser loss to tensor i's mask; budget penalty B = c (rho - sum_i w_i m_i)^2
with w_i = 1/S ("tensors") or n_i / N ("params"). The authors' loop updates each x_i with the
m_i of the *old* logits and the budget gradient computed before the loop, so the whole update is
one elementwise expression over the vector of logits. Where the logits start (``init``) is
here too: :func:`initial_logits`; and the releaser step as the learner takes it
(:func:`shaped_signal`, then :func:`releaser_logits`, with the penalty or the projected budget).

Example:
    >>> import torch
    >>> x = torch.zeros(3)
    >>> w = budget_weights([4, 4, 8], by="tensors")
    >>> x2 = updated_logits(x, torch.tensor([1.0, 0.0, -1.0]), weights=w, ratio=0.5,
    ...                     temperature=0.2, c_sparsity=0.0, mask_lr=1.0)
    >>> bool(x2[0] < 0 < x2[2])
    True
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from freezeguard.apps.learn.budget import project_logits

BUDGET_BASES = ("tensors", "params")


def budget_weights(sizes: Sequence[int], by: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 [S] weights summing to 1: each tensor counts once ("tensors") or by its size ("params")."""
    if by not in BUDGET_BASES:
        raise ValueError(f"budget_by must be one of {BUDGET_BASES}, got {by!r}")
    n = len(sizes)
    if n == 0:
        raise ValueError("the model has no parameters to mask")
    if by == "tensors":
        return torch.full((n,), 1.0 / n, dtype=torch.float32, device=device)
    # float64 for the division: an SD UNet has ~8.6e8 parameters, beyond fp32's exact integers.
    sz = torch.tensor([float(s) for s in sizes], dtype=torch.float64)
    return (sz / sz.sum()).to(device=device, dtype=torch.float32)


def soft_mask(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """m = sigmoid(x / T): 1 means frozen at the released weights."""
    return torch.sigmoid(x / temperature)


def logit_steps(x: torch.Tensor, s: torch.Tensor, *, weights: torch.Tensor, ratio: float,
                temperature: float, c_sparsity: float, mask_lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(data step, budget step) of one releaser step: x' = x - data - budget.

    data_i = mask_lr * s_i * dm_i/dx_i and budget_i = dB/dx_i, with dm/dx = m (1 - m) / T and
    dB/dx_i = -2 c (rho - sum_j w_j m_j) w_i dm_i/dx_i (the authors' c * autograd of B).
    """
    m = soft_mask(x, temperature)
    dm_dx = m * (1.0 - m) / temperature
    realised = (weights * m).sum()
    budget_grad = (-2.0 * c_sparsity) * (ratio - realised) * weights * dm_dx
    return mask_lr * s * dm_dx, budget_grad


def updated_logits(x: torch.Tensor, s: torch.Tensor, *, weights: torch.Tensor, ratio: float,
                   temperature: float, c_sparsity: float, mask_lr: float) -> torch.Tensor:
    """New logits after one releaser step (a new tensor; ``x`` is not modified); see :func:`logit_steps`."""
    data, budget = logit_steps(x, s, weights=weights, ratio=ratio, temperature=temperature,
                               c_sparsity=c_sparsity, mask_lr=mask_lr)
    return x - data - budget


def shaped_signal(s: torch.Tensor, weights: torch.Tensor, *, density: bool, norm: str | None) -> torch.Tensor:
    """The sensitivities s as the logit step uses them (``s`` itself when neither option is on).

    ``density``: divide by S w_i, each tensor's share of the budget relative to the mean size (a
    caller skips it by tensors, where it is 1: 1/S * S need not round to 1 in fp32, and the
    signal stays bit-for-bit). ``norm="rms"``: divide by the root mean square over tensors.
    """
    if density:
        s = s / (weights * len(weights))
    if norm == "rms":
        rms = s.square().mean().sqrt()
        s = torch.where(rms > 0, s / rms.clamp(min=torch.finfo(s.dtype).tiny), s)
    return s


def releaser_logits(x: torch.Tensor, s: torch.Tensor, *, weights: torch.Tensor, ratio: float, temperature: float,
                    mask_lr: float, c_sparsity: float, projected: bool) -> tuple[torch.Tensor, float | None]:
    """(new logits, data_to_budget) of one releaser step on the signal ``s``.

    With the penalty budget: x - data - budget (:func:`logit_steps`), and data_to_budget the
    median size of the data step over that of the budget step (None when the budget step is 0).
    ``projected``: the data step alone, then one common shift back onto the budget
    (``budget.project_logits``); data_to_budget is None.
    """
    if projected:
        data, _ = logit_steps(x, s, weights=weights, ratio=ratio, temperature=temperature, c_sparsity=0.0,
                              mask_lr=mask_lr)
        return project_logits(x - data, weights, ratio, temperature), None
    data, budget = logit_steps(x, s, weights=weights, ratio=ratio, temperature=temperature,
                               c_sparsity=c_sparsity, mask_lr=mask_lr)
    budget_step = float(budget.abs().median())
    return x - data - budget, (float(data.abs().median()) / budget_step if budget_step > 0 else None)


def uniform_logits(n: int, seed: int) -> torch.Tensor:
    """The seeded U[0, 1) initial logits (as the authors initialise them), on the CPU."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.rand(n, generator=gen)


def initial_logits(init: str, names: Sequence[str], *, seed: int, freeze_ratio: float, temperature: float,
                   scores: Mapping[str, float] | None = None) -> torch.Tensor:
    """fp32 [S] initial logits on the CPU (before any projection onto the budget).

    "uniform": :func:`uniform_logits`; "constant": every logit T logit(rho), so m = rho;
    "scores": ``scores`` (name -> score, every name) spread evenly over [0, 1) by rank, highest
    score highest (the span of the authors' U[0, 1)); ties go to names, as in FreezeMask.from_scores.

    Example:
        >>> initial_logits("scores", ["a", "b"], seed=0, freeze_ratio=0.5, temperature=0.2,
        ...                scores={"a": 1.0, "b": 2.0}).tolist()
        [0.25, 0.75]
    """
    n = len(names)
    if init == "uniform":
        x = uniform_logits(n, seed)
    elif init == "constant":
        r = min(max(freeze_ratio, 1e-6), 1.0 - 1e-6)
        x = torch.full((n,), temperature * math.log(r / (1.0 - r)))
    else:
        unknown = sorted(set(scores) - set(names))
        missing = sorted(set(names) - set(scores))
        if unknown or missing:
            raise ValueError(f"init scores must name every parameter of the model (missing: {missing[:8]}, "
                             f"unknown: {unknown[:8]})")
        order = sorted(range(n), key=lambda i: (-float(scores[names[i]]), names[i]))
        x = torch.empty(n)
        x[torch.tensor(order)] = (n - 0.5 - torch.arange(n, dtype=torch.float32)) / n
    return x.to(dtype=torch.float32)


__all__ = ["BUDGET_BASES", "budget_weights", "soft_mask", "logit_steps", "updated_logits", "shaped_signal",
           "releaser_logits", "uniform_logits",
           "initial_logits"]
