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
import weakref
from typing import Any, Iterable, Iterator

import torch

from freezeguard.core.adapters import (
    Placement,
    adapter_parameter_ids,
    check_no_frozen_adapters,
    find_adapters,
    unknown_parameters,
)
from freezeguard.core.lean_convs import lean_frozen_convs_
from freezeguard.core.mask import FreezeMask
from freezeguard.core.names import frozen_parameter_ids
from freezeguard.core.optim import AdamW
from freezeguard.core.optim.aliasing import check_no_alias

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


def guard(model: torch.nn.Module, mask: FreezeMask, *, adapters: Any = None, others: Iterable[torch.nn.Module] = (),
          lean_frozen_convs: bool = False, **adamw_kwargs: Any) -> torch.optim.Optimizer:
    """Freeze the masked tensors of ``model`` and return :class:`freezeguard.core.optim.AdamW` over it.

    Refuses (FrozenAdapterError) when an adapter sits on a frozen module: peft layers, and adapter
    networks that patch the model's modules (kohya, LyCORIS, ai-toolkit, OneTrainer), found on the
    model or in ``adapters`` (a network not registered under the model; its adapter parameters
    are optimized too). ``others`` are models the mask does not cover (text encoders): their
    parameters are optimized freely. ``adamw_kwargs`` go to ``fg.optim.AdamW`` (lr, betas, eps,
    weight_decay, backend). ``lean_frozen_convs=True`` also stops fully frozen ``Conv2d`` layers
    from keeping their input for backward (:func:`freezeguard.lean_frozen_convs_`).

    Example:
        >>> import torch, freezeguard as fg
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = fg.guard(model, fg.FreezeMask.from_names(model, ["bias"]), lr=1e-3)
        >>> model.bias.requires_grad
        False
    """
    others = tuple(others)
    placements = _checked_placements(model, mask, adapters, others)
    resolved = live_mask(model, mask)
    resolved.apply_(model)
    named = list(model.named_parameters())
    seen = {id(p) for _, p in named}
    extra = [(f"{pl.label}.{n}", p) for pl in placements for n, p in pl.adapter.named_parameters()
             if id(p) in adapter_parameter_ids([pl])]
    extra += [(f"others.{i}.{n}", p) for i, o in enumerate(others) for n, p in o.named_parameters()]
    for name, p in extra:
        if id(p) not in seen:
            seen.add(id(p))
            named.append((name, p))
    optimizer = AdamW(named, mask=resolved, **adamw_kwargs)
    model_ref = weakref.ref(model)

    def recheck() -> None:  # parameters added later (a LoRA injected after guard) face the same rule
        live = model_ref()
        if live is not None:
            _checked_placements(live, mask, adapters, others)

    optimizer._adapter_check = recheck
    if lean_frozen_convs:
        lean_frozen_convs_(model)
    return optimizer


def _checked_placements(model: torch.nn.Module, mask: FreezeMask, adapters: Any,
                        others: tuple[torch.nn.Module, ...]) -> list[Placement]:
    """The model's adapters, after refusing any on a frozen module or on a module of no known model."""
    placements = find_adapters(model, adapters, others)
    check_no_frozen_adapters(model, mask, placements=placements)
    unknown = unknown_parameters(model, mask, placements)
    if unknown:
        raise ValueError(
            f"{len(unknown)} parameter(s) of the model are neither tensors of the released model (the mask's "
            f"layout) nor parameters of an adapter freezeguard can place on a module: "
            f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}. Adapters are recognised by peft's "
            f"base_layer, a patched forward bound to the adapter module, or org_module/orig_module attributes "
            f"(pass the network as adapters=); a separate model goes in others=[...], not inside this one")
    other_modules = {id(m) for o in others for m in o.modules()}
    # an adapter placed on the model or on another model by one of its links (LyCORIS' parametrize mode
    # also keeps a proxy module in org_module) is placed
    placed = {id(pl.adapter) for pl in placements if pl.target is not None or id(pl.base) in other_modules}
    lost = sorted({pl.label for pl in placements if id(pl.adapter) not in placed})
    if lost:
        raise ValueError(f"{len(lost)} adapter(s) patch modules that are neither in the model nor in others=: "
                         f"{', '.join(lost[:8])}{' ...' if len(lost) > 8 else ''}; pass the model they patch "
                         f"(others=[text_encoder] when the mask does not cover it)")
    return placements


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


# Optimizer attributes torch itself keeps; any *other* attribute holding parameters is a list the
# optimizer reads on its own (LBFGS keeps ``_params``), which wrap's filtering of the groups cannot reach.
_TORCH_ATTRS = frozenset({"param_groups", "state", "defaults"})


def _held_parameters(optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, list]]:
    for attr, value in vars(optimizer).items():
        if attr in _TORCH_ATTRS or not isinstance(value, (list, tuple)) or not value:
            continue
        if any(isinstance(x, torch.Tensor) for x in value):
            yield attr, list(value)


