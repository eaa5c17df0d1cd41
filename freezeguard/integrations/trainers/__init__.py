"""A mask in the words each LoRA trainer already reads, so adapters never land on a frozen module.

One function per trainer. Each turns the mask into that trainer's own module filter; the guard
(``fg.wrap`` / ``fg.guard``) stays the check behind it, and ``fg.verify`` the check on the output.
What each trainer reads, and where (see docs/recipes.md):

* peft / diffusers examples: ``LoraConfig(exclude_modules=...)`` -- :func:`peft_exclude_modules`;
* LyCORIS presets (``exclude_name``), read by ``lycoris.create_lycoris(preset=<toml>)`` and by
  kohya sd-scripts with ``--network_module lycoris.kohya`` -- :func:`lycoris_preset`;
* kohya sd-scripts ``--network_args`` -- :func:`kohya_network_args` (a LyCORIS preset file for
  ``lycoris.kohya``, and ``exclude_patterns`` for kohya's own networks that read it);
* SimpleTuner ``--lycoris_config`` JSON (``apply_preset``) -- :func:`simpletuner_lycoris_config`;
  for full fine-tuning, ``mask.apply_(model)`` before its optimizer is built;
* OneTrainer ``layer_filter`` / ``layer_filter_regex`` -- :func:`onetrainer_layer_filter`;
* ai-toolkit ``network_kwargs: {ignore_if_contains: [...]}`` -- :func:`aitoolkit_network_kwargs`.

Module names are the released model's (wrapper prefixes and peft's ``base_layer`` dropped), which
is how each of these trainers names the modules of the model it was given.

Example:
    >>> import torch, freezeguard as fg
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> mask = fg.FreezeMask.from_names(model, ["0.weight"])
    >>> aitoolkit_network_kwargs(model, mask), onetrainer_layer_filter(model, mask)
    ({'ignore_if_contains': ['0']}, {'layer_filter': '^1$', 'layer_filter_regex': True})
"""
from __future__ import annotations

import copy
import os
import re
from typing import Any, Iterable

import torch

from freezeguard.core.files import write_text
from freezeguard.core.mask import FreezeMask
from freezeguard.core.names import lora_exclude_modules, trainable_target_modules

__all__ = ["peft_exclude_modules", "lycoris_preset", "kohya_network_args", "simpletuner_lycoris_config",
           "onetrainer_layer_filter", "aitoolkit_network_kwargs"]


def _frozen_modules(model: torch.nn.Module, mask: FreezeMask) -> list[str]:
    excluded = lora_exclude_modules(model, mask)
    if "" in excluded:  # the root owns a frozen tensor: no trainer's filter can keep adapters off it
        raise ValueError("the model's root module owns a frozen tensor; no module filter can express that, "
                         "use fg.wrap / fg.guard, which refuse any adapter on the model")
    return excluded


def peft_exclude_modules(model: torch.nn.Module, mask: FreezeMask) -> list[str]:
    """peft ``LoraConfig(exclude_modules=...)``: full names of the modules owning a frozen tensor.

    Example:
        >>> import torch, freezeguard as fg
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> peft_exclude_modules(m, fg.FreezeMask.from_names(m, ["0.bias"]))
        ['0']
    """
    return lora_exclude_modules(model, mask)


def lycoris_preset(model: torch.nn.Module, mask: FreezeMask, preset: dict[str, Any] | None = None) -> dict[str, Any]:
    """A LyCORIS preset (the dict ``LycorisNetwork.apply_preset`` takes, or a TOML file's content) that
    keeps adapters off every module owning a frozen tensor.

    ``exclude_name`` gets the modules' full paths, which LyCORIS checks against every module path
    it walks (``LycorisNetwork.is_excluded``: an exact match, or a pattern match that can only
    exclude more). ``preset`` (e.g. ``{"target_module": [...]}``) is kept, its own
    ``exclude_name`` entries too.

    Example:
        >>> import torch, freezeguard as fg
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> lycoris_preset(m, fg.FreezeMask.from_names(m, ["1.weight"]), {"target_name": ["0", "1"]})
        {'target_name': ['0', '1'], 'exclude_name': ['1']}
    """
    out = copy.deepcopy(preset) if preset else {}
    out["exclude_name"] = sorted({*out.get("exclude_name", ()), *_frozen_modules(model, mask)})
    return out


