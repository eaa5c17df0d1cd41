"""The log entry of one learner step: what each field means and how it is computed.

``MaskLearner.step`` returns one entry per batch (``fit`` collects them; ``learner.history`` keeps
them all). Fields:

- step, kind ("releaser" or "user"), loss (the objective differentiated, ``apps.learn.objective``);
- target_loss, innocent_loss: the global batch's mean loss per group (None for an empty group),
  n_target, n_innocent: the group sizes;
- frozen_ratio: the share frozen by rounding the soft mask (m > 0.5, as the reference reports),
  soft_ratio: the budget's mean m, both weighted by ``budget_by`` (tensors or parameters);
- mask_moved, frozen_moved, frozen_moved_share: how far the data has moved the hard mask from the
  initial logits' one (``apps.learn.mask_rules.MaskMovement``; 0 means nothing reordered yet);
- live: logits with m (1 - m) > ``LIVE_LOGIT``, which can still move;
- updated (releaser steps; None on user steps): whether this batch ended an accumulation of
  ``signal_batches`` and stepped the logits;
- data_to_budget: median size of the logits' data step over that of their budget step, when this
  batch stepped the logits (None otherwise, and with the projected budget).

Example:
    >>> import torch
    >>> e = step_entry(0, "user", (2.0, 1.0, 0.0, 0.0, 2.0), torch.tensor([0.9, 0.2]),
    ...                torch.tensor([0.5, 0.5]), {"mask_moved": 0}, updated=False, data_to_budget=None)
    >>> e["target_loss"], e["innocent_loss"], e["frozen_ratio"], e["updated"]
    (2.0, None, 0.5, None)
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

LIVE_LOGIT = 0.01                 # a logit is "live" while m (1 - m) > this (it can still move)


def step_entry(step: int, kind: str, sums: Sequence[float], m: torch.Tensor, weights: torch.Tensor,
               movement: Mapping[str, Any], *, updated: bool, data_to_budget: float | None) -> dict[str, Any]:
    """The entry of step ``step``; ``sums`` are the global batch's (target loss sum, target count,
    innocent loss sum, innocent count, objective), ``m`` the soft mask after the step, ``weights``
    the budget's, ``movement`` ``MaskMovement.figures()``."""
    s_t, c_t, s_i, c_i, obj = sums
    return {
        "step": step, "kind": kind, "loss": obj,
        "target_loss": s_t / c_t if c_t else None, "innocent_loss": s_i / c_i if c_i else None,
        "n_target": int(c_t), "n_innocent": int(c_i),
        "frozen_ratio": float((weights * (m > 0.5)).sum()),
        "soft_ratio": float((weights * m).sum()),
        **movement,
        "live": int((m * (1.0 - m) > LIVE_LOGIT).sum()),
        "updated": updated if kind == "releaser" else None,
        "data_to_budget": data_to_budget if updated else None,
    }


__all__ = ["LIVE_LOGIT", "step_entry"]
