"""Mapping a mask onto wrapped models, and keeping adapters (peft LoRA & co.) off frozen tensors.

Training stacks rename parameters: DDP adds ``module.``, ``torch.compile`` adds ``_orig_mod.``,
FSDP and activation checkpointing insert ``_fsdp_wrapped_module.`` / ``_checkpoint_wrapped_module.``,
and peft wraps the model as ``base_model.model.`` and a tuned layer's own weight becomes
``<layer>.base_layer.weight``. A mask is keyed by the *released* names, so everything here maps a
live name back to its released one with :func:`canonical_name`.

An adapter on a frozen layer is a way around the mask: merged, it changes the frozen tensor.
``core.adapters`` finds them (guard/wrap refuse); :func:`lora_exclude_modules` /
:func:`trainable_target_modules` say where adapters may go.

Example:
    >>> from freezeguard.core.names import canonical_name
    >>> canonical_name("base_model.model.down_blocks.0.proj_in.base_layer.weight")
    'down_blocks.0.proj_in.weight'
    >>> canonical_name("conv_in.parametrizations.weight.original")
    'conv_in.weight'
"""
from __future__ import annotations

import re
from typing import Iterable, Protocol

import torch


class MaskLike(Protocol):
    """What these functions read of a :class:`freezeguard.core.mask.FreezeMask`.

    A protocol rather than the class itself: core/mask.py imports this module, so importing it back,
    even only for annotations, would close an import circle.
    """

    @property
    def layout(self) -> dict[str, tuple[int, ...]]: ...

    @property
    def frozen_names(self) -> list[str]: ...

# Prefixes a wrapper puts in front of every name (only ever at the start).
_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
# Path segments a wrapper inserts anywhere; dropping them gives the wrapped module's own name.
_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "base_layer", "original_module")
# peft's ModulesToSaveWrapper keeps a trainable copy at <module>.modules_to_save.<adapter>.<param>.
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+(?=\.)")
# torch.nn.utils.parametrize moves <module>.<attr> to <module>.parametrizations.<attr>.original.
_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


class FrozenAdapterError(ValueError):
    """An adapter (LoRA, a modules_to_save copy, ...) is attached to a module with frozen tensors."""


def canonical_name(name: str) -> str:
    """The released parameter name behind a live, possibly wrapped, parameter name."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    name = _MODULES_TO_SAVE.sub("", name)
    name = _PARAMETRIZED.sub(r"\1\2", name)
    parts = [p for p in name.split(".") if p not in _SEGMENTS]
    return ".".join(parts)


def resolve_name(name: str, known: Iterable[str] | set[str]) -> str | None:
    """``name`` itself if the mask knows it, else its canonical form if known, else None.

    Trying the exact name first keeps a model whose own module is called ``module`` working.
    """
    known = known if isinstance(known, (set, frozenset, dict)) else set(known)
    if name in known:
        return name
    canon = canonical_name(name)
    return canon if canon in known else None


def frozen_parameter_ids(model: torch.nn.Module, mask: MaskLike) -> dict[int, str]:
    """id(parameter) -> released name, for every live parameter the mask freezes.

    Raises ValueError if a frozen name of the mask matches no parameter of the model (the mask
    would silently protect nothing), or matches one of another shape.
    """
    layout = mask.layout
    frozen = set(mask.frozen_names)
    found: dict[int, str] = {}
    seen: set[str] = set()
    reshaped = []
    for name, p in model.named_parameters(remove_duplicate=False):
        released = resolve_name(name, layout)
        if released is None or released not in frozen:
            continue
        if _is_adapter_copy(name):
            continue  # a modules_to_save copy is reported by frozen_adapters, not mapped here
        if tuple(p.shape) != layout[released] and p.numel() != 0:
            reshaped.append(f"{name} {tuple(p.shape)} (mask: {layout[released]})")
        found[id(p)] = released
        seen.add(released)
    missing = sorted(frozen - seen)
    if missing or reshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} frozen tensor(s) not found in the model: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
        if reshaped:
            parts.append("reshaped: " + ", ".join(reshaped[:8]))
        raise ValueError("mask does not fit this model (" + "; ".join(parts) + "); if the model is wrapped "
                         "in a way freezeguard does not know (FSDP without use_orig_params=True flattens "
                         "parameters), create the optimizer/guard on the unwrapped model")
    return found


def released_layout(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """name -> shape of a possibly wrapped model's own tensors, under their released names.

    Wrapper prefixes and peft's ``base_layer`` are dropped (:func:`canonical_name`); adapter
    weights and ``modules_to_save`` copies are left out. For a plain model it is its layout.

    Example:
        >>> released_layout(torch.nn.Linear(2, 3))
        {'weight': (3, 2), 'bias': (3,)}
    """
    adapter_ids: set[int] = set()
    for _, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, torch.nn.Module):
            base_ids = {id(p) for p in base.parameters()}
            adapter_ids |= {id(p) for p in module.parameters() if id(p) not in base_ids}
        copies = getattr(module, "modules_to_save", None)
        if isinstance(copies, torch.nn.ModuleDict):
            adapter_ids |= {id(p) for p in copies.parameters()}
    return {canonical_name(name): tuple(p.shape) for name, p in model.named_parameters() if id(p) not in adapter_ids}


def _is_adapter_copy(name: str) -> bool:
    return ".modules_to_save." in name


def lora_exclude_modules(model: torch.nn.Module, mask: MaskLike) -> list[str]:
    """Released names of the modules that directly own a frozen tensor (for peft ``exclude_modules``).

    peft matches ``exclude_modules`` entries against each module's full name (or a dotted
    suffix of it), so these full names exclude exactly these modules.

    Example:
        >>> import torch, freezeguard as fg
        >>> from freezeguard.core.names import lora_exclude_modules
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> lora_exclude_modules(model, fg.FreezeMask.from_names(model, ["0.bias"]))
        ['0']
    """
    layout = mask.layout
    frozen = set(mask.frozen_names)
    out = set()
    for mod_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if resolve_name(full, layout) in frozen:
                out.add(canonical_name(mod_name) if mod_name else mod_name)
    return sorted(out)


_ADAPTABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)


def trainable_target_modules(model: torch.nn.Module, mask: MaskLike,
                             candidates: Iterable[str] | None = None) -> list[str]:
    """Full names of Linear/Conv/Embedding modules none of whose tensors are frozen.

    Pass as peft ``LoraConfig(target_modules=...)``. ``candidates`` (suffixes such as
    ``["to_q", "to_k", "to_v", "to_out.0"]``) narrows the choice the way peft's own
    ``target_modules`` would.

    Example:
        >>> import torch, freezeguard as fg
        >>> from freezeguard.core.names import trainable_target_modules
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> trainable_target_modules(model, fg.FreezeMask.from_names(model, ["0.weight"]))
        ['1']
    """
    excluded = set(lora_exclude_modules(model, mask))
    cands = list(candidates) if candidates is not None else None
    out = []
    for mod_name, module in model.named_modules():
        if not mod_name or not isinstance(module, _ADAPTABLE) or mod_name in excluded:
            continue
        if cands is not None and not any(mod_name == c or mod_name.endswith("." + c) for c in cands):
            continue
        out.append(mod_name)
    return sorted(out)
