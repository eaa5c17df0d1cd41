"""Lean frozen convs (freezeguard/core/lean_convs.py): same outputs and gradients, less saved for backward."""
from __future__ import annotations

import copy

import pytest
import torch

import freezeguard as fg
from freezeguard.core.lean_convs import LeanFrozenConv2d, lean_frozen_convs_
from freezeguard.integrations.diffusers.bench_presets import build_unet, make_batch


def _saved_numel(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = fn()
    return out, sum(saved)


def _conv_mask(unet):
    """Freeze every conv except conv_in: the gradient must flow back through frozen convs."""
    names = [f"{name}.{p}" for name, m in unet.named_modules()
             if isinstance(m, torch.nn.Conv2d) and name != "conv_in" for p, _ in m.named_parameters()]
    return fg.FreezeMask.from_names(unet, names)


@pytest.mark.parametrize("lean", [False, True])
def test_guard_with_lean_convs_keeps_gradients_and_saves_less(lean):
    def run(lean_convs: bool):
        torch.manual_seed(0)
        unet = build_unet("tiny")
        fg.guard(unet, _conv_mask(unet), lr=1e-3, lean_frozen_convs=lean_convs)
        batch = make_batch(unet, 2, 8)
        out, saved = _saved_numel(lambda: unet(**batch).sample)
        out.square().mean().backward()
        return unet, out, saved

    ref_unet, ref_out, ref_saved = run(False)
    unet, out, saved = run(lean)
    n_lean = sum(isinstance(m, LeanFrozenConv2d) for m in unet.modules())
    assert (n_lean > 5) == lean
    torch.testing.assert_close(out, ref_out)
    for (name, p), q in zip(unet.named_parameters(), ref_unet.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert (saved < ref_saved) == lean
    assert unet.state_dict().keys() == ref_unet.state_dict().keys()


def test_a_conv_made_trainable_again_gets_its_gradient():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)
    assert lean_frozen_convs_(torch.nn.Sequential(conv)) == 1
    conv.requires_grad_(True)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    conv(x).sum().backward()
    assert conv.weight.grad is not None and conv.bias.grad is not None
    assert isinstance(conv, torch.nn.Conv2d)


def test_deepcopy_keeps_its_own_weights():
    conv = torch.nn.Conv2d(2, 2, 3, padding=1).requires_grad_(False)
    lean_frozen_convs_(torch.nn.Sequential(conv))
    twin = copy.deepcopy(conv)
    with torch.no_grad():
        twin.weight.zero_()
        twin.bias.zero_()
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    assert torch.count_nonzero(twin(x)) == 0
    assert torch.count_nonzero(conv(x)) > 0


@pytest.mark.parametrize("conv_kwargs", [dict(padding=1), dict(padding="same"), dict(padding=1, stride=2),
                                         dict(padding=1, groups=2, dilation=2), dict(padding=1, bias=False),
                                         dict(padding=1, padding_mode="reflect")])
def test_matches_a_plain_conv(conv_kwargs):
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(4, 6, 3, **conv_kwargs).requires_grad_(False)
    lean = copy.deepcopy(plain)
    lean_frozen_convs_(torch.nn.Sequential(lean))
    x = torch.randn(2, 4, 9, 9)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = plain(xa), lean(xb)
    torch.testing.assert_close(yb, ya)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)


def test_autocast_bf16_matches_a_plain_conv():
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(4, 4, 3, padding=1).requires_grad_(False)
    lean = copy.deepcopy(plain)
    lean_frozen_convs_(torch.nn.Sequential(lean))
    xa = torch.randn(1, 4, 6, 6, requires_grad=True)
    xb = xa.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = plain(xa), lean(xb)
    assert yb.dtype == ya.dtype == torch.bfloat16
    torch.testing.assert_close(yb, ya)
    ya.float().sum().backward()
    yb.float().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=2e-2, atol=2e-2)


def test_inputs_without_grad_and_subclasses_are_left_alone():
    class MyConv(torch.nn.Conv2d):
        pass

    model = torch.nn.Sequential(MyConv(2, 2, 1), torch.nn.Conv2d(2, 2, 1)).requires_grad_(False)
    assert lean_frozen_convs_(model) == 1
    assert type(model[0]) is MyConv
    _, saved = _saved_numel(lambda: model(torch.randn(1, 2, 3, 3)))
    assert saved == 0  # nothing needs a gradient: nothing is saved either way
