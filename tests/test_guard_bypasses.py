"""Ways around fg.guard / fg.wrap found by trying them (issue 26), each closed: a frozen tensor never changes.

Every test here failed before the fix it names (checked against the previous commit).
"""
from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch

import freezeguard as fg
from freezeguard.core.names import FrozenAdapterError


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))


def _step(model, opt) -> None:
    opt.zero_grad()
    model(torch.ones(2, 3)).pow(2).sum().backward()
    opt.step()


def _hooks(opt) -> tuple[int, ...]:
    return tuple(len(d) for d in (opt._optimizer_step_pre_hooks, opt._optimizer_step_post_hooks,
                                  opt._optimizer_state_dict_pre_hooks, opt._optimizer_load_state_dict_post_hooks))


def test_wrap_refuses_a_parameter_sharing_memory_with_a_frozen_one():
    model = _model()
    model.alias = torch.nn.Parameter(model[0].weight.detach()[0])  # a row of the weight (a tied tensor)
    mask = fg.FreezeMask.from_names(model, ["0.weight"])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="shares memory with a frozen tensor"):
        fg.wrap(opt, mask, model)
    assert _hooks(opt) == (0, 0, 0, 0)


def test_wrap_refuses_an_alias_appended_to_the_groups_later():
    model = _model()
    w = model[0].weight.detach().clone()
    model.alias = torch.nn.Parameter(torch.zeros(9))  # a tensor of the released model, trainable
    mask = fg.FreezeMask.from_names(model, ["0.weight"])
    opt = fg.wrap(torch.optim.SGD([p for n, p in model.named_parameters() if n != "alias"], lr=1.0), mask, model)
    model.alias = torch.nn.Parameter(model[0].weight.detach().view(-1))  # later re-pointed at the frozen memory
    opt.param_groups[0]["params"].append(model.alias)
    model.alias.grad = torch.ones_like(model.alias)
    with pytest.raises(ValueError, match="shares memory with a frozen tensor"):
        opt.step()
    assert torch.equal(model[0].weight, w)


def test_unknown_parameters_inside_the_model_are_not_guessed_trainable():
    model = _model()
    mask = fg.FreezeMask.from_names(model, ["0.weight"])
    model.extra = torch.nn.Linear(3, 3)  # e.g. an adapter attached by a closure freezeguard cannot place
    with pytest.raises(ValueError, match=r"neither tensors of the released model .*extra\.weight"):
        fg.wrap(torch.optim.SGD(model.parameters(), lr=1.0), mask, model)
    with pytest.raises(ValueError, match="others="):
        fg.guard(model, mask, lr=1.0)


def test_lbfgs_reading_its_own_parameter_list_is_refused_or_enforced():
    model = _model()
    w = model[0].weight.detach().clone()
    mask = fg.FreezeMask.from_names(model, ["0.weight"])
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0)
    with pytest.raises(RuntimeError, match=r"LBFGS keeps its own list of parameters \(optimizer._params\)"):
        fg.wrap(opt, mask, model)
    assert _hooks(opt) == (0, 0, 0, 0)

    def closure(m, o):
        def run():
            o.zero_grad()
            loss = m(torch.ones(2, 3)).pow(2).sum()
            loss.backward()
            return loss
        return run

    # built over the trainable parameters only (the fix the message gives): accepted and safe
    mask.apply_(model)
    opt = fg.wrap(torch.optim.LBFGS([p for p in model.parameters() if p.requires_grad], lr=1.0), mask, model)
    model[0].weight.requires_grad_(True)
    b = model[1].weight.detach().clone()
    opt.step(closure(model, opt))
    assert torch.equal(model[0].weight, w) and not torch.equal(model[1].weight, b)
    # a frozen tensor appended to that list in place is refused at the next step
    opt.param_groups[0]["params"].append(model[0].weight)
    with pytest.raises(RuntimeError, match="keeps its own list"):
        opt.step(closure(model, opt))
    assert torch.equal(model[0].weight, w)

    # or enforced: verify_unchanged restores what LBFGS wrote through its own list
    model2 = _model()
    w2 = model2[0].weight.detach().clone()
    opt2 = fg.wrap(torch.optim.LBFGS(model2.parameters(), lr=1.0), mask, model2, verify_unchanged=True)
    model2[0].weight.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="restored"):
        opt2.step(closure(model2, opt2))
    assert torch.equal(model2[0].weight, w2)


def test_guard_groups_edited_in_place_cannot_train_a_view_of_a_frozen_weight():
    model = _model()
    w = model[0].weight.detach().clone()
    opt = fg.guard(model, fg.FreezeMask.from_names(model, ["0.weight"]), lr=1.0)
    _step(model, opt)  # a plan exists
    view = torch.nn.Parameter(model[0].weight.detach().view(-1))
    opt.param_groups[0]["params"].append(view)
    opt.param_groups[0]["param_names"].append("not.frozen")
    view.grad = torch.ones_like(view)
    with pytest.raises(ValueError, match="'not.frozen' shares memory with a frozen tensor"):
        _step(model, opt)
    assert torch.equal(model[0].weight, w)


