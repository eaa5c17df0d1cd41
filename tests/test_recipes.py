"""What trainers do that the guard cannot see, and what protects there (docs/recipes.md).

* OneTrainer's fused back pass (``modules/trainer/GenericTrainer.py``, ``__apply_fused_back_pass``)
  updates each parameter inside a ``register_post_accumulate_grad_hook`` hook, for the parameters
  that have ``requires_grad`` when it registers them; ``optimizer.step()`` never runs.
* DeepSpeed through accelerate hands the script ``accelerate.utils.deepspeed.DummyOptim`` (not an optimizer).
* torchao ``torchao/optim/cpu_offload.py`` ``CPUOffloadOptimizer`` subclasses ``Optimizer`` without
  calling ``Optimizer.__init__`` ("we don't call Optimizer.__init__(), there is no self.defaults").
* ai-toolkit ``toolkit/ema.py`` ``ExponentialMovingAverage.update`` with ``use_feedback`` writes
  ``param += 10 * (1 - decay) * (shadow - param)`` into the parameters after the step.

Where only ``mask.apply_`` (at the right moment) and ``fg.verify`` on the output protect.
"""
from __future__ import annotations

import pytest
import torch

import freezeguard as fg


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


def _released(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fused_back_pass(model, optimizer):
    """OneTrainer's pattern: a per-parameter update in a post-accumulate-grad hook, for the parameters
    that require grad when the hooks are registered."""
    handles = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                def hook(t, group=group):
                    with torch.no_grad():
                        t.add_(t.grad, alpha=-group["lr"])
                    t.grad = None
                handles.append(p.register_post_accumulate_grad_hook(hook))
    return handles


def _backward(model):
    model(torch.ones(3, 4)).pow(2).sum().backward()


def test_onetrainer_fused_back_pass_bypasses_wrap_mask_apply_before_setup_protects():
    mask = fg.FreezeMask.from_names(_model(), ["0.weight"])
    # wrap's hooks live on optimizer.step(), which a fused back pass never calls: the guard cannot see it
    model = _model()
    released = _released(model)
    opt = fg.wrap(torch.optim.SGD(model.parameters(), lr=0.1), mask, model)
    model[0].weight.requires_grad_(True)  # OneTrainer sets requires_grad per model part at setup
    _fused_back_pass(model, opt)
    _backward(model)
    assert not torch.equal(model[0].weight, released["0.weight"])
    assert not fg.verify(released, model.state_dict(), mask).ok  # verify on the output catches it

    # mask.apply_ before the hooks are registered: the frozen tensor gets no hook, whatever comes later
    model = _model()
    released = _released(model)
    mask.apply_(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _fused_back_pass(model, opt)
    model[0].weight.requires_grad_(True)  # a later reset makes a grad, but no hook updates it
    _backward(model)
    assert torch.equal(model[0].weight, released["0.weight"])
    assert fg.verify(released, model.state_dict(), mask).ok


def test_deepspeed_dummy_optim_is_refused_with_the_fix():
    deepspeed_utils = pytest.importorskip("accelerate.utils.deepspeed")
    model = _model()
    mask = fg.FreezeMask.from_names(model, ["0.weight"])
    dummy = deepspeed_utils.DummyOptim(model.parameters(), lr=1e-3)
    with pytest.raises(TypeError, match="needs a torch.optim.Optimizer"):
        fg.wrap(dummy, mask, model)
    # what protects: the mask applied before accelerate.prepare builds DeepSpeed's optimizer, which
    # takes only the parameters that require grad (as DummyOptim's params are usually built)
    mask.apply_(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p is not model[0].weight for p in trainable)


def test_an_optimizer_skipping_optimizer_init_is_refused_with_the_fix():
    class SkipsInit(torch.optim.Optimizer):  # torchao CPUOffloadOptimizer's pattern
        def __init__(self, params):
            self.param_groups = [{"params": list(params)}]
            self.state = {}

        def step(self, closure=None):
            for p in self.param_groups[0]["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-0.1)

    model = _model()
    mask = fg.FreezeMask.from_names(model, ["0.weight"])
    with pytest.raises(TypeError, match=r"skip torch.optim.Optimizer.__init__.*mask.apply_\(model\)"):
        fg.wrap(SkipsInit(model.parameters()), mask, model)


def test_aitoolkit_ema_feedback_writes_outside_the_step_only_apply_and_verify_protect():
    model = _model()
    released = _released(model)
    mask = fg.FreezeMask.from_names(model, ["0.weight"])
    opt = fg.wrap(torch.optim.SGD(model.parameters(), lr=0.1), mask, model)
    shadow = [p.detach().clone() + 0.01 for p in model.parameters()]  # an EMA that drifted
    decay = 0.99
    for _ in range(2):
        opt.zero_grad()
        _backward(model)
        opt.step()
        with torch.no_grad():  # toolkit/ema.py update() with use_feedback
            for s, p in zip(shadow, model.parameters(), strict=True):
                tmp = (s - p) * (1 - decay)
                s.sub_(tmp)
                p.add_(tmp * 10)
    assert not torch.equal(model[0].weight, released["0.weight"])  # the guard never saw this write
    assert not fg.verify(released, model.state_dict(), mask).ok
