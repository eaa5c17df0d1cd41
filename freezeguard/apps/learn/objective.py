"""What a learner step differentiates, from the per-sample losses of one batch.

Releaser step: L = (w * mean loss on innocent samples - mean loss on target samples) / 2
(docs/DESIGN.md section 4; w = ``innocent_weight``, the authors' 1). A group absent from the
batch contributes 0, as in the authors' loop (their means divide by count + 1e-5). User step:
the mean loss over the whole batch.

Beside the objective comes the batch's statistics as one fp32 vector (target sum and count,
innocent sum and count, the objective, the number of non-finite losses), which
``distributed.loss_stats`` sums over the ranks so that every rank logs, and stops on, the same
global batch.

Example:
    >>> import torch
    >>> losses, flags = torch.tensor([1.0, 3.0, 2.0]), torch.tensor([True, False, False])
    >>> objective, stats = batch_objective(losses, flags, "releaser", innocent_weight=1.0)
    >>> float(objective), stats.tolist()
    (0.75, [1.0, 1.0, 5.0, 2.0, 0.75, 0.0])
"""
from __future__ import annotations

import torch


def batch_objective(losses: torch.Tensor, flags: torch.Tensor, kind: str, *,
                    innocent_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective to call ``backward`` on, detached fp32 stats [6]) of a ``kind`` step
    ("releaser" or "user"); ``flags`` is the batch's bool "is_target" [B]."""
    t = flags.to(device=losses.device, dtype=losses.dtype)
    n_t, n_i = t.sum(), (1.0 - t).sum()
    sum_t, sum_i = (losses * t).sum(), (losses * (1.0 - t)).sum()
    mean_t, mean_i = sum_t / n_t.clamp(min=1.0), sum_i / n_i.clamp(min=1.0)
    objective = (innocent_weight * mean_i - mean_t) / 2.0 if kind == "releaser" else losses.mean()
    bad_losses = (~torch.isfinite(losses.detach())).sum()
    stats = torch.stack([sum_t.detach(), n_t, sum_i.detach(), n_i, objective.detach(), bad_losses]).float()
    return objective, stats


__all__ = ["batch_objective"]