def test_deepcopy_after_editing_param_names_keeps_the_freeze():
    model = _model()
    opt = fg.guard(model, fg.FreezeMask.from_names(model, ["0.weight"]), lr=1.0)
    names = opt.param_groups[0]["param_names"]
    k = names.index("0.weight")
    names[k] = "renamed"
    copied = copy.deepcopy(opt)  # its parameters are copies: they map by position, not by name
    params = copied.param_groups[0]["params"]
    before = params[k].detach().clone()
    for p in params:
        p.grad = torch.ones_like(p)
    copied.step()
    assert torch.equal(params[k], before)
    assert params[k] not in copied.state and not torch.equal(params[k + 1], params[k + 1] * 0)


def test_editing_a_state_dict_does_not_edit_the_optimizer():
    model = _model()
    opt = fg.guard(model, fg.FreezeMask.from_names(model, ["0.weight"]), lr=1.0)
    sd = opt.state_dict()
    sd["param_groups"][0]["param_names"][0] = "edited"
    assert opt.param_groups[0]["param_names"][0] == "0.weight"


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("how", ["guard", "wrap"])
def test_state_dict_with_swapped_names_cannot_move_the_freeze(how, with_state):
    model = _model()
    w = model[0].weight.detach().clone()
    mask = fg.FreezeMask.from_names(model, ["0.weight"])
    if how == "guard":
        opt = fg.guard(model, mask, lr=1.0)
    else:
        opt = fg.wrap(torch.optim.AdamW(model.named_parameters(), lr=1.0), mask, model)
    if with_state:
        _step(model, opt)
    sd = opt.state_dict()
    names = sd["param_groups"][0]["param_names"]
    i, j = names.index("0.weight"), names.index("1.weight")
    names[i], names[j] = names[j], names[i]
    if how == "guard":
        with pytest.raises(ValueError, match="param_names do not match"):
            opt.load_state_dict(sd)
    else:
        opt.load_state_dict(sd)  # wrap resolves frozen tensors by object and released name, never by param_names
    model[0].weight.requires_grad_(True)
    _step(model, opt)
    assert torch.equal(model[0].weight, w)
    assert model[0].weight not in opt.state


def test_alias_check_sees_numpy_views_and_is_fast():
    buf = np.zeros(100, dtype=np.float32)
    m = torch.nn.Module()
    m.a = torch.nn.Parameter(torch.from_numpy(buf[:50]))
    m.b = torch.nn.Parameter(torch.from_numpy(buf[25:75]))  # another storage object, the same memory
    with pytest.raises(ValueError, match="'b' shares memory"):
        fg.optim.AdamW(m.named_parameters(), mask=fg.FreezeMask.from_names(m, ["a"]))

    from freezeguard.core.optim.aliasing import check_no_alias

    base = torch.zeros(40_000)
    views = [base[2 * i:2 * i + 2] for i in range(20_000)]
    start = time.perf_counter()
    check_no_alias(views[::2], [(str(i), v) for i, v in enumerate(views[1::2])])  # adjacent, not overlapping
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, elapsed  # the pairwise check took 7.3 s here; sorted, ~0.14 s
    with pytest.raises(ValueError):
        check_no_alias(views[::2], [("x", base[1:3])])


def test_a_refused_wrap_leaves_the_optimizer_exactly_as_it_was():
    model = _model()
    mask = fg.FreezeMask.from_names(model, ["0.weight"])
    opt = torch.optim.SGD([*model.parameters(), torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(RuntimeError, match="neither in the model"):
        fg.wrap(opt, mask, model)
    assert _hooks(opt) == (0, 0, 0, 0) and not hasattr(opt, "_freezeguard_enforcer")
    opt.step()  # no hook left behind to raise

    # re-wrapping with a mask that does not fit keeps the first wrap in force
    opt = fg.wrap(torch.optim.SGD(model.parameters(), lr=1.0), mask, model)
    enforcer = opt._freezeguard_enforcer
    other = fg.FreezeMask.from_names(torch.nn.Linear(5, 5), ["weight"])
    with pytest.raises(ValueError, match="does not fit"):
        fg.wrap(opt, other, model)
    assert opt._freezeguard_enforcer is enforcer and _hooks(opt) == (1, 1, 1, 1)
    w = model[0].weight.detach().clone()
    model[0].weight.requires_grad_(True)
    _step(model, opt)
    assert torch.equal(model[0].weight, w)


@pytest.mark.parametrize("how", ["guard", "wrap"])
def test_a_peft_lora_added_after_guard_or_wrap_is_refused(how):
    peft = pytest.importorskip("peft")
    model = _model()
    w = model[0].weight.detach().clone()
    mask = fg.FreezeMask.from_names(model, ["0.weight"])
    opt = fg.guard(model, mask, lr=0.1) if how == "guard" else \
        fg.wrap(torch.optim.AdamW(model.parameters(), lr=0.1), mask, model)
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), model)
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    if how == "guard":
        with pytest.raises(FrozenAdapterError, match=r"on 0: 0\.weight"):
            opt.add_param_group({"params": lora})
    else:
        opt.add_param_group({"params": [p for _, p in lora]})  # torch's own method: refused at the step
        with pytest.raises(FrozenAdapterError, match=r"on 0: 0\.weight"):
            _step(model, opt)
    assert torch.equal(model[0].base_layer.weight, w)
