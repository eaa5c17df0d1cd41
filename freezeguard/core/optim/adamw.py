"""``fg.optim.AdamW``: torch.optim.AdamW that enforces a FreezeMask, with a fused update.

The update of every trainable tensor of a param group is one call of
``freezeguard.ops.masked_adamw_`` (one or a few kernel launches on compiled backends).
Frozen tensors are simply not passed to it, so they are never read or written and own no
optimizer state, whatever their ``.grad`` or ``requires_grad`` say.

This module is the optimizer itself: its mask, param groups, names and state. Beside it in
``core/optim/``: the step's three paths and the one place that picks among them (``steps.py``),
the cached plan they run over (``plan.py``), whether a mask fits the parameters
(``mask_checks.py``), what ``load_state_dict`` refuses (``state_dict_checks.py``), memory
shared between tensors (``aliasing.py``) and the input checks (``checks.py``).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from freezeguard import ops
from freezeguard.core.mask import FreezeMask
from freezeguard.core.optim import plan as _plan
from freezeguard.core.optim import steps
from freezeguard.core.optim.aliasing import check_no_alias
from freezeguard.core.optim.checks import (
    check_backend_name,
    check_hyperparameters,
    check_options,
    check_param_tensor,
    split_named,
)
from freezeguard.core.optim.mask_checks import check_mask
from freezeguard.core.optim.state_dict_checks import check_state_dict


class AdamW(torch.optim.Optimizer):
    """Drop-in ``torch.optim.AdamW`` that keeps the tensors frozen by a ``FreezeMask`` untouched.

    Same math, defaults, param groups and ``state_dict`` layout as ``torch.optim.AdamW``
    (per-parameter state ``step`` / ``exp_avg`` / ``exp_avg_sq``, ``step`` a float32 CPU
    scalar tensor), so state dicts load into either optimizer for the trainable parameters.

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``), or param-group
            dicts whose ``"params"`` may be either. A ``mask`` needs names.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        mask: a ``FreezeMask``; its frozen tensors are skipped entirely. Every frozen name must
            be among the parameters (``KeyError`` otherwise). Change it with :meth:`set_mask`.
        backend: ``"auto"`` (best for the parameters' device), ``"torch"``, ``"cpp"``,
            ``"triton"`` or ``"cuda"``; a forced backend that cannot run raises at construction.
        capturable: keep each tensor's step count on its device and read ``lr`` (pass a
            one-element tensor) on the device too, so a whole step can be recorded in a CUDA graph
            (``torch.cuda.graph``) and replayed; on the CPU it runs like the default.
        amsgrad, maximize, differentiable: only ``False`` is supported
            (``NotImplementedError`` otherwise).
        foreach, fused: accepted for compatibility and ignored: the update is always the fused
            freezeguard op.

    A step reuses a cached plan (``core/optim/plan.py``: the trainable lists and their state) as
    long as the mask, the param groups and the state are the same objects; it reads only the
    gradients, which may be fresh tensors every step.

    Each tensor keeps its own step count, so a tensor that becomes trainable later starts its
    bias correction at step 1. Non-finite gradients propagate into the parameters exactly as
    in ``torch.optim.AdamW``; skipping such steps is the grad scaler's job
    (``torch.amp.GradScaler.step`` skips ``optimizer.step()`` when it found inf/NaN).

    Example:
        >>> import torch, freezeguard as fg
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        >>> mask = fg.FreezeMask.from_names(model, ["0.weight"])
        >>> opt = fg.optim.AdamW(model.named_parameters(), lr=1e-2, mask=mask)
        >>> before = model[0].weight.clone()
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step()
        >>> torch.equal(model[0].weight, before), len(opt.state[model[0].weight])
        (True, 0)
    """

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 mask: FreezeMask | None = None, backend: str = "auto", amsgrad: bool = False,
                 maximize: bool = False, foreach: bool | None = None, fused: bool | None = None,
                 capturable: bool = False, differentiable: bool = False) -> None:
        betas = check_hyperparameters(lr, betas, eps, weight_decay)
        if isinstance(lr, torch.Tensor) and lr.dim():
            lr = lr.reshape(())
        options = dict(amsgrad=amsgrad, maximize=maximize, capturable=capturable, differentiable=differentiable)
        check_options(options)
        self.backend = check_backend_name(backend)
        self._mask: FreezeMask | None = None
        # id(parameter) -> the name it was given: names are bound to the parameter objects, so
        # nothing that rewrites a group's "param_names" later (a state dict) can move the mask.
        self._bound: dict[int, str] = {}
        # Set by fg.guard: re-checks that no adapter hangs on a frozen module of the guarded model
        # whenever parameters come in (add_param_group, groups edited in place).
        self._adapter_check: Callable[[], None] | None = None
        # The same keys as torch.optim.AdamW's defaults, so param groups (and state dicts)
        # are interchangeable; the backend and the mask live on the optimizer, not in groups.
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused,
                        decoupled_weight_decay=True, **options)
        super().__init__(params, defaults)
        check_mask(mask, self.param_groups)
        self._mask = mask
        self._mark_checked()
        for device in {p.device for g in self.param_groups for p in g["params"]}:
            ops.check_backend(self.backend, device)  # a forced backend that cannot run says why, now

    # mask ---------------------------------------------------------------------------------
    @property
    def mask(self) -> FreezeMask | None:
        """The FreezeMask in force (None: every parameter is trainable)."""
        return self._mask

    def set_mask(self, mask: FreezeMask | None) -> None:
        """Replace the mask between steps.

        Newly frozen tensors drop their state; newly trainable ones start at step 0.
        """
        check_mask(mask, self.param_groups)
        self._mask = mask
        self._mark_checked()
        self._drop_frozen_state()
        self.invalidate_step_plan()

    def invalidate_step_plan(self) -> None:
        """Forget the cached step plan; the next step rebuilds it.

        Every change made through the optimizer (``set_mask``, ``add_param_group``,
        ``load_state_dict``) or to its param groups and state dict is noticed without this; it is
        only needed after swapping a state tensor inside one entry (``opt.state[p]["exp_avg"] = t``).
        """
        self._plan = None

    def _frozen_flags(self, group: dict[str, Any]) -> list[bool]:
        if self._mask is None:
            return [False] * len(group["params"])
        bound, is_frozen = self._bound, self._mask.is_frozen
        names = group.get("param_names") or [None] * len(group["params"])
        # Frozen by the name the parameter was bound to, or by the name its group says now.
        return [is_frozen(bound.get(id(p), n)) or (n is not None and is_frozen(n))
                for p, n in zip(group["params"], names, strict=True)]

    def _rebind(self) -> None:
        self._bound = {id(p): n for g in self.param_groups if g.get("param_names") is not None
                       for p, n in zip(g["params"], g["param_names"], strict=True)}

    def _drop_frozen_state(self) -> None:
        for group in self.param_groups:
            for p, frozen in zip(group["params"], self._frozen_flags(group), strict=True):
                if frozen:
                    self.state.pop(p, None)

    # param groups and state ---------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, as torch does; every check runs before the group is added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        if not isinstance(param_group["params"], (torch.Tensor, set)):
            param_group["params"] = list(param_group["params"])  # a generator must survive two passes
        tensors, names = split_named(param_group["params"])
        for i, p in enumerate(tensors):
            check_param_tensor(p, f"parameter {names[i]!r}" if names else f"params[{i}]")
        merged = {**getattr(self, "defaults", {}), **param_group}
        check_hyperparameters(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"])
        check_options(merged, "fg.optim.AdamW param group")
        if self._mask is not None and names is None:
            raise ValueError("this optimizer enforces a FreezeMask, so added params need names: "
                             "pass (name, tensor) pairs")
        if self._mask is not None and names is not None:
            check_mask(self._mask, [*self.param_groups, {"params": tensors, "param_names": names}])
        if getattr(self, "_adapter_check", None) is not None:
            self._adapter_check()  # e.g. a LoRA injected on a frozen module after fg.guard
        checked = getattr(self, "_checked", None)
        super().add_param_group(param_group)
        self._plan = None
        if checked is not None and self._mask is not None:  # the new group went through _check_mask
            self._mark_checked()
        if names is not None:
            for p, n in zip(tensors, names, strict=True):
                self._bound.setdefault(id(p), n)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_mask"] = self._mask
        state["backend"] = self.backend
        # The bound names travel by position: ids differ in a copy, and the groups' param_names may
        # have been edited since binding (a copy must not take the edited names as the truth).
        state["_bound"] = [[self._bound.get(id(p)) for p in g["params"]] for g in self.param_groups]
        state.pop("_plan", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        bound = state.pop("_bound", None)
        super().__setstate__(state)
        self.__dict__.setdefault("_mask", None)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("_adapter_check", None)
        self._rebind()  # ids differ after a copy or unpickling
        if isinstance(bound, list) and len(bound) == len(self.param_groups):
            for group, names in zip(self.param_groups, bound, strict=True):
                if isinstance(names, list) and len(names) == len(group["params"]):
                    self._bound.update({id(p): n for p, n in zip(group["params"], names, strict=True)
                                        if n is not None})
        for group in self.param_groups:  # groups from older or foreign state dicts
            for key, value in (("amsgrad", False), ("maximize", False), ("foreach", None), ("capturable", False),
                               ("differentiable", False), ("fused", None)):
                group.setdefault(key, value)
            group["decoupled_weight_decay"] = True  # AdamW, whatever the loaded group said

    def state_dict(self) -> dict[str, Any]:
        """As torch's, with each group's ``param_names`` a copy (editing the result changes nothing here)."""
        out = super().state_dict()
        for group in out["param_groups"]:
            if isinstance(group.get("param_names"), list):
                group["param_names"] = list(group["param_names"])
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of ``torch.optim.AdamW``.

        Checked before anything is loaded: unsupported options, step counts and, under a mask,
        that the saved ``param_names`` are this optimizer's (names stay bound to the parameter
        objects; a state dict cannot rename, swap or move them) and that no saved state tensor
        shares memory with a frozen tensor. Frozen tensors' state is dropped.
        """
        frozen = [p for g in self.param_groups for p, f in zip(g["params"], self._frozen_flags(g), strict=True)
                  if f] if self._mask is not None else []
        check_state_dict(state_dict, self.param_groups, frozen, masked=self._mask is not None)
        ours_names = [g.get("param_names") for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, names in zip(self.param_groups, ours_names, strict=True):
            if names is not None:
                group["param_names"] = list(names)  # ours, bound to the parameter objects
        for st in self.state.values():
            if isinstance(st, dict) and "step" in st:
                # a fresh float32 CPU scalar, as torch keeps it when neither fused nor capturable:
                # reading it each step costs no device sync, and it aliases nothing in the source.
                st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)
        self._drop_frozen_state()

    # the update ---------------------------------------------------------------------------
    def _step_plan(self) -> _plan.StepPlan:
        plan = getattr(self, "_plan", None)
        if plan is None or not plan.still_valid(self._mask, self.state, self.param_groups):
            self._check_groups()
            plan = self._plan = _plan.build(self.param_groups, self.state, self._mask, self._frozen_flags)
        return plan

    def _check_groups(self) -> None:
        """Before a (re)built plan is trusted: no trainable tensor shares memory with a frozen one and,
        under fg.guard, no adapter hangs on a frozen module. Groups edited in place (a view of a frozen
        weight appended under a new name) reach here, since the plan keys on the tensors' identity."""
        signature = [list(map(id, g["params"])) for g in self.param_groups]
        if self._mask is None or signature == getattr(self, "_checked", None):
            return  # the tensors _check_mask saw (construction, add_param_group, set_mask): nothing to redo
        frozen, trainable = [], []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, (p, f) in enumerate(zip(group["params"], self._frozen_flags(group), strict=True)):
                if f:
                    frozen.append(p)
                else:
                    trainable.append((names[i] if names else f"param_groups[{gi}]['params'][{i}]", p))
        check_no_alias(frozen, trainable)
        if getattr(self, "_adapter_check", None) is not None:
            self._adapter_check()
        self._checked = signature

    def _mark_checked(self) -> None:
        self._checked = [list(map(id, g["params"])) for g in self.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW step of every trainable tensor that has a gradient; returns closure()."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            check_options(group, f"param group {gi}")
        steps.run(self._step_plan(), self.state, self.backend)  # the three step paths: core/optim/steps.py
        return loss


__all__ = ["AdamW"]
