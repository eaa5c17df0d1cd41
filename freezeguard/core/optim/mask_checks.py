"""Does a mask fit an optimizer's parameters? Checked whenever the mask or the parameters change.

A ``FreezeMask`` is keyed by name, so the parameters need names; every frozen name must be
among them (a mask made for another model would otherwise freeze nothing), with the shape the
mask was made for; and no trainable tensor may share memory with a frozen one (updating it would
change the frozen tensor: :func:`~freezeguard.core.optim.aliasing.check_no_alias`).

Example:
    >>> import torch, freezeguard as fg
    >>> model = torch.nn.Linear(2, 2)
    >>> check_mask(fg.FreezeMask.from_names(model, ["bias"]), [{"params": [model.weight], "param_names": ["weight"]}])
    Traceback (most recent call last):
    ...
    KeyError: "mask freezes 1 tensor(s) the optimizer's parameters do not include: bias (pass every named parameter of the model the mask was made for, frozen ones included)"
"""
from __future__ import annotations

from typing import Any, Iterable

from freezeguard.core.mask import FreezeMask
from freezeguard.core.optim.aliasing import check_no_alias
from freezeguard.core.optim.checks import name_index


def check_mask(mask: FreezeMask | None, groups: Iterable[dict[str, Any]]) -> None:
    """A mask must be resolvable by name against the optimizer's parameters, with the same shapes,
    and no trainable parameter may share memory with a frozen one."""
    if mask is None:
        return
    if not (hasattr(mask, "is_frozen") and hasattr(mask, "frozen_names")):
        raise TypeError(f"mask must be a freezeguard.FreezeMask (or None), got {type(mask).__name__}")
    groups = list(groups)
    index = name_index(groups)
    if index is None:
        raise ValueError("a FreezeMask is keyed by parameter name, but the optimizer got unnamed parameters; "
                         "pass model.named_parameters() (or (name, tensor) pairs in each param group)")
    unknown = [n for n in mask.frozen_names if n not in index]
    if unknown:
        raise KeyError(f"mask freezes {len(unknown)} tensor(s) the optimizer's parameters do not include: "
                       f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''} (pass every named "
                       "parameter of the model the mask was made for, frozen ones included)")
    layout = getattr(mask, "layout", None) or {}
    reshaped = [f"{n} {tuple(p.shape)} (mask: {layout[n]})" for n, p in index.items()
                if n in layout and tuple(p.shape) != tuple(layout[n])]
    if reshaped:
        raise ValueError(f"mask was made for a different model: {len(reshaped)} parameter(s) have another shape: "
                         f"{', '.join(reshaped[:8])}{' ...' if len(reshaped) > 8 else ''}")
    frozen = [p for n, p in index.items() if mask.is_frozen(n)]
    trainable = [(n, p) for n, p in index.items() if not mask.is_frozen(n)]
    for g in groups:  # unnamed tensors in a named optimizer cannot happen (name_index), but be exact
        if g.get("param_names") is None:
            trainable += [(f"params[{i}]", p) for i, p in enumerate(g["params"])]
    check_no_alias(frozen, trainable)


__all__ = ["check_mask"]
