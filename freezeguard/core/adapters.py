"""Finding adapter modules on a live model, whatever library built them, and judging them by the mask.

An adapter hangs on a *base* module of the model and changes what it computes; merged, it changes
the base module's tensors. Libraries attach adapters in a few ways, all found here without knowing
the library:

* peft: a tuner layer with a ``base_layer`` child (LoRA, DoRA, LoHa, LoKr, OFT, IA3, ...), and
  ``modules_to_save`` wrappers (a trainable copy next to ``original_module``);
* patched ``forward`` (kohya sd-scripts ``LoRAModule``, LyCORIS, ai-toolkit ``LoRAModule``,
  OneTrainer ``PeftBase``): the base module's ``forward`` is an instance attribute bound to
  *another* module, which may chain to further adapters through ``org_forward`` /
  ``orig_forward`` (LyCORIS stacks them in ``_lycoris_wrappers``);
* forward hooks bound to a module, and ``torch.nn.utils.parametrize`` parametrizations;
* an adapter network passed explicitly (``adapters=``): its modules name their base module in
  ``org_module`` / ``orig_module`` / ``_orig_module`` (a module, a one-element list, or a weakref),
  which finds adapters not yet applied too.

Each is a :class:`Placement`; :class:`freezeguard.core.adapter_rule.AdapterRule` judges it by the
released name of its base module: an adapter is refused when that module, or one below it, owns a
frozen tensor, whatever the tuner type.

Example:
    >>> import torch, freezeguard as fg
    >>> class Adapter(torch.nn.Module):  # the kohya / LyCORIS pattern: patch the base forward
    ...     def __init__(self, base):
    ...         super().__init__()
    ...         self.down = torch.nn.Linear(base.in_features, 1, bias=False)
    ...         self.org_forward, base.forward = base.forward, self.forward
    ...     def forward(self, x):
    ...         return self.org_forward(x)
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> net = torch.nn.ModuleList([Adapter(model[0])])
    >>> frozen_adapters(model, fg.FreezeMask.from_names(model, ["0.weight"]), adapters=net)
    ['ModuleList.0']
    >>> frozen_adapters(model, fg.FreezeMask.from_names(model, ["1.weight"]))
    []
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch

from freezeguard.core.adapter_rule import AdapterRule
from freezeguard.core.names import FrozenAdapterError, canonical_name

if TYPE_CHECKING:
    from freezeguard.core.mask import FreezeMask

__all__ = ["Placement", "find_adapters", "frozen_adapters", "check_no_frozen_adapters", "adapter_parameter_ids",
           "unknown_parameters"]

# Attributes by which an adapter module names the module it patches (kohya, LyCORIS, ai-toolkit, OneTrainer).
_BASE_ATTRS = ("org_module", "orig_module", "_orig_module", "org_module_ref", "orig_module_ref")
# Attributes holding the forward an adapter wraps: a chain to adapters applied earlier on one module.
_FORWARD_ATTRS = ("org_forward", "orig_forward")


@dataclass(frozen=True)
class Placement:
    """One adapter module on one base module.

    ``label`` names the adapter (its name in the model or network, else its ``lora_name``);
    ``target`` is the released name of the base module in the model, None when the base module
    is not part of the model (a text encoder, or unknown).
    """

    label: str
    adapter: torch.nn.Module
    base: torch.nn.Module
    target: str | None


def _as_module(value) -> torch.nn.Module | None:
    if isinstance(value, weakref.ref):
        value = value()
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, torch.nn.Module) else None


def _bound_module(fn) -> torch.nn.Module | None:
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def _own_parameters(adapter: torch.nn.Module, base: torch.nn.Module) -> list[torch.nn.Parameter]:
    if any(m is adapter for m in base.modules()):  # the adapter lives inside its base (a parametrization)
        return list(adapter.parameters())
    base_ids = {id(p) for p in base.parameters()}  # the base may live inside the adapter (peft, kohya)
    return [p for p in adapter.parameters() if id(p) not in base_ids]


def _pairs_on(module: torch.nn.Module) -> Iterable[tuple[torch.nn.Module, torch.nn.Module]]:
    """(adapter, base) pairs found from ``module``'s side, as base or as adapter."""
    base = getattr(module, "base_layer", None)
    if isinstance(base, torch.nn.Module):
        yield module, base  # peft tuner layer
    copies, original = getattr(module, "modules_to_save", None), getattr(module, "original_module", None)
    if isinstance(copies, torch.nn.ModuleDict) and isinstance(original, torch.nn.Module) and len(copies):
        yield module, original  # peft modules_to_save: the wrapper's own parameters are the copies
    # patched forward, and the chain of forwards it wraps
    fn, seen = module.__dict__.get("forward"), set()
    while fn is not None:
        adapter = _bound_module(fn)
        if adapter is None or adapter is module or id(adapter) in seen:
            break
        seen.add(id(adapter))
        yield adapter, module
        fn = next((adapter.__dict__[a] for a in _FORWARD_ATTRS if a in adapter.__dict__), None)
    for wrapper in module.__dict__.get("_lycoris_wrappers", ()) or ():
        if isinstance(wrapper, torch.nn.Module):
            yield wrapper, module
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for hook in hooks.values():
            adapter = _bound_module(hook)
            if adapter is not None and adapter is not module:
                yield adapter, module
    params = getattr(module, "parametrizations", None)
    if isinstance(params, torch.nn.ModuleDict):
        for plist in params.values():
            for adapter in plist:
                yield adapter, module
    for attr in _BASE_ATTRS:  # module as an adapter naming its base
        base = _as_module(module.__dict__.get(attr, module._modules.get(attr)))
        if base is not None and base is not module:
            yield module, base


