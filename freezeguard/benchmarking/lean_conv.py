"""Experiment (issue 6, item 3): frozen ``Conv2d`` layers that do not keep their input for backward.

PyTorch's convolution backward saves the layer's input even when the weight needs no gradient
(``Linear`` does skip it: measured with saved-tensor hooks, torch 2.13). A frozen conv still needs
the input *gradient*, which depends only on the weight, so its input activation is dead weight.
:func:`lean_frozen_convs_` swaps the forward of every fully frozen ``Conv2d`` for an autograd
Function that saves nothing but the weight; the benchmark measures what that saves. It is a
candidate for ``fg.guard`` (an opt-in), not part of the public API.

Example:
    >>> import torch
    >>> conv = torch.nn.Conv2d(2, 2, 3, padding=1).requires_grad_(False)
    >>> lean_frozen_convs_(torch.nn.Sequential(conv))
    1
    >>> x = torch.randn(1, 2, 4, 4, requires_grad=True)
    >>> conv(x).sum().backward(); x.grad.shape
    torch.Size([1, 2, 4, 4])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _FrozenConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(shape, weight.to(grad.dtype), grad, stride, padding, dilation, groups)
        return gx, None, None, None, None, None, None


def _lean_forward(conv: torch.nn.Conv2d):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
            return torch.nn.Conv2d.forward(conv, x)
        w, b = conv.weight, conv.bias
        if torch.is_autocast_enabled(x.device.type):  # autocast does not reach into a custom Function
            dt = torch.get_autocast_dtype(x.device.type)
            x, w, b = x.to(dt), w.to(dt), None if b is None else b.to(dt)
        return _FrozenConv2d.apply(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
    return forward


def lean_frozen_convs_(model: torch.nn.Module) -> int:
    """Patch every Conv2d whose parameters all have ``requires_grad=False``; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and not any(p.requires_grad for p in m.parameters()):
            m.forward = _lean_forward(m)
            n += 1
    return n
