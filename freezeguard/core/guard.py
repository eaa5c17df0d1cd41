"""Enforcing a mask in a training script: :func:`guard` (fused AdamW) and :func:`wrap` (any optimizer).

``wrap`` does not subclass or proxy the optimizer: it returns the *same* object with step hooks
registered (``Optimizer.register_step_pre_hook`` / ``register_step_post_hook``). That is what
keeps it compatible with everything that inspects or patches an optimizer: accelerate's
``AcceleratedOptimizer`` (which swaps ``optimizer.step`` while a GradScaler is active), LR
schedulers (which wrap ``step`` to count calls), ``GradScaler.step`` and ``state_dict`` round
trips. The hooks run inside the class's ``step`` whatever wraps it from outside.

During each step the frozen parameters are *taken out of the param groups*, so the inner
optimizer cannot read their gradients, create state for them or decay them (some optimizers
apply weight decay or momentum to parameters without a fresh gradient); the groups are put back
right after, so ``state_dict`` / ``load_state_dict`` indices never change. Frozen parameters are
found by *name* on every step, so parameter objects replaced after wrapping (accelerate, FSDP
with ``use_orig_params=True``) and peft's renaming still map.

Example:
    >>> import torch, freezeguard as fg
    >>> model = torch.nn.Linear(3, 2)
    >>> mask = fg.FreezeMask.from_names(model, ["weight"])
    >>> opt = fg.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), mask, model)
    >>> w = model.weight.detach().clone(); _ = model.weight.requires_grad_(True)
    >>> model(torch.ones(1, 3)).sum().backward(); opt.step()
    >>> torch.equal(model.weight, w), model.weight in opt.state
    (True, False)
"""
from __future__ import annotations

import sys
import warnings
from typing import Any

import torch

from freezeguard.core.lean_convs import lean_frozen_convs_
from freezeguard.core.mask import FreezeMask
from freezeguard.core.names import check_no_frozen_adapters, frozen_parameter_ids
from freezeguard.core.optim import AdamW

__all__ = ["guard", "wrap", "unwrap", "live_mask"]

_ATTR = "_freezeguard_enforcer"
# The code object of the wrapper torch puts around every Optimizer subclass's ``step`` (the one
# that runs step hooks). An optimizer whose step calls ``super().step()`` runs the hooks once
# per level, so the hooks count these frames to act only at the outermost level.
_HOOKED_STEP_CODE = torch.optim.Optimizer.profile_hook_step(lambda *a, **k: None).__code__


def _step_depth(optimizer: torch.optim.Optimizer) -> int:
    depth, frame = 0, sys._getframe(1)
    while frame is not None:
        if frame.f_code is _HOOKED_STEP_CODE and frame.f_locals.get("self") is optimizer:
            depth += 1
        frame = frame.f_back
    return depth


def live_mask(model: torch.nn.Module, mask: FreezeMask) -> FreezeMask:
    """The mask re-keyed by the model's *current* parameter names (peft/DDP/compile renaming).

    Parameters the released model did not have (adapter weights) are trainable in the result.
    """
    frozen_ids = frozen_parameter_ids(model, mask)
    layout, frozen = {}, []
    for name, p in model.named_parameters():
        layout[name] = tuple(p.shape)
        if id(p) in frozen_ids:
            frozen.append(name)
    out = FreezeMask(layout, frozen, metadata=dict(mask.metadata))
    out.metadata.pop("model_fingerprint", None)  # layout differs from the released model's
    return out


def guard(model: torch.nn.Module, mask: FreezeMask, *, lean_frozen_convs: bool = False,
          **adamw_kwargs: Any) -> torch.optim.Optimizer:
    """Freeze the masked tensors of ``model`` and return :class:`freezeguard.core.optim.AdamW` over it.

    Refuses (FrozenAdapterError) when an adapter sits on a frozen module. ``adamw_kwargs`` go to
    ``fg.optim.AdamW`` (lr, betas, eps, weight_decay, backend). ``lean_frozen_convs=True`` also
    stops fully frozen ``Conv2d`` layers from keeping their input for backward
    (:func:`freezeguard.lean_frozen_convs_`): less activation memory, same gradients.

    Example:
        >>> import torch, freezeguard as fg
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = fg.guard(model, fg.FreezeMask.from_names(model, ["bias"]), lr=1e-3)
        >>> model.bias.requires_grad
        False
    """
    check_no_frozen_adapters(model, mask)
    resolved = live_mask(model, mask)
    resolved.apply_(model)
    optimizer = AdamW(model.named_parameters(), mask=resolved, **adamw_kwargs)
    if lean_frozen_convs:
        lean_frozen_convs_(model)
    return optimizer


