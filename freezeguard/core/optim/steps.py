"""How ``fg.optim.AdamW`` runs a step: three paths, picked in one place (:func:`run`).

1. **Prepared** (``ops.try_masked_adamw_step_``): when every unit of the plan has run once with a
   gradient for each of its tensors (its lists are then prepared, ``Unit.prepared``), ``lr`` is a
   number and the backend declares a prepared path (cpp): one native call per unit, which reads
   the ``.grad`` s itself and converts no list. It refuses, writing nothing, whatever it does not
   handle, and the step goes on down path 2 or 3.
2. **Capturable** (``ops.masked_adamw_step_`` running ``masked_adamw_capturable_``): a group with
   ``capturable=True`` keeps its step counts on the parameters' device and, with a one-element
   ``lr`` tensor there, reads ``lr`` there too (:func:`learning_rate`), so nothing is read on the
   host and the step can be recorded in a CUDA graph.
3. **Generic** (``ops.masked_adamw_step_`` running ``masked_adamw_``): everything else; the
   backend's native whole-step call (``AdamWFastPaths.native_step``) takes the common case.

Paths 2 and 3 share this module's code: which one a unit takes is decided inside
``ops.masked_adamw_step_`` by where its counters and ``lr`` live. Either way nothing is half
applied: every unit is checked before the first one writes, and state created for the step is
removed again if it fails. Every path computes torch.optim.AdamW's update: tests/test_optim_adamw.py
(a step after the first takes path 1 on the cpp backend), tests/test_capturable.py (path 2) and
tests/test_step_plan.py compare them step by step.
"""
from __future__ import annotations

from typing import Any

import torch

from freezeguard import ops
from freezeguard.core.optim import plan as _plan
from freezeguard.core.optim.checks import check_grad_and_state
from freezeguard.ops import native_shortcuts as _shortcuts