class _Enforcer:
    """The state behind one wrapped optimizer (kept on it as ``optimizer._freezeguard_enforcer``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, mask: FreezeMask, model: torch.nn.Module,
                 verify_unchanged: bool, adapters: Any = None, others: Iterable[torch.nn.Module] = ()):
        self.optimizer, self.mask, self.model = optimizer, mask, model
        self.adapters, self.others = adapters, tuple(others)
        self.verify_unchanged = verify_unchanged
        self._saved_groups: list[list[torch.nn.Parameter]] | None = None
        self._snapshot: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._frozen: set[int] = set()
        self._frozen_key: tuple | None = None
        self._filtered: tuple | None = None
        self.handles: list = []

    def install(self) -> None:
        """Register the hooks (only after every check passed: a refused wrap leaves no trace)."""
        optimizer = self.optimizer
        self.handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
            optimizer.register_state_dict_pre_hook(lambda opt: self._restore_groups()),
            optimizer.register_load_state_dict_post_hook(lambda opt: self.drop_state()),
        ]

    def frozen_ids(self) -> set[int]:
        # Resolving names and finding adapters costs milliseconds on a UNet, so the answer is kept
        # while the mask and the optimizer's parameters (by identity) are the same: replaced
        # parameter objects (accelerate, FSDP), parameters added or appended in place are resolved
        # and checked again. A parameter swapped in the model alone cannot unfreeze anything: the
        # optimizer then holds the old object, whose frozen status is already known.
        key = (id(self.mask), [list(map(id, g["params"])) for g in self._groups_params()])
        if self._frozen_key is not None and key == self._frozen_key[0] and self.mask is self._frozen_key[1]:
            return self._frozen
        frozen = frozen_parameter_ids(self.model, self.mask)
        placements = _checked_placements(self.model, self.mask, self.adapters, self.others)
        known = {id(p) for p in self.model.parameters()} | adapter_parameter_ids(placements)
        known |= {id(p) for o in self.others for p in o.parameters()}
        groups = self._groups_params()
        stray = sum(1 for g in groups for p in g["params"] if id(p) not in known)
        if stray:
            raise RuntimeError(
                f"freezeguard: the optimizer holds {stray} parameter(s) that are neither in the model given to "
                f"fg.wrap nor adapters on it, so the mask cannot be enforced on them. Parameters of another model "
                f"the mask does not cover (a text encoder): fg.wrap(opt, mask, model, others=[text_encoder]); an "
                f"adapter network not applied to the model yet: adapters=network; otherwise wrap the optimizer "
                f"with the model it trains (after accelerate/DDP wrapping is fine)")
        frozen_params = [p for p in self.model.parameters() if id(p) in frozen]
        trainable = [(f"param_groups[{gi}]['params'][{i}]", p) for gi, g in enumerate(groups)
                     for i, p in enumerate(g["params"]) if id(p) not in frozen]
        check_no_alias(frozen_params, trainable)
        self._check_held(set(frozen))
        # the key holds the mask and (through the optimizer) the parameters: ids are not reused
        self._frozen, self._frozen_key = set(frozen), (key, self.mask)
        return self._frozen

    def _check_held(self, frozen: set[int]) -> None:
        if self.verify_unchanged:
            return  # every frozen tensor is snapshotted around the step and restored
        for attr, held in _held_parameters(self.optimizer):
            if any(id(p) in frozen for p in held):
                raise RuntimeError(
                    f"freezeguard: {type(self.optimizer).__name__} keeps its own list of parameters "
                    f"(optimizer.{attr}) that includes frozen tensors; it reads that list instead of its param "
                    f"groups, so fg.wrap cannot keep them out. Create it over the trainable parameters only: "
                    f"mask.apply_(model) first, then [p for p in model.parameters() if p.requires_grad]; or pass "
                    f"verify_unchanged=True (frozen tensors restored after every step)")

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
        self._check_held(frozen)  # a list of its own the optimizer reads (LBFGS), edited since wrapping
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
        self.handles = []


def wrap(optimizer: torch.optim.Optimizer, mask: FreezeMask, model: torch.nn.Module, *,
         adapters: Any = None, others: Iterable[torch.nn.Module] = (), apply: bool = True,
         verify_unchanged: bool = False) -> torch.optim.Optimizer:
    """Enforce ``mask`` around any ``torch.optim.Optimizer``; returns the same optimizer object.

    Frozen tensors stay bit-identical and get no optimizer state, even if ``requires_grad`` is
    set back to True and gradients exist. The optimizer may also hold adapter parameters: peft
    layers and networks that patch the model's modules (kohya, LyCORIS, ai-toolkit, OneTrainer)
    are found on the model; pass ``adapters=network`` for one not applied yet. An adapter on a
    module that owns a frozen tensor is refused (FrozenAdapterError), now and at any later step
    (a LoRA added with ``add_param_group``). ``others`` are models the mask does not cover (text
    encoders): their parameters and adapters train freely. Any other parameter is refused, as is a
    trainable parameter sharing memory with a frozen one, and an optimizer that reads a parameter
    list of its own (LBFGS) holding frozen tensors. A refused wrap leaves the optimizer untouched.

    ``apply=True`` also sets ``requires_grad=False`` on frozen tensors (no gradient memory).
    ``verify_unchanged=True`` additionally snapshots the frozen tensors around each step and
    restores (with a warning) any that an exotic optimizer wrote through a reference of its own;
    it costs one copy of the frozen tensors, so it is off by default. Wrapping again replaces the
    previous mask.

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
                        f"__init__ skip torch.optim.Optimizer.__init__?); fg.wrap cannot enforce a mask on it. "
                        f"Call mask.apply_(model) before building the optimizer and run fg.verify on the output")
    old = getattr(optimizer, _ATTR, None)
    enforcer = _Enforcer(optimizer, mask, model, verify_unchanged, adapters, others)
    if old is not None:
        old._restore_groups()  # validate against the full groups, not a half-done step's
    frozen = enforcer.frozen_ids()  # every check, before anything on the optimizer changes
    if old is not None:
        old.remove()
    enforcer.install()
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
