"""Adapter networks with the module structure, attribute names and key names of trainers not on the package index.

Written from reading each trainer's code (fetched from GitHub, not copied): the classes keep the
attributes freezeguard's adapter detection and the trainers' own tools rely on -- how the base
module is referenced, how its ``forward`` is patched, how modules and saved keys are named.
The forward math is a plain LoRA (down, up, scale), as in each original.

* kohya-ss/sd-scripts ``networks/lora.py`` (commit 48d368fa), classes ``LoRAModule`` and
  ``LoRANetwork``: ``LoRAModule(lora_name, org_module, multiplier, lora_dim, alpha)`` registers
  ``org_module`` as a child until ``apply_to()``, which sets ``self.org_forward = org_module.forward``,
  ``org_module.forward = self.forward`` and deletes ``self.org_module``; ``lora_down`` / ``lora_up``
  (Linear, or Conv2d with the base kernel then 1x1), an ``alpha`` buffer; names
  ``lora_unet_<module path with _>`` for Linear/Conv2d children of ``Transformer2DModel`` (and
  ``ResnetBlock2D`` / ``Downsample2D`` / ``Upsample2D`` with conv dims), ``lora_te_`` for the text
  encoder's ``CLIPAttention`` / ``CLIPMLP``; the network keeps ``unet_loras`` / ``text_encoder_loras``
  and registers each module under its ``lora_name``, so ``state_dict`` keys are
  ``lora_unet_..._to_q.lora_down.weight`` / ``.alpha``.
* ostris/ai-toolkit ``toolkit/lora_special.py`` (commit 27a03a91), classes ``LoRAModule`` and
  ``LoRASpecialNetwork``: the base module in a one-element list ``org_module`` plus
  ``orig_module_ref`` (a weakref), ``apply_to()`` patching ``org_module[0].forward``; networks skip
  a module when an ``ignore_if_contains`` word is a substring of its dotted name
  (``lora_unet.<path>``), and keep it only if an ``only_if_contains`` word is a substring.
* Nerogar/OneTrainer ``modules/module/LoRAModule.py`` (commit 23df3832), classes ``PeftBase``,
  ``LoRAModule`` and ``LoRAModuleWrapper``: the base module in ``_orig_module = [module]`` behind an
  ``orig_module`` property, ``hook_to_module()`` saving ``orig_forward`` and patching ``forward``
  (and ``train`` / ``eval``); ``prefix`` ``"lora_unet.<path>."``; the wrapper is a plain object
  (not an ``nn.Module``) holding ``lora_modules``, selecting Linear/Conv2d layers with
  ``modules/util/ModuleFilter.py`` semantics (comma-separated patterns; regex ``search`` or substring).
"""
from __future__ import annotations

import re
import weakref

import torch

KOHYA_UNET_TARGETS = ("Transformer2DModel",)
KOHYA_UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
KOHYA_TE_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def _down_up(org: torch.nn.Module, rank: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    if isinstance(org, torch.nn.Conv2d):
        down = torch.nn.Conv2d(org.in_channels, rank, org.kernel_size, org.stride, org.padding, bias=False)
        return down, torch.nn.Conv2d(rank, org.out_channels, 1, 1, bias=False)
    return torch.nn.Linear(org.in_features, rank, bias=False), torch.nn.Linear(rank, org.out_features, bias=False)


class KohyaLoRAModule(torch.nn.Module):
    """sd-scripts ``networks/lora.py`` ``LoRAModule``: ``org_module`` a child until ``apply_to``."""

    def __init__(self, lora_name: str, org_module: torch.nn.Module, multiplier: float = 1.0, lora_dim: int = 2,
                 alpha: float = 1.0):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        self.lora_down, self.lora_up = _down_up(org_module, lora_dim)
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=5 ** 0.5)
        torch.nn.init.zeros_(self.lora_up.weight)
        self.scale = alpha / lora_dim
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.multiplier = multiplier
        self.org_module = org_module  # removed in apply_to, as in sd-scripts

    def apply_to(self) -> None:
        self.org_forward = self.org_module.forward
        self.org_module.forward = self.forward
        del self.org_module

    def forward(self, x):
        return self.org_forward(x) + self.lora_up(self.lora_down(x)) * self.multiplier * self.scale


class KohyaLoRANetwork(torch.nn.Module):
    """sd-scripts ``LoRANetwork``: modules found by target class name, registered under ``lora_name``."""

    def __init__(self, text_encoder: torch.nn.Module | None, unet: torch.nn.Module, lora_dim: int = 2,
                 alpha: float = 1.0, conv_lora_dim: int | None = None, module_class=KohyaLoRAModule):
        super().__init__()

        def create(prefix: str, root: torch.nn.Module, targets, conv: bool):
            loras = []
            for name, module in root.named_modules():
                if type(module).__name__ not in targets:
                    continue
                for child_name, child in module.named_modules():
                    is_linear = type(child).__name__ == "Linear"
                    is_conv = type(child).__name__ == "Conv2d"
                    is_1x1 = is_conv and child.kernel_size == (1, 1)
                    if not (is_linear or is_conv):
                        continue
                    dim = lora_dim if (is_linear or is_1x1) else (conv_lora_dim if conv else None)
                    if not dim:
                        continue
                    lora_name = (prefix + "." + name + "." + child_name).replace(".", "_")
                    loras.append(module_class(lora_name, child, 1.0, dim, alpha))
            return loras

        self.text_encoder_loras = create("lora_te", text_encoder, KOHYA_TE_TARGETS, False) if text_encoder else []
        targets = KOHYA_UNET_TARGETS + (KOHYA_UNET_CONV_TARGETS if conv_lora_dim else ())
        self.unet_loras = create("lora_unet", unet, targets, bool(conv_lora_dim))
        names = set()
        for lora in self.text_encoder_loras + self.unet_loras:
            assert lora.lora_name not in names, lora.lora_name
            names.add(lora.lora_name)

    def apply_to(self) -> None:
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()
            self.add_module(lora.lora_name, lora)