def find_adapters(model: torch.nn.Module, adapters: torch.nn.Module | Iterable[torch.nn.Module] | None = None,
                  others: Iterable[torch.nn.Module] = ()) -> list[Placement]:
    """Every adapter module on ``model`` (and on ``others``, and in the ``adapters`` network).

    Only adapters that own parameters of their own count (a patched forward without weights
    changes no tensor).
    """
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    roots = [model, *others]
    if adapters is not None:
        roots.extend([adapters] if isinstance(adapters, torch.nn.Module) else adapters)
    labels: dict[int, str] = {}
    for root in reversed(roots):  # the model's own names win
        prefix = "" if root is model else f"{type(root).__name__}."
        labels.update({id(m): f"{prefix}{n}" for n, m in root.named_modules(remove_duplicate=False)})
    found: dict[tuple[int, int], Placement] = {}
    for root in roots:
        for _, module in root.named_modules(remove_duplicate=False):
            for adapter, base in _pairs_on(module):
                key = (id(adapter), id(base))
                if key in found or not _own_parameters(adapter, base):
                    continue
                base_name = names.get(id(base))
                label = labels.get(id(adapter)) or getattr(adapter, "lora_name", None) or type(adapter).__name__
                found[key] = Placement(str(label), adapter, base,
                                       canonical_name(base_name) if base_name is not None else None)
    return list(found.values())


def adapter_parameter_ids(placements: Iterable[Placement]) -> set[int]:
    """ids of the parameters the adapters own (not their base modules')."""
    return {id(p) for pl in placements for p in _own_parameters(pl.adapter, pl.base)}


def unknown_parameters(model: torch.nn.Module, mask: "FreezeMask", placements: Iterable[Placement]) -> list[str]:
    """Live names of the model's parameters that are neither released tensors (the mask's layout) nor
    owned by a recognised adapter: something attached in a way freezeguard cannot place (an adapter
    patching ``forward`` with a closure, a new head). They are not guessed trainable.

    Example:
        >>> import torch, freezeguard as fg
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> mask = fg.FreezeMask.from_names(model, ["0.bias"])
        >>> model.add_module("extra", torch.nn.Linear(2, 1, bias=False))
        >>> unknown_parameters(model, mask, find_adapters(model))
        ['extra.weight']
    """
    layout = mask.layout
    owned = adapter_parameter_ids(placements)
    return [name for name, p in model.named_parameters()
            if id(p) not in owned and name not in layout and canonical_name(name) not in layout]


def _violations(model, mask, adapters, others, placements) -> list[tuple[str, str]]:
    rule = AdapterRule(mask)
    placements = find_adapters(model, adapters, others) if placements is None else placements
    out = set()
    for pl in placements:
        frozen = rule.frozen_under(pl.target) if pl.target is not None else []
        if frozen:
            more = " ..." if len(frozen) > 3 else ""
            out.add((pl.label, f"{pl.label} (on {pl.target or '<model>'}: {', '.join(frozen[:3])}{more})"))
    return sorted(out)


def frozen_adapters(model: torch.nn.Module, mask: "FreezeMask", adapters=None, others=(),
                    placements: list[Placement] | None = None) -> list[str]:
    """Labels of the adapters on a module that owns, or has below it, a frozen tensor (sorted; empty: none).

    Example:
        >>> import torch, freezeguard as fg
        >>> frozen_adapters(torch.nn.Linear(2, 2), fg.FreezeMask.from_names(torch.nn.Linear(2, 2), ["bias"]))
        []
    """
    return sorted({label for label, _ in _violations(model, mask, adapters, others, placements)})


def check_no_frozen_adapters(model: torch.nn.Module, mask: "FreezeMask", adapters=None, others=(),
                             placements: list[Placement] | None = None) -> None:
    """Raise :class:`FrozenAdapterError` naming every adapter attached to a module with frozen tensors
    (and the module and frozen tensors it would change)."""
    bad = [text for _, text in _violations(model, mask, adapters, others, placements)]
    if bad:
        raise FrozenAdapterError(
            f"{len(bad)} adapter module(s) are attached to modules with frozen tensors and would change "
            f"them when merged: {'; '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}. Keep adapters off "
            f"these modules: peft LoraConfig(exclude_modules=mask.lora_exclude_modules(model)), or the "
            f"trainer's own filter from freezeguard.integrations.trainers")
