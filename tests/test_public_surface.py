"""Every public name of docs/DESIGN.md section 3 imports from the package root and works as written there.

The package was reorganised into layers (docs/ARCHITECTURE.md); users' code written against the
documented surface must not notice.
"""
from __future__ import annotations

import torch

import freezeguard as fg


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def test_masks_and_files(tmp_path):
    model = _model()
    assert isinstance(fg.__version__, str) and "torch" in fg.available_backends()
    mask = fg.FreezeMask.from_names(model, ["0.weight"])
    assert mask.frozen_names == ["0.weight"] and mask.is_frozen("0.weight") and not mask.is_frozen("2.bias")
    rnd = fg.FreezeMask.random(model, ratio=0.5, by="tensors", seed=0)
    assert rnd.ratio(by="tensors") == 0.5
    scores = {n: float(i) for i, (n, _) in enumerate(model.named_parameters())}
    top = fg.FreezeMask.from_scores(model, scores, ratio=0.25, by="tensors")
    assert top.frozen_names == ["2.bias"]
    path = tmp_path / "mask.safetensors"
    mask.save(path)
    assert fg.FreezeMask.load(path, model=model).frozen_names == mask.frozen_names
    assert isinstance(fg.model_fingerprint(model), str)
    mask.apply_(model)
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad


def test_optimizers_guard_wrap_and_verify():
    released = _model()
    model = _model()
    mask = fg.FreezeMask.from_names(model, ["0.weight"])
    for opt in (fg.optim.AdamW(model.named_parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                               mask=mask, backend="auto"),
                fg.guard(model, mask, lr=1e-2),
                fg.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), mask, model)):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    report = fg.verify(released, model, mask)
    assert report.ok and not report.violations
    assert not torch.equal(model[2].weight, released[2].weight)  # the rest did train


def test_fused_ops_and_the_learner():
    a, b = [torch.ones(3), torch.ones(2)], [torch.full((3,), 2.0), torch.ones(2)]
    assert fg.ops.segment_dot(a, b).tolist() == [6.0, 2.0]
    fg.ops.mask_shift_(a, b, torch.tensor([1.0, 0.0]))
    assert a[0].tolist() == [3.0, 3.0, 3.0] and a[1].tolist() == [1.0, 1.0]

    model = _model()
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    ft = {k: v + 0.1 for k, v in pre.items()}

    def loss_fn(m, batch):
        return (m(batch["x"]).squeeze(1) - batch["y"]) ** 2

    learner = fg.MaskLearner(model, pre, ft, loss_fn, freeze_ratio=0.5, temperature=0.2, c_sparsity=5e3,
                             mask_lr=10.0, user_lr=1e-5, user_interval=2, budget_by="tensors", backend="auto")
    batch = {"x": torch.randn(6, 4), "y": torch.randn(6), "is_target": torch.tensor([1, 0] * 3).bool()}
    assert [learner.step(batch)["kind"] for _ in range(2)] == ["releaser", "user"]
    assert set(learner.soft_mask()) == set(pre)
    assert learner.hard_mask().ratio(by="tensors") == 0.5
    assert callable(fg.diffusion.make_loss_fn) and callable(fg.evaluate.evaluate_masks)