class AIToolkitLoRAModule(torch.nn.Module):
    """ai-toolkit ``toolkit/lora_special.py`` ``LoRAModule``: base in ``org_module[0]`` and a weakref."""

    def __init__(self, lora_name: str, org_module: torch.nn.Module, lora_dim: int = 2, alpha: float = 1.0):
        super().__init__()
        self.lora_name = lora_name
        self.orig_module_ref = weakref.ref(org_module)
        self.lora_down, self.lora_up = _down_up(org_module, lora_dim)
        torch.nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = alpha / lora_dim
        self.multiplier = 1.0
        self.org_module = [org_module]

    def apply_to(self) -> None:
        self.org_forward = self.org_module[0].forward
        self.org_module[0].forward = self.forward

    def forward(self, x, *args, **kwargs):
        return self.org_forward(x, *args, **kwargs) + self.lora_up(self.lora_down(x)) * self.multiplier * self.scale


class AIToolkitLoRASpecialNetwork(torch.nn.Module):
    """ai-toolkit ``LoRASpecialNetwork``: kohya naming plus ``ignore_if_contains`` / ``only_if_contains``."""

    def __init__(self, unet: torch.nn.Module, lora_dim: int = 2, alpha: float = 1.0,
                 ignore_if_contains=None, only_if_contains=None,
                 target_replace_modules=KOHYA_UNET_TARGETS + KOHYA_UNET_CONV_TARGETS):
        super().__init__()
        ignore_if_contains = ignore_if_contains or []
        self.unet_loras = []
        for name, module in unet.named_modules():
            if type(module).__name__ not in target_replace_modules:
                continue
            for child_name, child in module.named_modules():
                if type(child).__name__ not in ("Linear", "Conv2d"):
                    continue
                clean_name = ".".join(x for x in ("lora_unet", name, child_name) if x)
                lora_name = clean_name.replace(".", "_")
                if any(word in clean_name for word in ignore_if_contains):
                    continue
                if only_if_contains is not None and not any(w in clean_name or w in lora_name
                                                            for w in only_if_contains):
                    continue
                self.unet_loras.append(AIToolkitLoRAModule(lora_name, child, lora_dim, alpha))

    def apply_to(self) -> None:
        for lora in self.unet_loras:
            lora.apply_to()
            self.add_module(lora.lora_name, lora)


class OneTrainerLoRAModule(torch.nn.Module):
    """OneTrainer ``PeftBase`` + ``LoRAModule``: base in ``_orig_module``, ``hook_to_module`` patches it."""

    def __init__(self, prefix: str, orig_module: torch.nn.Module, rank: int = 2, alpha: float = 1.0):
        super().__init__()
        self.prefix = prefix + "."
        self._orig_module = [orig_module]  # a list, so torch does not register it
        self.orig_forward = None
        self.rank = rank
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.lora_down, self.lora_up = _down_up(orig_module, rank)
        torch.nn.init.zeros_(self.lora_up.weight)

    @property
    def orig_module(self) -> torch.nn.Module:
        return self._orig_module[0]

    def hook_to_module(self) -> None:
        if self.orig_forward is None:
            self.orig_forward = self.orig_module.forward
            self.orig_train, self.orig_eval = self.orig_module.train, self.orig_module.eval
            self.orig_module.forward = self.forward

    def forward(self, x, *args, **kwargs):
        return self.orig_forward(x) + self.lora_up(self.lora_down(x)) * (self.alpha / self.rank)


def onetrainer_filter_matches(pattern: str, use_regex: bool, module_name: str) -> bool:
    """OneTrainer ``ModuleFilter.matches``: empty matches all; regex ``search``; else a substring."""
    pattern = pattern.strip()
    if not pattern:
        return True
    return re.search(pattern, module_name) is not None if use_regex else pattern in module_name


class OneTrainerLoRAModuleWrapper:
    """OneTrainer ``LoRAModuleWrapper`` (a plain object): one adapter per selected Linear/Conv2d layer."""

    def __init__(self, orig_module: torch.nn.Module, prefix: str, layer_filter: str = "",
                 layer_filter_regex: bool = False, rank: int = 2):
        self.orig_module, self.prefix = orig_module, prefix
        patterns = [p for p in layer_filter.split(",")] if layer_filter else []
        self.lora_modules: dict[str, OneTrainerLoRAModule] = {}
        for name, child in orig_module.named_modules():
            name = name.replace(".checkpoint.", ".")
            if not isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if patterns and not any(onetrainer_filter_matches(p, layer_filter_regex, name) for p in patterns):
                continue
            self.lora_modules[name] = OneTrainerLoRAModule(f"{prefix}.{name}", child, rank)

    def parameters(self):
        return [p for m in self.lora_modules.values() for p in m.parameters()]

    def hook_to_module(self) -> None:
        for module in self.lora_modules.values():
            module.hook_to_module()

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for module in self.lora_modules.values():
            out |= module.state_dict(prefix=module.prefix)
        return out
