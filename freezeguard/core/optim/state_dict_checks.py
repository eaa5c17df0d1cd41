"""What ``fg.optim.AdamW.load_state_dict`` refuses, checked before anything is loaded.

A state dict is input from elsewhere, and under a mask it must not be a way around it:

* options the fused update does not implement, and step counts that are not counts;
* under a mask, ``param_names`` that are not this optimizer's, position by position. Names stay
  bound to the parameter objects, but torch takes the saved ``param_names`` as the truth, so two
  swapped names would give tensors another's state and name (and could move the freeze);
* under a mask, a saved state tensor that shares memory with a frozen tensor: the update would
  write into the frozen tensor in place.

Example:
    >>> import torch
    >>> check_state_dict({"param_groups": [{"amsgrad": True}], "state": {}}, [], [], masked=False)
    Traceback (most recent call last):
    ...
    NotImplementedError: load_state_dict: amsgrad=True is not supported by freezeguard's masked AdamW; use torch.optim.AdamW for these variants (fg.wrap can still enforce a mask)
"""
from __future__ import annotations

from typing import Any

import torch

from freezeguard.core.names import canonical_name
from freezeguard.core.optim.aliasing import check_no_alias
from freezeguard.core.optim.checks import check_options, check_step


def _same_name(a: str, b: str) -> bool:
    return a == b or canonical_name(a) == canonical_name(b)


def check_state_dict(state_dict: dict[str, Any], param_groups: list[dict[str, Any]], frozen: list[torch.Tensor],
                     *, masked: bool) -> None:
    """Raise, naming the first problem, if ``state_dict`` may not be loaded into an optimizer with
    these ``param_groups`` whose ``frozen`` tensors a mask freezes (``masked``)."""
    saved_groups = state_dict["param_groups"]
    for group in saved_groups:
        check_options(group, "load_state_dict")
    for key, st in state_dict["state"].items():
        if isinstance(st, dict) and "step" in st:
            check_step(st["step"], f"load_state_dict: state[{key!r}]")
    if not masked:
        return
    if len(saved_groups) == len(param_groups):
        for gi, (group, saved) in enumerate(zip(param_groups, saved_groups, strict=True)):
            ours, theirs = group.get("param_names"), saved.get("param_names")
            if ours is None or theirs is None or len(theirs) != len(ours):
                continue  # unnamed on either side: positional, as torch; a length mismatch torch refuses
            moved = [(i, a, b) for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if not _same_name(a, b)]
            if moved:
                i, a, b = moved[0]
                raise ValueError(f"load_state_dict: the state dict's param_names do not match this optimizer's "
                                 f"parameters ({len(moved)} position(s) in group {gi}, e.g. position {i}: saved "
                                 f"{b!r}, here {a!r}); loading it would give tensors another's state and name "
                                 f"(and could move the mask), so it is refused")
    for key, st in state_dict["state"].items():  # a state tensor that *is* a frozen tensor would be updated
        tensors = [(f"state[{key!r}][{k!r}]", v) for k, v in (st.items() if isinstance(st, dict) else ())
                   if isinstance(v, torch.Tensor) and k != "step"]
        try:
            check_no_alias(frozen, tensors)
        except ValueError as exc:
            raise ValueError(f"load_state_dict: {exc}") from None


__all__ = ["check_state_dict"]