Lists = tuple[list[int], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def run(plan: _plan.StepPlan, state: dict, backend: str) -> None:
    """One AdamW step of every trainable tensor of ``plan`` that has a gradient (see the module docstring)."""
    if prepared_step(plan.units, backend):
        return
    general_step(plan, state, backend)


def learning_rate(group: dict[str, Any], device: torch.device) -> float | torch.Tensor:
    """The group's lr as the step reads it: a number, or (capturable, lr on ``device``) the tensor."""
    lr = group["lr"]
    if not isinstance(lr, torch.Tensor):
        return float(lr)
    if group.get("capturable") and lr.device == device:
        return lr  # read on the device: a captured step follows in-place changes of lr
    return float(lr)


def hyperparameters(unit: _plan.Unit, backend: str) -> dict[str, Any]:
    """The keyword arguments of the fused op for ``unit``'s group."""
    group = unit.group
    beta1, beta2 = group["betas"]
    return dict(lr=learning_rate(group, unit.params[0].device), betas=(float(beta1), float(beta2)),
                eps=float(group["eps"]), weight_decay=float(group["weight_decay"]), backend=backend)


def prepared_step(units: list[_plan.Unit], backend: str) -> bool:
    """Path 1: the whole step through ops.try_masked_adamw_step_ (one native call per unit), if it can run.

    False, with nothing written, sends the step down the general path (a missing grad, a
    tensor lr, a backend without a prepared path, any input that needs the full checks).
    """
    if not units or any(u.prepared is None for u in units):
        return False
    hypers = [hyperparameters(u, backend) for u in units]
    if len(units) > 1 and not all(ops.try_masked_adamw_step_(u.prepared, check_only=True, **hp)
                                  for u, hp in zip(units, hypers, strict=True)):
        return False  # nothing half-applied: every unit must be able to run before the first does
    for k, (u, hp) in enumerate(zip(units, hypers, strict=True)):
        if not ops.try_masked_adamw_step_(u.prepared, **hp):
            if k:  # checked above; only something changing under our feet gets here
                raise RuntimeError("fg.optim.AdamW: a parameter group changed in the middle of a step")
            return False
    return True


def general_step(plan: _plan.StepPlan, state: dict, backend: str) -> None:
    """Paths 2 and 3: ``ops.masked_adamw_step_`` per unit, over the tensors that have a gradient.

    Creates the state of tensors stepped for the first time, and removes it again if the step
    fails (and marks the plan failed, so that the next step rebuilds it); a unit whose every
    tensor had a gradient gets its lists prepared for path 1."""
    fresh: list[torch.Tensor] = []
    try:
        work = []
        for unit in plan.units:
            grads = [p.grad for p in unit.params]
            lists, present = unit_lists(unit, grads, state, fresh)
            if lists[1]:
                if present is not None:
                    grads = [grads[k] for k in present]
                work.append((unit, lists, present, grads))
        if len(work) > 1:
            # Nothing half-applied: ops.masked_adamw_step_ validates its whole list before
            # writing, so only the later units need checking before the first one runs.
            for unit, *_ in work:
                ops.check_backend(backend, unit.params[0].device)  # a backend that cannot run fails first
            for unit, lists, _, grads in work[1:]:
                fast = _shortcuts.fast_check([lists[1], grads, lists[2], lists[3]])
                if not (fast and fast[0]):
                    check_unit(unit, lists[0], lists[1], state)
        for unit, lists, present, grads in work:
            _run_unit(unit, lists, grads, state, backend)
            unit.lists.setdefault(present, lists)
            if present is None and unit.prepared is None and not unit.sharded:
                unit.prepared = ops.PreparedAdamW(*lists[1:])
    except BaseException:
        for p in fresh:  # leave the state as it was
            state.pop(p, None)
        plan.failed = True
        raise
    if fresh:
        plan.state_len = len(state)


def unit_lists(unit: _plan.Unit, grads: list[torch.Tensor | None], state: dict,
               fresh: list[torch.Tensor]) -> tuple[Lists, tuple[int, ...] | None]:
    """((idx, params, exp_avgs, exp_avg_sqs, step counters), present) of the unit's tensors that
    have a grad (``present``: their positions, None for all).

    Creates missing state (recorded in ``fresh``); cached per pattern of missing grads.
    """
    present = None
    for g in grads:
        if g is None:
            present = tuple(k for k, g in enumerate(grads) if g is not None)
            break
    lists = unit.lists.get(present)
    if lists is not None:
        return lists, present
    capturable = bool(unit.group.get("capturable"))
    picked = range(len(unit.params)) if present is None else present
    idx, params, exp_avgs, exp_avg_sqs, counters = [], [], [], [], []
    for k in picked:
        p = unit.params[k]
        st = state[p]
        if not st:
            # path 2 keeps the count on the parameters' device
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if capturable else None)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            fresh.append(p)
        elif capturable and isinstance(st.get("step"), torch.Tensor) and st["step"].device != p.device:
            st["step"] = st["step"].to(device=p.device, dtype=torch.float32)  # e.g. loaded on the CPU
        idx.append(unit.idx[k])
        params.append(p)
        exp_avgs.append(st.get("exp_avg"))
        exp_avg_sqs.append(st.get("exp_avg_sq"))
        counters.append(st.get("step"))
    return (idx, params, exp_avgs, exp_avg_sqs, counters), present


def check_unit(unit: _plan.Unit, idx: list[int], params: list[torch.Tensor], state: dict) -> None:
    """Raise a clear error naming the first parameter whose grad or state does not fit."""
    names = unit.group.get("param_names")
    for i, p in zip(idx, params, strict=True):
        label = f"parameter {names[i]!r}" if names else f"param_groups[{unit.gi}]['params'][{i}]"
        check_grad_and_state(p, p.grad, state.get(p, {}), label)


def _run_unit(unit: _plan.Unit, lists: Lists, grads: list[torch.Tensor], state: dict, backend: str) -> None:
    idx, params, exp_avgs, exp_avg_sqs, counters = lists
    if unit.sharded:
        # FSDP2: every rank updates its own shards, which is exactly AdamW (elementwise); the
        # state stays DTensors (sharded like the parameters) for distributed checkpoints.
        loc = _plan.local
        params, grads = [loc(t) for t in params], [loc(t) for t in grads]
        exp_avgs, exp_avg_sqs = [loc(t) for t in exp_avgs], [loc(t) for t in exp_avg_sqs]
    try:
        ops.masked_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, counters, **hyperparameters(unit, backend))
    except Exception as exc:
        try:
            check_unit(unit, idx, params, state)
        except Exception as clearer:  # the same problem, said with the parameter's name
            raise clearer from exc
        raise


__all__ = ["run", "learning_rate", "hyperparameters", "prepared_step", "general_step", "unit_lists", "check_unit"]
