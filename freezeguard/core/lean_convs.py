"""Frozen ``Conv2d`` layers that keep only their weight for the backward pass.

PyTorch's convolution backward saves the layer's *input* even when the weight needs no gradient
(``Linear`` skips it; measured with saved-tensor hooks, torch 2.13). A frozen conv still has to
pass the gradient on to its input, but that needs only the weight, so the saved input is dead
memory: in an SD-1.5 UNet with 70% of its parameters frozen it is several hundred MiB of
activations per batch (``benchmarks/RESULTS.md``, "Guarded fine-tuning against full fine-tuning on the GPU").

:func:`lean_frozen_convs_` turns every plain ``torch.nn.Conv2d`` whose parameters are all frozen
into a :class:`LeanFrozenConv2d`: same parameters, state dict, ``repr`` and ``isinstance`` answers,
but while its parameters stay frozen its forward runs through an autograd Function that saves
nothing but the weight. If a parameter becomes trainable again, it behaves as a plain ``Conv2d``
(checked on every forward), so it can never drop a gradient. ``fg.guard(..., lean_frozen_convs=True)``
applies it after freezing.

Example:
    >>> import torch, freezeguard as fg
    >>> conv = torch.nn.Conv2d(2, 2, 3, padding=1).requires_grad_(False)
    >>> fg.lean_frozen_convs_(torch.nn.Sequential(conv))
    1
    >>> x = torch.randn(1, 2, 4, 4, requires_grad=True)
    >>> conv(x).sum().backward(); x.grad.shape
    torch.Size([1, 2, 4, 4])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _FrozenConv2dFunction(torch.autograd.Function):
    """conv2d whose backward computes only the input gradient, from the weight alone."""

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


class LeanFrozenConv2d(torch.nn.Conv2d):
    """A ``Conv2d`` that saves no input activation while all of its parameters are frozen."""

    def _lean_applies(self, x: torch.Tensor) -> bool:
        return (torch.is_grad_enabled() and x.requires_grad
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and not any(p.requires_grad for p in self.parameters()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._lean_applies(x):
            return super().forward(x)
        w, b = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):  # autocast does not reach into a custom Function
            dt = torch.get_autocast_dtype(x.device.type)
            x, w, b = x.to(dt), w.to(dt), None if b is None else b.to(dt)
        return _FrozenConv2dFunction.apply(x, w, b, self.stride, self.padding, self.dilation, self.groups)


def lean_frozen_convs_(model: torch.nn.Module) -> int:
    """Make every plain ``Conv2d`` of ``model`` whose parameters are all frozen a :class:`LeanFrozenConv2d`.

    Run it after the mask is applied (``mask.apply_(model)``). Subclasses of ``Conv2d`` (e.g.
    adapter layers) are left alone. Returns how many layers changed.
    """
    n = 0
    for m in model.modules():
        if type(m) is torch.nn.Conv2d and not any(p.requires_grad for p in m.parameters()):
            m.__class__ = LeanFrozenConv2d  # same attributes and parameters; only forward differs
            n += 1
    return n


__all__ = ["LeanFrozenConv2d", "lean_frozen_convs_"]
