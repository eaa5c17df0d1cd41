"""The cached step plan of ``fg.optim.AdamW``: what one step needs that does not change between steps.

Per (param group, device) a *unit*: the trainable tensors of the group and, once they have
state, their ``exp_avg`` / ``exp_avg_sq`` / ``step`` tensors as ready-made lists. Building it
reads the mask for every tensor and every state dict (about a millisecond on a 686-tensor
UNet); a step then only reads each tensor's ``.grad`` and hands the lists to one fused op.

The plan is rebuilt whenever a cheap check says something it encodes may have changed:

* the mask object (``set_mask`` also drops the plan; a ``FreezeMask`` is immutable);
* the param groups: the same group dicts, the same ``param_names`` lists, and the same tensors
  in each group (compared by identity, ``list(map(id, ...))``: ~15 us for 686 tensors; the plan
  holds references, so an id cannot be reused while it lives);
* the state: the same ``optimizer.state`` object (``load_state_dict`` replaces it) with the same
  number of entries (``state.clear()``, a ``del``, or state planted for a frozen tensor change it);
* which trainable tensors have a gradient: gradients are fresh tensors every step
  (``zero_grad(set_to_none=True)``), so the plan never keys on them; a tensor whose ``.grad`` is
  None this step is simply left out of this step's lists (a sub-list cached per pattern).

What it cannot see is a state tensor swapped inside one entry (``opt.state[p]["exp_avg"] = t``)
behind the optimizer's back; :meth:`fg.optim.AdamW.invalidate_step_plan` is for that. Shapes,
dtypes and devices of parameters, gradients and states are checked on every step anyway (in
the fused op, natively on the cpp backend), so ``model.to(dtype)`` after a step is still caught.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


@dataclass
class Unit:
    """The trainable tensors of one param group on one device."""

    group: dict[str, Any]
    gi: int
    idx: list[int]                      # positions in group["params"]
    params: list[torch.Tensor]
    # present-pattern (None: every tensor has a grad) -> (idx, params, exp_avgs, exp_avg_sqs, counters)
    lists: dict[tuple[int, ...] | None, tuple[list[int], list[torch.Tensor], list[torch.Tensor],
                                               list[torch.Tensor], list[torch.Tensor]]] = field(default_factory=dict)
    # the every-tensor-has-a-grad lists, prepared for ops.try_masked_adamw_step_ once they ran
    prepared: Any = None
    # DTensor parameters (FSDP2): the fused op runs on their local shards, mapped every step
    sharded: bool = False


@dataclass
class StepPlan:
    mask: Any
    state: dict
    state_len: int
    groups: list[tuple[dict[str, Any], Any, list[int]]]   # (group, its param_names, ids of its params)
    units: list[Unit]
    failed: bool = False   # a step failed on the general path: rebuild, checking every group again

    def still_valid(self, mask: Any, state: dict, param_groups: list[dict[str, Any]]) -> bool:
        if self.failed or mask is not self.mask or state is not self.state or len(state) != self.state_len:
            return False
        if len(param_groups) != len(self.groups):
            return False
        for group, (g0, names, ids) in zip(param_groups, self.groups, strict=True):
            if group is not g0 or group.get("param_names") is not names or list(map(id, group["params"])) != ids:
                return False
        return True


def build(param_groups: list[dict[str, Any]], state: dict, mask: Any,
          frozen_flags: Callable[[dict[str, Any]], list[bool]]) -> StepPlan:
    """The plan for these groups; drops any state of frozen tensors on the way."""
    units: list[Unit] = []
    for gi, group in enumerate(param_groups):
        by_device: dict[torch.device, Unit] = {}
        for i, (p, frozen) in enumerate(zip(group["params"], frozen_flags(group), strict=True)):
            if frozen:
                state.pop(p, None)  # frozen tensors own no state, however it got there
                continue
            unit = by_device.get(p.device)
            if unit is None:
                unit = by_device[p.device] = Unit(group, gi, [], [])
            unit.idx.append(i)
            unit.params.append(p)
            unit.sharded = unit.sharded or is_dtensor(p)
        units.extend(by_device.values())
    groups = [(g, g.get("param_names"), list(map(id, g["params"]))) for g in param_groups]
    return StepPlan(mask, state, len(state), groups, units)


def is_dtensor(t: Any) -> bool:
    """A DTensor (FSDP2's sharded parameters and their grads and state), found without importing it."""
    return is_traceable_wrapper_subclass(t) and callable(getattr(t, "to_local", None))


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing its storage: in-place updates land in it), else t."""
    return t.to_local() if is_dtensor(t) else t


__all__ = ["StepPlan", "Unit", "build", "is_dtensor", "local"]