def make_adamw(model: torch.nn.Module, mask: FreezeMask | None = None, *, lr: float, weight_decay: float = 1e-2,
               lean_frozen_convs: bool = False, **adamw_kwargs: Any) -> torch.optim.Optimizer:
    """The one optimizer factory of the applications: guarded when there is a mask, plain otherwise.

    With a mask: :func:`guard` (``fg.optim.AdamW``, frozen tensors untouched and stateless).
    Without: ``torch.optim.AdamW`` over the trainable parameters -- what an unguarded user runs,
    so full fine-tuning is measured against the optimizer people actually use.

    Example:
        >>> import torch
        >>> type(make_adamw(torch.nn.Linear(2, 2), lr=1e-3)).__name__
        'AdamW'
    """
    if mask is not None:
        return guard(model, mask, lr=lr, weight_decay=weight_decay, lean_frozen_convs=lean_frozen_convs,
                     **adamw_kwargs)
    if lean_frozen_convs:
        raise ValueError("lean_frozen_convs needs a mask (only frozen convs can drop their saved input)")
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **adamw_kwargs)


class _Enforcer:
    """The state behind one wrapped optimizer (kept on it as ``optimizer._freezeguard_enforcer``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, mask: FreezeMask, model: torch.nn.Module,
                 verify_unchanged: bool):
        self.optimizer, self.mask, self.model = optimizer, mask, model
        self.verify_unchanged = verify_unchanged
        self._saved_groups: list[list[torch.nn.Parameter]] | None = None
        self._snapshot: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._frozen: set[int] = set()
        self._frozen_key: tuple | None = None
        self._filtered: tuple | None = None
        self.handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
            optimizer.register_state_dict_pre_hook(lambda opt: self._restore_groups()),
            optimizer.register_load_state_dict_post_hook(lambda opt: self.drop_state()),
        ]

    def frozen_ids(self) -> set[int]:
        # Resolving names costs a few string operations per parameter (milliseconds on a UNet), so
        # the answer is kept while the mask and the optimizer's parameters (by identity) are the
        # same: replaced parameter objects (accelerate, FSDP) change the key and are resolved by
        # name again. A parameter swapped in the model alone cannot unfreeze anything: the
        # optimizer then holds the old object, whose frozen status is already known.
        key = (id(self.mask), [list(map(id, g["params"])) for g in self._groups_params()])
        if self._frozen_key is not None and key == self._frozen_key[0] and self.mask is self._frozen_key[1]:
            return self._frozen
        frozen = frozen_parameter_ids(self.model, self.mask)
        model_ids = {id(p) for p in self.model.parameters()}
        stray = sum(1 for g in self.optimizer.param_groups for p in g["params"] if id(p) not in model_ids)
        if stray:
            raise RuntimeError(f"freezeguard: the optimizer holds {stray} parameter(s) that are not in the "
                               f"model given to fg.wrap, so the mask cannot be enforced on them; wrap the "
                               f"optimizer with the model it trains (after accelerate/DDP wrapping is fine)")
        # the key holds the mask and (through the optimizer) the parameters: ids are not reused
        self._frozen, self._frozen_key = set(frozen), (key, self.mask)
        return self._frozen

    def _groups_params(self) -> list[dict[str, Any]]:
        if self._saved_groups is not None:  # inside a step: the full lists, not the filtered ones
            return [{"params": ps} for ps in self._saved_groups]
        return self.optimizer.param_groups

    def drop_state(self, frozen: set[int] | None = None) -> None:
        frozen = self.frozen_ids() if frozen is None else frozen
        for p in [p for p in self.optimizer.state if id(p) in frozen]:
            del self.optimizer.state[p]

    def _restore_groups(self) -> None:
        if self._saved_groups is not None:
            for group, params in zip(self.optimizer.param_groups, self._saved_groups, strict=True):
                group["params"] = params
            self._saved_groups = None

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if _step_depth(optimizer) > 1:
            return  # super().step() of a subclass: the outer level already filtered
        self._restore_groups()  # a previous step raised before its post hook ran
        frozen = self.frozen_ids()
        self.drop_state(frozen)
        self._saved_groups = [g["params"] for g in optimizer.param_groups]
        if self.verify_unchanged:
            self._snapshot = [(p, p.detach().clone()) for params in self._saved_groups
                              for p in params if id(p) in frozen]
        # the filtered lists are kept with the key they were made for, so a step that changes
        # nothing hands the inner optimizer the same list objects again
        # (the key lists every group's parameters, so an unchanged key means unchanged groups)
        if self._filtered is None or self._filtered[0] is not self._frozen_key:
            self._filtered = (self._frozen_key,
                              [[p for p in params if id(p) not in frozen] for params in self._saved_groups])
        for group, kept in zip(optimizer.param_groups, self._filtered[1], strict=True):
            group["params"] = kept

    def _post_step(self, optimizer, args, kwargs) -> None:
        if _step_depth(optimizer) > 1:
            return
        self._restore_groups()
        self.drop_state()
        changed = []
        for p, before in self._snapshot:
            if not torch.equal(p.detach(), before):
                with torch.no_grad():
                    p.copy_(before)
                changed.append(p)
        self._snapshot = []
        if changed:
            warnings.warn(f"freezeguard: {type(optimizer).__name__} wrote {len(changed)} frozen tensor(s) "
                          f"through a reference outside its param groups; they were restored", RuntimeWarning,
                          stacklevel=2)

    def remove(self) -> None:
        self._restore_groups()
        for h in self.handles:
            h.remove()


def wrap(optimizer: torch.optim.Optimizer, mask: FreezeMask, model: torch.nn.Module, *,
         apply: bool = True, verify_unchanged: bool = False) -> torch.optim.Optimizer:
    """Enforce ``mask`` around any ``torch.optim.Optimizer``; returns the same optimizer object.

    Frozen tensors stay bit-identical and get no optimizer state, even if ``requires_grad`` is
    set back to True and gradients exist. ``apply=True`` also sets ``requires_grad=False`` on
    them (no gradient memory). ``verify_unchanged=True`` additionally snapshots the frozen
    tensors around each step and restores (with a warning) any that an exotic optimizer wrote
    through a reference of its own; it costs one copy of the frozen tensors, so it is off by
    default. Wrapping again replaces the previous mask.

    Example:
        >>> import torch, freezeguard as fg
        >>> model = torch.nn.Linear(3, 2)
        >>> mask = fg.FreezeMask.from_names(model, ["bias"])
        >>> opt = fg.wrap(torch.optim.AdamW(model.parameters(), lr=1e-3), mask, model)
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"fg.wrap needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not getattr(type(optimizer).step, "hooked", False):
        raise TypeError(f"{type(optimizer).__name__}.step does not run optimizer step hooks (did its "
                        f"__init__ skip torch.optim.Optimizer.__init__?); fg.wrap cannot enforce a mask on it")
    check_no_frozen_adapters(model, mask)
    old = getattr(optimizer, _ATTR, None)
    if old is not None:
        old.remove()
    enforcer = _Enforcer(optimizer, mask, model, verify_unchanged)
    frozen = enforcer.frozen_ids()  # validates mask vs model and optimizer vs model now
    enforcer.drop_state(frozen)
    if apply:
        for p in model.parameters():
            if id(p) in frozen:
                p.requires_grad_(False)
    setattr(optimizer, _ATTR, enforcer)
    return optimizer


def unwrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Remove what :func:`wrap` installed (requires_grad flags are left as they are)."""
    enforcer = getattr(optimizer, _ATTR, None)
    if enforcer is not None:
        enforcer.remove()
        delattr(optimizer, _ATTR)
    return optimizer
