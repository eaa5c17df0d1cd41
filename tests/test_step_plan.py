"""fg.optim.AdamW's cached step plan: reused while nothing changes, rebuilt whenever something does.

Every step here gets fresh gradient tensors (as zero_grad(set_to_none=True) gives), and each
result is compared with torch.optim.AdamW doing the same steps.
"""
from __future__ import annotations

import copy

import pytest
import torch

import freezeguard as fg
from freezeguard.ops import native_shortcuts as _shortcuts


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _grads(model, step, skip=()):
    gen = torch.Generator().manual_seed(100 + step)
    for name, p in model.named_parameters():
        g = torch.randn(p.shape, generator=gen)
        p.grad = None if name in skip else g  # a new tensor every step


def _pair(mask_names=(), **kw):
    a, b = _model(), _model()
    mask = fg.FreezeMask.from_names(a, list(mask_names))
    ours = fg.optim.AdamW(a.named_parameters(), lr=1e-2, mask=mask, **kw)
    trainable = [p for n, p in b.named_parameters() if n not in mask_names]
    ref = torch.optim.AdamW(trainable, lr=1e-2, foreach=False)
    return a, b, ours, ref


def _assert_same(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_plan_is_reused_across_steps_with_fresh_grads(native, monkeypatch):
    if not native:
        monkeypatch.setattr(_shortcuts, "_native", lambda: None)
        monkeypatch.setenv("FREEZEGUARD_BACKEND", "torch")
    a, b, ours, ref = _pair(["0.bias"])
    plans = []
    for s in range(5):
        _grads(a, s)
        _grads(b, s)
        ours.step()
        ref.step()
        plans.append(ours._plan)
    assert all(p is plans[0] for p in plans)
    _assert_same(a, b)
    assert dict(a.named_parameters())["0.bias"] not in ours.state


def test_tensors_without_a_grad_are_skipped_and_join_later():
    a, b, ours, ref = _pair()
    for s in range(6):
        skip = {"2.weight"} if s < 3 else ({"0.bias"} if s == 4 else set())
        _grads(a, s, skip)
        _grads(b, s, skip)
        ours.step()
        ref.step()
    _assert_same(a, b)
    named = dict(a.named_parameters())
    assert float(ours.state[named["2.weight"]]["step"]) == 3.0
    assert float(ours.state[named["0.bias"]]["step"]) == 5.0


def test_changes_rebuild_the_plan():
    a, b, ours, ref = _pair(["0.weight"])
    _grads(a, 0)
    ours.step()
    first = ours._plan
    named = dict(a.named_parameters())
    # state planted for a frozen tensor is dropped at the next step (the plan notices the count)
    ours.state[named["0.weight"]] = {"step": torch.tensor(1.0), "exp_avg": torch.ones(5, 6),
                                     "exp_avg_sq": torch.ones(5, 6)}
    before = named["0.weight"].detach().clone()
    _grads(a, 1)
    ours.step()
    assert ours._plan is not first and named["0.weight"] not in ours.state
    assert torch.equal(named["0.weight"], before)
    # a new mask
    second = ours._plan
    ours.set_mask(fg.FreezeMask.from_names(a, ["2.bias"]))
    _grads(a, 2)
    ours.step()
    assert ours._plan is not second and named["2.bias"] not in ours.state
    assert float(ours.state[named["0.weight"]]["step"]) == 1.0
    # state cleared behind the optimizer's back: counts restart, nothing stale is used
    third = ours._plan
    ours.state.clear()
    _grads(a, 3)
    ours.step()
    assert ours._plan is not third and float(ours.state[named["0.bias"]]["step"]) == 1.0


def test_param_group_edits_rebuild_the_plan():
    a, b, ours, ref = _pair()
    _grads(a, 0)
    ours.step()
    plan = ours._plan
    group = ours.param_groups[0]
    group["params"] = group["params"][:2]  # the group now holds fewer tensors
    group["param_names"] = group["param_names"][:2]
    named = dict(a.named_parameters())
    before = named["2.weight"].detach().clone()
    _grads(a, 1)
    ours.step()
    assert ours._plan is not plan
    assert torch.equal(named["2.weight"], before)
    assert float(ours.state[named["0.weight"]]["step"]) == 2.0


def test_lr_schedulers_and_hyperparameter_edits_apply_without_a_rebuild():
    a, b, ours, ref = _pair()
    s_ours = torch.optim.lr_scheduler.StepLR(ours, step_size=1, gamma=0.5)
    s_ref = torch.optim.lr_scheduler.StepLR(ref, step_size=1, gamma=0.5)
    for s in range(4):
        _grads(a, s)
        _grads(b, s)
        ours.param_groups[0]["weight_decay"] = ref.param_groups[0]["weight_decay"] = 0.01 * s
        ours.step()
        ref.step()
        s_ours.step()
        s_ref.step()
    _assert_same(a, b)


def test_load_state_dict_and_dtype_changes_are_seen():
    a, b, ours, ref = _pair()
    for s in range(2):
        _grads(a, s)
        _grads(b, s)
        ours.step()
        ref.step()
    # new state object (a copy: torch's load_state_dict shares same-dtype tensors): the plan is rebuilt on it
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    for s in range(2, 4):
        _grads(a, s)
        _grads(b, s)
        ours.step()
        ref.step()
    _assert_same(a, b)
    a.to(torch.bfloat16)  # the cached state is fp32 now: caught, with the parameter's name
    for p in a.parameters():
        p.grad = torch.randn(p.shape).bfloat16()
    with pytest.raises(ValueError, match="moved or cast"):
        ours.step()


def test_invalidate_step_plan_after_swapping_a_state_tensor():
    a, b, ours, ref = _pair()
    _grads(a, 0)
    ours.step()
    w = dict(a.named_parameters())["0.weight"]
    ours.state[w]["exp_avg"] = torch.zeros_like(w)
    ours.invalidate_step_plan()
    _grads(a, 1)
    ours.step()
    assert ours.state[w]["exp_avg"].abs().sum() > 0  # the new tensor was the one updated


def test_wrap_resolves_names_once_until_the_optimizer_params_change(monkeypatch):
    from freezeguard.core import guard as guard_mod

    calls = []
    real = guard_mod.frozen_parameter_ids
    monkeypatch.setattr(guard_mod, "frozen_parameter_ids", lambda *a: calls.append(1) or real(*a))
    model = _model()
    named = dict(model.named_parameters())
    before = named["0.weight"].detach().clone()
    opt = fg.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), fg.FreezeMask.from_names(model, ["0.weight"]),
                  model)
    named["0.weight"].requires_grad_(True)
    for s in range(4):
        _grads(model, s)  # the frozen tensor gets a gradient too: it must still not move
        opt.step()
    assert len(calls) == 1
    assert torch.equal(named["0.weight"], before) and named["0.weight"] not in opt.state
    # new parameter objects in the optimizer (what accelerate does): resolved by name again
    new = torch.nn.Parameter(named["0.weight"].detach().clone())
    model[0].weight = new
    opt.param_groups[0]["params"] = [new if p is named["0.weight"] else p for p in opt.param_groups[0]["params"]]
    _grads(model, 9)
    opt.step()
    assert len(calls) == 2 and torch.equal(new, before) and new not in opt.state
