"""fg.wrap around any torch optimizer, and fg.guard: frozen tensors stay bit-identical, stateless."""
from __future__ import annotations

import pytest
import torch

import freezeguard as fg
from freezeguard.core.guard import unwrap

FROZEN = ["0.weight", "2.bias"]


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(model, opt, steps=3, regrad=True):
    for _ in range(steps):
        if regrad:  # a user (or a library) turning gradients back on must not matter
            for p in model.parameters():
                p.requires_grad_(True)
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_enforced(model, opt, before, frozen=FROZEN):
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name in frozen:
            assert torch.equal(p, before[name]), f"{name} changed"
            assert p not in opt.state, f"{name} has optimizer state"
        else:
            assert not torch.equal(p, before[name]), f"{name} did not train"


class DecayEverything(torch.optim.Optimizer):
    """A third-party style optimizer that decays every parameter, with or without a gradient."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["calls"] = self.state[p].get("calls", 0) + 1
                p.mul_(0.9)
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


OPTIMIZERS = {
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=True),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, fused=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    "third_party": lambda ps: DecayEverything(ps),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_wrap_any_optimizer(kind):
    model = _model()
    mask = fg.FreezeMask.from_names(model, FROZEN)
    opt = fg.wrap(OPTIMIZERS[kind](model.parameters()), mask, model)
    assert not model[0].weight.requires_grad  # apply=True
    before = _snapshot(model)
    _train(model, opt)
    _assert_enforced(model, opt, before)
    # param groups are intact between steps, so state_dict indices stay stable
    assert len(opt.param_groups[0]["params"]) == 4


def test_unwrapped_control_does_change_frozen():
    # The control for the test above: without wrap the same loop changes the "frozen" tensors.
    model = _model()
    opt = DecayEverything(model.parameters())
    before = _snapshot(model)
    _train(model, opt)
    assert not torch.equal(model[0].weight, before["0.weight"])


def test_state_dict_round_trip_drops_frozen_state():
    model = _model()
    plain = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, plain, steps=1)  # state for every tensor, frozen ones included
    sd = plain.state_dict()
    opt = fg.wrap(torch.optim.Adam(model.parameters(), lr=0.01), fg.FreezeMask.from_names(model, FROZEN), model)
    opt.load_state_dict(sd)
    assert model[0].weight not in opt.state and model[0].bias in opt.state
    before = _snapshot(model)
    _train(model, opt)
    _assert_enforced(model, opt, before)
    assert len(opt.state_dict()["state"]) == 2


def test_replaced_parameter_objects_still_frozen_by_name():
    model = _model()
    opt = fg.wrap(torch.optim.SGD(model.parameters(), lr=0.1), fg.FreezeMask.from_names(model, FROZEN), model)
    # What accelerate/FSDP do: new Parameter objects in the model and in the optimizer's groups.
    old = model[0].weight
    new = torch.nn.Parameter(old.detach().clone())
    model[0].weight = new
    opt.param_groups[0]["params"] = [new if p is old else p for p in opt.param_groups[0]["params"]]
    before = _snapshot(model)
    _train(model, opt)
    _assert_enforced(model, opt, before)


class Outer(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.module = inner

    def forward(self, x):
        return self.module(x)


def test_renamed_wrappers_map_to_released_names():
    inner = _model()
    mask = fg.FreezeMask.from_names(inner, FROZEN)
    model = Outer(inner)  # names become module.0.weight, as under DDP
    opt = fg.wrap(torch.optim.AdamW(model.parameters(), lr=0.01), mask, model)
    before = _snapshot(inner)
    _train(model, opt)
    _assert_enforced(inner, opt, before)


def test_refuses_stray_params_and_foreign_masks():
    model = _model()
    mask = fg.FreezeMask.from_names(model, FROZEN)
    extra = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match="neither in the model.*others="):
        fg.wrap(torch.optim.SGD([*model.parameters(), extra], lr=0.1), mask, model)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8))
    with pytest.raises(ValueError, match="not found in the model: 2.bias"):
        fg.wrap(torch.optim.SGD(other.parameters(), lr=0.1), mask, other)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        fg.wrap(object(), mask, model)


class SneakyWriter(torch.optim.SGD):
    """Keeps its own reference to every parameter and writes through it."""

    def __init__(self, params, lr):
        params = list(params)
        super().__init__(params, lr=lr)
        self.everything = params

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for p in self.everything:
            p.add_(1.0)


def test_verify_unchanged_restores_writes_outside_groups():
    model = _model()
    mask = fg.FreezeMask.from_names(model, FROZEN)
    opt = fg.wrap(SneakyWriter(model.parameters(), lr=0.1), mask, model, verify_unchanged=True)
    before = _snapshot(model)
    with pytest.warns(RuntimeWarning, match="wrote 2 frozen"):
        _train(model, opt, steps=1)
    _assert_enforced(model, opt, before)


def test_failed_step_restores_groups_and_unwrap():
    model = _model()
    mask = fg.FreezeMask.from_names(model, FROZEN)
    opt = fg.wrap(torch.optim.SGD(model.parameters(), lr=0.1), mask, model)

    def bad_closure():
        raise ArithmeticError("boom")

    with pytest.raises(ArithmeticError):
        opt.step(bad_closure)
    assert len(opt.state_dict()["param_groups"][0]["params"]) == 4
    unwrap(opt)
    assert not hasattr(opt, "_freezeguard_enforcer")
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_rewrap_replaces_mask():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fg.wrap(opt, fg.FreezeMask.from_names(model, ["0.weight"]), model)
    fg.wrap(opt, fg.FreezeMask.from_names(model, FROZEN), model)
    assert len(opt._optimizer_step_pre_hooks) == 1
    before = _snapshot(model)
    _train(model, opt)
    _assert_enforced(model, opt, before)


def test_guard_returns_fused_adamw():
    model = _model()
    mask = fg.FreezeMask.from_names(model, FROZEN)
    opt = fg.guard(model, mask, lr=0.01, weight_decay=0.1, backend="torch")
    assert isinstance(opt, fg.optim.AdamW)
    assert not model[0].weight.requires_grad and not model[2].bias.requires_grad
    before = _snapshot(model)
    _train(model, opt)
    _assert_enforced(model, opt, before)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8))
    with pytest.raises(ValueError, match="not found in the model"):
        fg.guard(other, mask, lr=0.01)


def test_guard_maps_renamed_model():
    inner = _model()
    mask = fg.FreezeMask.from_names(inner, FROZEN)
    model = Outer(inner)
    opt = fg.guard(model, mask, lr=0.01, backend="torch")
    before = _snapshot(inner)
    _train(model, opt)
    _assert_enforced(inner, opt, before)


def test_public_names_are_callables():
    import freezeguard.core.guard  # noqa: F401  (binding the submodule must not break fg.guard)
    import freezeguard.core.verify  # noqa: F401

    assert callable(fg.guard) and callable(fg.wrap) and callable(fg.verify)
    model = _model()
    assert fg.verify(model, model, fg.FreezeMask.from_names(model, FROZEN)).ok