def _toml_list(values: Iterable[str]) -> str:
    return "[" + ", ".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "]"


def kohya_network_args(model: torch.nn.Module, mask: FreezeMask, preset_path: str | os.PathLike,
                       preset: dict[str, Any] | None = None) -> list[str]:
    """``--network_args`` for kohya sd-scripts that keep adapters off frozen modules.

    Writes a LyCORIS preset TOML to ``preset_path`` (read by ``--network_module lycoris.kohya``)
    and returns ``["preset=<path>", "exclude_patterns=[...]"]``; the second is read by kohya's
    own networks that take ``exclude_patterns`` (``fullmatch`` against each module's path, e.g.
    ``networks/lora_anima.py``). kohya's ``networks/lora.py`` (SD 1.5 / SDXL) has no per-module
    filter and ignores both: use ``lycoris.kohya`` there (``algo=lora`` is a plain LoRA), or
    ``fg.wrap`` refuses the network.

    Example:
        >>> import tempfile, torch, freezeguard as fg
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> args = kohya_network_args(m, fg.FreezeMask.from_names(m, ["0.weight"]), tempfile.mktemp(".toml"))
        >>> args[1]
        "exclude_patterns=['0']"
    """
    body = lycoris_preset(model, mask, preset)
    lines = []
    for key, value in body.items():
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            lines.append(f"{key} = {_toml_list(value)}")
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f"{key} = {_toml_list([value])[1:-1]}")
        else:
            raise TypeError(f"kohya_network_args writes string lists, strings and booleans; preset[{key!r}] is "
                            f"{type(value).__name__} (write that preset file yourself from lycoris_preset())")
    write_text(preset_path, "\n".join(lines) + "\n")
    patterns = [re.escape(name) for name in _frozen_modules(model, mask)]
    return [f"preset={os.fspath(preset_path)}", f"exclude_patterns={patterns!r}"]


def simpletuner_lycoris_config(model: torch.nn.Module, mask: FreezeMask, config: dict[str, Any]) -> dict[str, Any]:
    """SimpleTuner's ``--lycoris_config`` JSON with its ``apply_preset`` excluding the frozen modules.

    SimpleTuner passes ``config["apply_preset"]`` to ``LycorisNetwork.apply_preset`` before
    ``create_lycoris`` (``simpletuner/helpers/training/trainer.py``, ``init_trainable_peft_adapter``).

    Example:
        >>> import torch, freezeguard as fg
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> simpletuner_lycoris_config(m, fg.FreezeMask.from_names(m, ["0.bias"]), {"algo": "lokr"})
        {'algo': 'lokr', 'apply_preset': {'exclude_name': ['0']}}
    """
    out = copy.deepcopy(config)
    out["apply_preset"] = lycoris_preset(model, mask, out.get("apply_preset") or None)
    return out


def onetrainer_layer_filter(model: torch.nn.Module, mask: FreezeMask,
                            candidates: Iterable[str] | None = None) -> dict[str, Any]:
    """OneTrainer's ``layer_filter`` (with ``layer_filter_regex``) selecting only modules without frozen tensors.

    OneTrainer's filter *selects* layers (``modules/util/ModuleFilter.py``: a comma-separated list,
    each a regex searched in the module's path); this returns one anchored pattern per Linear /
    Conv2d module none of whose tensors is frozen (``candidates`` narrows them, as peft's
    ``target_modules`` suffixes would).
    """
    names = trainable_target_modules(model, mask, candidates)
    if not names:
        raise ValueError("no Linear/Conv module without frozen tensors is left to adapt")
    return {"layer_filter": ",".join(f"^{re.escape(n)}$" for n in names), "layer_filter_regex": True}


def aitoolkit_network_kwargs(model: torch.nn.Module, mask: FreezeMask) -> dict[str, list[str]]:
    """ai-toolkit ``network: network_kwargs:`` keeping LoRA off frozen modules.

    ``LoRASpecialNetwork`` skips a module when any ``ignore_if_contains`` entry is a substring of
    its dotted path (``toolkit/lora_special.py``); a module's full path is a substring of itself,
    so each frozen module is skipped (and at most a few more whose path contains it).
    """
    return {"ignore_if_contains": _frozen_modules(model, mask)}
