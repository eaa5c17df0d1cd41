"""The freeze budget of the mask learner: a scale-free penalty weight and an exact projection.

Notation of docs/DESIGN.md section 4: logits x_i, soft mask m_i = sigmoid(x_i / T), budget weights
w_i summing to 1 (1/S by tensors, n_i/N by parameters), soft ratio r = sum_i w_i m_i, target rho.

**Penalty** (the authors'): B = c (rho - r)^2. Its step on logit i is
``c * a_i`` with ``a_i = 2 (r - rho) w_i m_i (1 - m_i) / T``: every logit moves the same way, in
proportion to its own w_i m_i (1 - m_i). How far the first step goes depends on c relative to
the model's size and the budget, so one number cannot suit every model: the authors' c = 5e3
fits the SD-1.5 UNet (686 tensors, rho = 0.2) but saturates every logit of a 208-tensor model at
rho = 0.5 in the first step, after which m (1 - m) ~ 0 and the data can no longer move anything.

``auto_c_sparsity`` picks the c whose *first* penalty step lands exactly on rho:

    c*  solves  sum_i w_i sigmoid((x_i - c a_i) / T) = rho            (x, a at the initial logits)

r after the step falls monotonically in c (every a_i has the sign of r - rho), so bisection
finds c* to float precision. To first order (a small step) this is
c_lin = 1 / (2 sum_i w_i^2 (m_i (1 - m_i) / T)^2) -- which for tensors is S / (2 mean((m(1-m)/T)^2))
-- but the first step is not small (sigmoid saturates), so c* is larger: for the SD-1.5 UNet's 686
tensors, rho = 0.2, T = 0.2 and the authors' U[0, 1) initialisation, c_lin ~ 820 and
c* ~ 4.4e3-4.6e3 (the authors' 5e3); for the demo's 208 tensors at rho = 0.5, c* ~ 3e2-4e2.
When the initial soft ratio already equals rho, the first step is empty and c_lin is used.

**Projection** (``project_logits``): after the releaser's data step, shift every logit by one
common amount b so that sum_i w_i sigmoid((x_i + b) / T) = rho exactly. A common shift keeps the
order the data chose and never saturates logits to meet the budget. The soft ratio is monotone
in b, so a fixed number of bisection steps (vectorized, no host synchronisation) finds it.

Example:
    >>> import torch
    >>> w = torch.full((4,), 0.25)
    >>> x = project_logits(torch.tensor([0.0, 0.1, 0.2, 0.3]), w, ratio=0.5, temperature=0.2)
    >>> round(float((w * torch.sigmoid(x / 0.2)).sum()), 4)
    0.5
"""
from __future__ import annotations

import torch

# sigmoid(+-40) is 1 - 4e-18 / 4e-18: beyond this the soft mask is saturated in fp32 and fp64.
_SATURATION = 40.0
_BISECTION_STEPS = 64


def first_penalty_direction(x: torch.Tensor, weights: torch.Tensor, ratio: float,
                            temperature: float) -> torch.Tensor:
    """a_i of the module docstring: the first penalty step on the logits is c * a."""
    m = torch.sigmoid(x / temperature)
    realised = (weights * m).sum()
    return 2.0 * (realised - ratio) * weights * m * (1.0 - m) / temperature


def linear_c_sparsity(x: torch.Tensor, weights: torch.Tensor, temperature: float) -> float:
    """c_lin = 1 / (2 sum_i w_i^2 (m_i (1 - m_i) / T)^2): the first-order landing weight."""
    x, w = x.double(), weights.double()
    m = torch.sigmoid(x / temperature)
    curvature = float((w ** 2 * (m * (1.0 - m) / temperature) ** 2).sum())
    return 1.0 / (2.0 * curvature) if curvature > 0 else float("inf")


def auto_c_sparsity(x: torch.Tensor, weights: torch.Tensor, ratio: float, temperature: float) -> float:
    """The penalty weight c whose first step takes the soft ratio from its initial value to ``ratio``.

    ``x``: the initial logits [S]; ``weights``: the budget weights [S] (sum 1). Computed in fp64 on
    the CPU (S numbers, once per learner). Returns ``linear_c_sparsity`` when the initial soft
    ratio already equals ``ratio`` (nothing to land) or when no finite c reaches it (every
    logit saturated, or ``ratio`` 0 or 1).

    Example:
        >>> import torch
        >>> n = 686
        >>> x = (torch.arange(n, dtype=torch.float64) + 0.5) / n     # U[0, 1) quantiles
        >>> round(auto_c_sparsity(x, torch.full((n,), 1.0 / n), 0.2, 0.2), -2)
        4400.0
    """
    x, w = x.detach().double().cpu(), weights.detach().double().cpu()
    a = first_penalty_direction(x, w, ratio, temperature)
    start = float((w * torch.sigmoid(x / temperature)).sum())
    fallback = linear_c_sparsity(x, w, temperature)
    gap = start - ratio
    if abs(gap) <= 1e-12 or not bool((a != 0).any()):
        return fallback

    def overshoot(c: float) -> float:  # > 0 while the step has not yet reached rho
        return (float((w * torch.sigmoid((x - c * a) / temperature)).sum()) - ratio) * (1.0 if gap > 0 else -1.0)

    lo, hi = 0.0, max(fallback, 1.0) if fallback < float("inf") else 1.0
    while overshoot(hi) > 0:
        lo, hi = hi, hi * 2.0
        if hi > 1e15:
            return fallback
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if overshoot(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def project_logits(x: torch.Tensor, weights: torch.Tensor, ratio: float, temperature: float) -> torch.Tensor:
    """``x + b`` with the one common shift b for which sum_i w_i sigmoid((x_i + b) / T) = ratio.

    A new tensor; ``x`` is not modified. Bisection over b in a bracket wide enough to saturate
    every logit either way, in the logits' dtype and on their device, without host syncs. For
    ratio 0 or 1 the shift saturates every logit at the end of the bracket.
    """
    if x.numel() == 0:
        return x.clone()
    w = weights.to(dtype=x.dtype)
    lo = -x.max() - _SATURATION * temperature   # soft ratio ~ 0 here
    hi = -x.min() + _SATURATION * temperature   # soft ratio ~ 1 here
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        below = (w * torch.sigmoid((x + mid) / temperature)).sum() < ratio
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return x + 0.5 * (lo + hi)


__all__ = ["auto_c_sparsity", "linear_c_sparsity", "first_penalty_direction", "project_logits"]
