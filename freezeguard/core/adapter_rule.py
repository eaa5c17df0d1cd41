"""The one adapter rule, shared by the guard (live adapter modules) and the audit (adapter files).

An adapter (LoRA, DoRA, LoHa, LoKr, OFT, IA3, VeRA, a LyCORIS or kohya network module, ...) hangs
on a module of the released model and, merged or applied, can change any tensor of that module.
So, whatever the tuner type:

    an adapter is a violation when the module it hangs on, or a module below it, owns a frozen tensor.

Both sides only have to say *which released module* an adapter hangs on:

* the guard (``fg.guard`` / ``fg.wrap``) from the live model: peft's ``base_layer``, a module whose
  ``forward`` another module patched (kohya, LyCORIS, ai-toolkit, OneTrainer), ...;
* ``verify`` from a key of an adapter file, after format conversion: the longest dotted prefix of
  the key that names a released module (:meth:`AdapterRule.target`).

No list of tuner weight names is consulted, so a tuner type nobody listed is judged like the others.

Example:
    >>> import torch, freezeguard as fg
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> rule = AdapterRule(fg.FreezeMask.from_names(model, ["0.bias"]))
    >>> rule.target("0.lora_A.default.weight"), rule.target("1.oft_R.weight"), rule.target("2.x.weight")
    ('0', '1', None)
    >>> rule.frozen_under("0"), rule.frozen_under("1"), rule.frozen_under("")
    (['0.bias'], [], ['0.bias'])
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from freezeguard.core.names import canonical_name

if TYPE_CHECKING:
    from freezeguard.core.mask import FreezeMask

__all__ = ["AdapterRule"]


class AdapterRule:
    """Where adapters may hang, for one mask (released names throughout).

    ``modules`` is every released module path: each tensor's owner and all its ancestors, the root
    ``""`` included; ``owners`` only the modules that own a released tensor themselves.
    """

    def __init__(self, mask: "FreezeMask"):
        self.mask = mask
        self.modules: set[str] = {""}
        self.owners: set[str] = set()
        self._frozen_under: dict[str, list[str]] = {}
        frozen = set(mask.frozen_names)
        for name in mask.layout:
            parts = name.split(".")
            self.owners.add(".".join(parts[:-1]))
            for i in range(len(parts)):
                module = ".".join(parts[:i])
                self.modules.add(module)
                if name in frozen:
                    self._frozen_under.setdefault(module, []).append(name)

    def target(self, key: str) -> str | None:
        """The released module an adapter key hangs on: the longest dotted prefix that names one.

        ``key`` is a live parameter name or an adapter file key, already converted to the
        released naming (wrapper prefixes and peft's ``base_layer`` are dropped here). None when
        the key cannot be placed: no proper prefix other than the root names a released module, or
        the longest one is a container that owns no tensor itself (``attn1.bogus.lora_A.weight``
        names a sub-module the release lacks: no loader applies it to ``attn1``, so it is not
        accounted for, whatever ``attn1`` holds below).

        Example:
            >>> import torch, freezeguard as fg
            >>> net = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 2)))
            >>> rule = AdapterRule(fg.FreezeMask.from_names(net, []))
            >>> rule.target("0.0.lora_A.weight"), rule.target("0.1.lora_A.weight")
            ('0.0', None)
        """
        parts = canonical_name(key).split(".")
        for i in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:i])
            if module in self.modules:
                return module if module in self.owners else None
        return None

    def frozen_under(self, module: str) -> list[str]:
        """Frozen released tensors owned by ``module`` or a module below it (sorted)."""
        return sorted(self._frozen_under.get(module, ()))

    def violations(self, placed: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """``(adapter, frozen tensor)`` for every ``(adapter, target module)`` pair that breaks the rule.

        Example:
            >>> import torch, freezeguard as fg
            >>> lin = torch.nn.Linear(2, 2)
            >>> AdapterRule(fg.FreezeMask.from_names(lin, ["weight"])).violations([("lora_A.weight", "")])
            [('lora_A.weight', 'weight')]
        """
        return [(adapter, frozen) for adapter, module in placed for frozen in self.frozen_under(module)]
