"""From logits to a hard mask: the rules, and how far the data has moved the mask.

The learner's logits rank the tensors; a :class:`~freezeguard.core.mask.FreezeMask` needs a yes / no
per tensor. Two rules (``HARD_MASK_RULES``): ``"topk"`` freezes the highest logits until the budget
is met exactly (by tensor count or parameter count); ``"threshold"`` freezes every tensor whose soft
mask exceeds 0.5, as the authors' final ``np.round`` does, which only approximates the budget.

:func:`movement` measures how many tensors the top-k mask of the current logits treats
differently from that of the initial logits: 0 means the data has reordered nothing, and the
"learned" mask is the random start (the learner warns about it after a run). A learner keeps its
latest figures in a :class:`MaskMovement`.

Example:
    >>> import torch
    >>> sizes = {"a": 4, "b": 4, "c": 8}
    >>> sorted(topk_frozen(["a", "b", "c"], torch.tensor([0.9, 0.1, 0.5]), sizes, 0.5, "params"))  # c overshoots
    ['a', 'b']
    >>> movement(frozenset({"a"}), frozenset({"b"}), sizes, "tensors")
    (2, 1, 1.0)
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import torch

from freezeguard.apps.learn.logits import soft_mask
from freezeguard.core.mask import FreezeMask, select_budget

HARD_MASK_RULES = ("topk", "threshold")
# Former names: refused with an error naming the current one, so that old scripts stop and say
# what to write instead, rather than run under an alias.
RENAMED_RULES = {"round": "threshold"}


def check_rule(rule: str) -> str:
    """``rule`` when it is one of ``HARD_MASK_RULES``; a ValueError otherwise.

    Example:
        >>> check_rule("round")
        Traceback (most recent call last):
        ...
        ValueError: unknown hard-mask rule 'round': it was renamed to 'threshold'
    """
    if rule in RENAMED_RULES:
        raise ValueError(f"unknown hard-mask rule {rule!r}: it was renamed to {RENAMED_RULES[rule]!r}")
    if rule not in HARD_MASK_RULES:
        raise ValueError(f"unknown hard-mask rule {rule!r}: the rules are {', '.join(HARD_MASK_RULES)}")
    return rule


def topk_frozen(names: Sequence[str], logits: torch.Tensor, sizes: Mapping[str, int], ratio: float,
                budget_by: str) -> frozenset[str]:
    """The names the ``"topk"`` rule freezes for these logits (ties go to names, as in
    ``FreezeMask.from_scores``)."""
    values = logits.tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], names[i]))
    return frozenset(select_budget([names[i] for i in order], sizes, ratio, budget_by))


def movement(initial: frozenset[str], now: frozenset[str], sizes: Mapping[str, int],
             budget_by: str) -> tuple[int, int, float]:
    """(mask_moved, frozen_moved, frozen_moved_share) of the hard mask ``now`` against ``initial``.

    mask_moved: tensors treated differently; frozen_moved: initially frozen tensors no longer
    frozen; frozen_moved_share: their share of the initially frozen set in the budget's unit
    (tensors or parameters)."""
    left = initial - now
    unit = (lambda n: 1) if budget_by == "tensors" else sizes.__getitem__
    total = sum(unit(n) for n in initial)
    return len(now ^ initial), len(left), (sum(unit(n) for n in left) / total if total else 0.0)


class MaskMovement:
    """How far the data has moved a learner's top-k hard mask from its initial logits' one.

    ``update(initial, logits)`` after each logit step; ``figures()`` gives the log's mask_moved,
    frozen_moved and frozen_moved_share (all 0 before the first update). With the authors'
    c_sparsity and temperature, a small model's budget term can saturate every logit in the
    first releaser step while keeping their initial order: the "learned" mask is then the random
    initial ranking (see benchmarks/RESULTS.md, demo calibration); these figures show it.

    Example:
        >>> import torch
        >>> tracker = MaskMovement(["a", "b"], {"a": 1, "b": 1}, 0.5, "tensors")
        >>> tracker.update(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
        >>> tracker.figures()
        {'mask_moved': 2, 'frozen_moved': 1, 'frozen_moved_share': 1.0}
    """

    def __init__(self, names: Sequence[str], sizes: Mapping[str, int], ratio: float, budget_by: str):
        self.names, self.sizes, self.ratio, self.budget_by = list(names), dict(sizes), ratio, budget_by
        self._initial_frozen: frozenset[str] | None = None  # the hard mask of the initial logits
        self.mask_moved, self.frozen_moved, self.frozen_moved_share = 0, 0, 0.0

    def update(self, initial: torch.Tensor, logits: torch.Tensor) -> None:
        """Measure ``logits`` against ``initial`` (whose hard mask is computed once and kept)."""
        if self._initial_frozen is None:
            self._initial_frozen = self._frozen(initial)
        self.mask_moved, self.frozen_moved, self.frozen_moved_share = movement(
            self._initial_frozen, self._frozen(logits), self.sizes, self.budget_by)

    def figures(self) -> dict[str, Any]:
        return {"mask_moved": self.mask_moved, "frozen_moved": self.frozen_moved,
                "frozen_moved_share": self.frozen_moved_share}

    def _frozen(self, logits: torch.Tensor) -> frozenset[str]:
        return topk_frozen(self.names, logits, self.sizes, self.ratio, self.budget_by)


def build(module: torch.nn.Module, names: Sequence[str], logits: torch.Tensor, rule: str, *, ratio: float,
          budget_by: str, temperature: float, learning: Mapping[str, Any]) -> FreezeMask:
    """The FreezeMask of ``rule`` (already checked) on ``module``, with the metadata FreezeMask.save
    understands (source, budget_by, target_ratio, and ``learning`` as a JSON string)."""
    if rule == "topk":
        mask = FreezeMask.from_scores(module, dict(zip(names, logits.tolist(), strict=True)), ratio, by=budget_by)
    else:
        m = soft_mask(logits, temperature).tolist()
        mask = FreezeMask.from_names(module, [n for n, v in zip(names, m, strict=True) if v > 0.5])
    mask.metadata.update({"source": "mask_learner", "budget_by": budget_by, "target_ratio": repr(ratio),
                          "learning": json.dumps(dict(learning), sort_keys=True)})
    return mask


__all__ = ["HARD_MASK_RULES", "RENAMED_RULES", "check_rule", "topk_frozen", "movement", "MaskMovement",
           "build"]
