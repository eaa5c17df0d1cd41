"""Work around a CPU crash of torch's GroupNorm backward that freezing tensors brings out.

torch 2.13.0 (CPU) dies with a segmentation fault in ``GroupNormBackwardKernelImplChannelsLast``
when a GroupNorm's input is in channels-last layout and does not require a gradient while the
norm's own weight or bias does. Freezing makes exactly that common: when every tensor before a
GroupNorm is frozen (say conv_in and the time embedding), its input needs no gradient. Found with
a random 50%-by-parameters mask on the example pipeline (``freezeguard evaluate`` died on the
fourth random mask); plain ``requires_grad_(False)`` plus ``torch.optim.AdamW`` crashes the same,
so the bug is torch's. Reproduction (exit 139 on torch 2.13.0+cpu)::

    gn = torch.nn.GroupNorm(2, 8)
    x = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last)   # requires no grad
    gn(x).sum().backward()

The fix hands such an input to GroupNorm in the default (contiguous) layout, which takes torch's
other, sound kernel: same values, one copy of that activation, and only in the crashing case.

Example:
    >>> import torch
    >>> gn = torch.nn.GroupNorm(2, 8)
    >>> protect_group_norms(gn)
    1
    >>> x = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last)
    >>> gn(x).sum().backward()
    >>> gn.weight.grad.shape
    torch.Size([8])
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["protect_group_norms"]

_MARK = "_freezeguard_group_norm_fix"


def _contiguous_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0] if args else None
    if (isinstance(x, torch.Tensor) and torch.is_grad_enabled() and not x.requires_grad and x.dim() == 4
            and x.device.type == "cpu" and not x.is_contiguous()):
        return (x.contiguous(), *args[1:])
    return None


def protect_group_norms(model: torch.nn.Module) -> int:
    """Install the fix on every ``GroupNorm`` of ``model`` (once each); returns how many got it now."""
    added = 0
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm) and not getattr(module, _MARK, False):
            module.register_forward_pre_hook(_contiguous_input)
            setattr(module, _MARK, True)
            added += 1
    return added
