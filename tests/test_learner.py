"""MaskLearner options, logs, save/resume and errors, on a small MLP (fast on CPU).

Equivalence with the authors' loop on a tiny UNet lives in test_learner_reference.py.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from support.tolerances import KERNEL

import freezeguard as fg
from freezeguard.apps.learn.logits import budget_weights, updated_logits
from freezeguard.backends.reference import user_adamw_ as reference_user_adamw_
from freezeguard.core.mask import select_budget

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Tensors of very different sizes, so "tensors" and "params" budgets differ.
    return torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 1))


def states(model: torch.nn.Module, scale: float = 0.1, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    pre = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ft = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in pre.items()}
    return pre, ft


def loss_fn(model, batch):
    return (model(batch["x"]).squeeze(1) - batch["y"]) ** 2


def batches(n: int, bsz: int = 8, seed: int = 2, targets: list[bool] | None = None) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    flags = torch.tensor(targets if targets is not None else [True, False] * (bsz // 2))
    return [{"x": torch.randn(len(flags), 6, generator=gen), "y": torch.randn(len(flags), generator=gen),
             "is_target": flags.clone()} for _ in range(n)]


def make(model_seed: int = 0, **kw) -> tuple[fg.MaskLearner, torch.nn.Module]:
    model = mlp(model_seed)
    pre, ft = states(model)
    kw.setdefault("user_lr", 1e-2)
    kw.setdefault("backend", "torch")
    return fg.MaskLearner(model, pre, ft, loss_fn, **kw), model


# --- construction --------------------------------------------------------------------------
def test_initial_live_weights_interpolate_pretrained_and_finetuned():
    model = mlp()
    pre, ft = states(model)
    learner = fg.MaskLearner(model, pre, ft, loss_fn, temperature=0.2, seed=4, backend="torch")
    m = learner.soft_mask()
    assert all(v > 0.5 for v in m.values())  # U[0,1) logits: everything starts (softly) frozen
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ft[name] + m[name] * (pre[name] - ft[name]))
    assert not any(p.is_set_to(pre[n]) or p.is_set_to(ft[n]) for n, p in model.named_parameters())


def test_logit_init_is_seeded():
    a, _ = make(seed=0)
    b, _ = make(model_seed=5, seed=0)
    c, _ = make(seed=9)
    assert torch.equal(a.logits, b.logits) and not torch.equal(a.logits, c.logits)


# --- schedule and logs -----------------------------------------------------------------------
def test_schedule_and_log_entries():
    learner, model = make(user_interval=3)
    data = batches(7)
    logs = [learner.step(b) for b in data]
    assert [e["kind"] for e in logs] == ["releaser", "user", "user"] * 2 + ["releaser"]
    assert [e["step"] for e in logs] == list(range(7))
    assert learner.history == logs
    e = logs[0]
    assert e["n_target"] == 4 and e["n_innocent"] == 4
    assert 0.0 <= e["frozen_ratio"] <= 1.0 and 0.0 <= e["soft_ratio"] <= 1.0
    # The logged losses are the batch means before the update.
    fresh, fresh_model = make(user_interval=3)
    with torch.no_grad():
        ell = loss_fn(fresh_model, data[0])
    flags = data[0]["is_target"]
    assert e["target_loss"] == pytest.approx(ell[flags].mean().item(), rel=1e-5)
    assert e["innocent_loss"] == pytest.approx(ell[~flags].mean().item(), rel=1e-5)
    assert e["loss"] == pytest.approx((ell[~flags].mean() - ell[flags].mean()).item() / 2, rel=1e-5, abs=1e-7)
    # The frozen ratio is the reference's rounding of the soft mask.
    m = torch.sigmoid(learner.logits / learner.temperature)
    assert logs[-1]["frozen_ratio"] == pytest.approx((m > 0.5).float().mean().item())


def test_user_step_is_sgd_on_the_unfrozen_share():
    learner, model = make(user_interval=2)
    data = batches(2)
    learner.step(data[0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta_before = [d.clone() for d in learner._delta]
    m = torch.sigmoid(learner.logits / learner.temperature)
    model.zero_grad()
    loss_fn(model, data[1]).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert learner.step(data[1])["kind"] == "user"
    for i, (n, p) in enumerate(model.named_parameters()):
        u = -learner.user_lr * (1 - m[i]) * grads[n]
        torch.testing.assert_close(p.detach(), before[n] + (1 - m[i]) * u)
        torch.testing.assert_close(learner._delta[i], delta_before[i] - u)


# --- the budget -------------------------------------------------------------------------------
@pytest.mark.parametrize("by", ["tensors", "params"])
def test_logit_update_is_the_gradient_of_the_budget_penalty(by):
    torch.manual_seed(0)
    sizes = [7, 300, 2, 40]
    w = budget_weights(sizes, by)
    x = torch.randn(4)
    s = torch.randn(4)
    T, rho, c, lr = 0.3, 0.25, 7.0, 0.5
    new = updated_logits(x, s, weights=w, ratio=rho, temperature=T, c_sparsity=c, mask_lr=lr)
    xv = x.clone().requires_grad_(True)
    m = torch.sigmoid(xv / T)
    objective = lr * (s * m).sum() + c * (rho - (w * m).sum()) ** 2  # d/dx of <s, m> is s * dm/dx
    objective.backward()
    torch.testing.assert_close(new, x - xv.grad)
    expected_w = torch.tensor(sizes, dtype=torch.float32) / sum(sizes) if by == "params" else torch.full((4,), 0.25)
    torch.testing.assert_close(w, expected_w)


@pytest.mark.parametrize("by", ["tensors", "params"])
def test_budget_penalty_pulls_the_soft_mask_to_the_ratio(by):
    # mask_lr = 0: only the budget moves the logits; it must settle at rho by its own basis.
    learner, model = make(user_interval=1, budget_by=by, freeze_ratio=0.3, mask_lr=0.0,
                          c_sparsity=20.0, temperature=1.0)
    for b in batches(60):
        learner.step(b)
    m = torch.sigmoid(learner.logits / learner.temperature)
    sizes = torch.tensor([p.numel() for p in model.parameters()], dtype=torch.float32)
    w = sizes / sizes.sum() if by == "params" else torch.full_like(sizes, 1 / len(sizes))
    assert (w * m).sum().item() == pytest.approx(0.3, abs=0.02)
    assert learner.history[-1]["soft_ratio"] == pytest.approx((w * m).sum().item())


@pytest.mark.parametrize("by", ["tensors", "params"])
@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.5, 1.0])
def test_hard_mask_meets_the_budget_exactly_with_the_highest_logits(by, ratio):
    learner, model = make(budget_by=by, freeze_ratio=ratio)
    torch.manual_seed(1)
    learner.logits.copy_(torch.randn(len(learner.names)))
    mask = learner.hard_mask()
    order = [n for _, n in sorted(zip((-learner.logits).tolist(), learner.names, strict=True))]
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    assert mask.frozen_names == sorted(select_budget(order, sizes, ratio, by))
    if by == "tensors":
        assert mask.ratio("tensors") == round(ratio * len(learner.names)) / len(learner.names)
    assert mask == fg.FreezeMask.from_scores(model, dict(zip(learner.names, learner.logits.tolist(), strict=True)), ratio, by=by)
    assert mask.metadata["source"] == "mask_learner"


def test_hard_mask_threshold_is_the_references_rounding():
    learner, model = make()
    T = learner.temperature
    # m exactly 0.5 rounds to 0 in numpy (half to even): not frozen.
    learner.logits.copy_(torch.tensor([1.0, -1.0, 0.0, 2.0, -0.01, 0.01]) * T)
    mask = learner.hard_mask(rule="threshold")
    expected = [n for n, v in zip(learner.names, [1, 0, 0, 1, 0, 1], strict=True) if v]
    assert mask.frozen_names == sorted(expected)
    assert learner.hard_mask("threshold") == mask == learner.hard_mask(method="threshold")  # method=: rule='s old name
    assert json.loads(mask.metadata["learning"])["hard_mask"] == "threshold"
    # "round", the rule's former name, is no alias any more: refused, naming what it became
    for call in (lambda: learner.hard_mask("round"), lambda: learner.hard_mask(method="round")):
        with pytest.raises(ValueError, match="^unknown hard-mask rule 'round': it was renamed to 'threshold'$"):
            call()
    with pytest.raises(ValueError, match="unknown hard-mask rule 'nearest': the rules are topk, threshold"):
        learner.hard_mask("nearest")


# --- the AdamW user ---------------------------------------------------------------------------
def test_adamw_user_is_torch_adamw_on_the_finetuned_weights():
    hp = dict(user_lr=3e-3, user_betas=(0.8, 0.99), user_eps=1e-6, user_weight_decay=0.1)
    learner, model = make(user_interval=100, user_optimizer="adamw", **hp)
    learner.step(batches(1)[0])  # step 0 is a releaser step; m is fixed afterwards
    m = torch.sigmoid(learner.logits / learner.temperature)
    theta_pre = [p.detach() + 0 for p in model.parameters()]
    theta_pre = [t + (1 - mi) * d for t, mi, d in zip(theta_pre, m, learner._delta, strict=True)]  # theta + (1-m) Delta
    theta_ft = [torch.nn.Parameter(t - d) for t, d in zip(theta_pre, learner._delta, strict=True)]
    ref_opt = torch.optim.AdamW(theta_ft, lr=hp["user_lr"], betas=hp["user_betas"], eps=hp["user_eps"],
                                weight_decay=hp["user_weight_decay"])
    for b in batches(5, seed=7):
        model.zero_grad()
        loss_fn(model, b).mean().backward()
        for q, p, mi in zip(theta_ft, model.parameters(), m, strict=True):
            q.grad = (1 - mi) * p.grad  # d loss / d theta_ft, since theta = (1-m) theta_ft + m theta_pre
        model.zero_grad()
        ref_opt.step()
        assert learner.step(b)["kind"] == "user"
        for q, p, d, tp, mi in zip(theta_ft, model.parameters(), learner._delta, theta_pre, m, strict=True):
            torch.testing.assert_close(d, tp - q.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(p.detach(), q.detach() + mi * (tp - q.detach()), rtol=1e-5, atol=1e-6)
    assert learner.user_steps == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_user_fused_path_matches_its_per_tensor_reference(dtype):
    torch.manual_seed(0)
    shapes = [(3, 5), (0,), (1,), (17,), (4, 4, 2)]
    mk = lambda: [torch.randn(s).to(dtype) for s in shapes]  # noqa: E731
    theta, delta, grad, mu, nu = mk(), mk(), mk(), mk(), [torch.rand(s).to(dtype) for s in shapes]
    m = torch.rand(len(shapes))
    copies = [[t.clone() for t in ts] for ts in (theta, delta, grad, mu, nu)]
    hp = dict(lr=1e-2, eps=1e-8, weight_decay=0.05)
    fg.ops.user_adamw_(theta, delta, grad, mu, nu, m, 3, betas=(0.9, 0.999), **hp)
    reference_user_adamw_(*copies, m, 3, beta1=0.9, beta2=0.999, **hp)
    tol = KERNEL[torch.float32].kwargs() if dtype == torch.float32 else dict(rtol=0, atol=0)  # low precision: bit-exact
    for a, b in zip(theta + delta + mu + nu, copies[0] + copies[1] + copies[3] + copies[4], strict=True):
        torch.testing.assert_close(a, b, **tol)


# --- save / resume ----------------------------------------------------------------------------
@pytest.mark.parametrize("user_optimizer", ["sgd", "adamw"])
def test_save_and_resume_continue_identically(tmp_path, user_optimizer):
    data = batches(12)
    learner, model = make(user_interval=3, user_optimizer=user_optimizer, budget_by="params")
    for b in data[:7]:
        learner.step(b)
    path = tmp_path / "learner.safetensors"
    learner.save(str(path))
    for b in data[7:]:
        learner.step(b)

    other = mlp(seed=11)  # different weights: all state must come from the file
    resumed = fg.MaskLearner.load(str(path), other, loss_fn, backend="torch")
    assert resumed.step_count == 7 and resumed.hparams() == learner.hparams()
    for b in data[7:]:
        resumed.step(b)
    assert torch.equal(resumed.logits, learner.logits)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)
    for d, e in zip(learner._delta + learner._exp_avg, resumed._delta + resumed._exp_avg, strict=True):
        assert torch.equal(d, e)
    assert [h["kind"] for h in resumed.history] == [h["kind"] for h in learner.history[7:]]


def test_load_rejects_another_model_and_other_files(tmp_path):
    learner, _ = make()
    path = tmp_path / "s.safetensors"
    learner.save(str(path))
    wrong = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    with pytest.raises(ValueError, match="different model"):
        fg.MaskLearner.load(str(path), wrong, loss_fn)
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a freezeguard learner state"):
        fg.MaskLearner.load(str(tmp_path / "other.safetensors"), mlp(), loss_fn)
    with pytest.raises(FileNotFoundError):
        fg.MaskLearner.load(str(tmp_path / "missing.safetensors"), mlp(), loss_fn)


# --- fit --------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:MaskLearner. after")  # the unmoved-mask warning has its own test
def test_fit_cycles_a_list_and_reports(capsys):
    learner, _ = make(user_interval=2)
    seen = []
    logs = learner.fit(batches(3), steps=7, progress=True, callback=seen.append)
    assert len(logs) == 7 and seen == logs and learner.step_count == 7
    assert "learning mask" in capsys.readouterr().err  # the tqdm bar
    with pytest.raises(ValueError, match="ran out after 2 of 5"):
        learner.fit(iter(batches(2)), steps=5, progress=False)
    with pytest.raises(ValueError, match="empty"):
        learner.fit([], steps=1, progress=False)


# --- is the data moving the mask? --------------------------------------------------------------
def test_a_budget_that_drowns_the_data_is_reported():
    # The authors' c_sparsity on a small model: the first releaser step saturates every logit
    # in its initial order, so the "learned" mask is the random initial ranking. Say so.
    learner, _ = make(user_interval=2, freeze_ratio=0.5, c_sparsity=5e3)  # the authors' c; mask_lr 10
    initial = learner.hard_mask().frozen_names
    with pytest.warns(UserWarning, match=r"still exactly the one of the initial logits \(uniform\)"):
        logs = learner.fit(batches(3), steps=6, progress=False)
    assert [e["mask_moved"] for e in logs] == [0] * 6
    assert logs[0]["kind"] == "releaser" and logs[0]["data_to_budget"] < 1e-2  # later ones: both steps ~0
    assert all(e["data_to_budget"] is None for e in logs if e["kind"] == "user")
    assert learner.hard_mask().frozen_names == initial


def test_a_data_driven_mask_moves_and_does_not_warn(recwarn):
    learner, _ = make(user_interval=2, freeze_ratio=0.5, c_sparsity=1e-3, mask_lr=1e4)
    initial = set(learner.hard_mask().frozen_names)
    logs = learner.fit(batches(3), steps=6, progress=False)
    moved = logs[-1]["mask_moved"]
    assert moved > 0
    assert moved == len(set(learner.hard_mask().frozen_names) ^ initial)  # the log counts what hard_mask gives
    assert logs[0]["data_to_budget"] > 1
    assert not [w for w in recwarn if "initial logits" in str(w.message)]


# --- empty groups and unused tensors ----------------------------------------------------------
def test_releaser_batch_without_innocent_samples_only_hurts_the_target():
    data = batches(1, targets=[True] * 6)
    learner, model = make()
    x0, delta = learner.logits.clone(), [d.clone() for d in learner._delta]
    # Expected: the innocent term drops out, L = -mean(target) / 2 (as in the reference).
    model.zero_grad()
    (-loss_fn(model, data[0]).mean() / 2).backward()
    s = torch.stack([(d * p.grad).sum() for d, p in zip(delta, model.parameters(), strict=True)])
    model.zero_grad()
    expected = updated_logits(x0, s, weights=budget_weights([p.numel() for p in model.parameters()], "tensors"),
                              ratio=learner.freeze_ratio, temperature=learner.temperature,
                              c_sparsity=learner.c_sparsity, mask_lr=learner.mask_lr)
    entry = learner.step(data[0])
    assert entry["innocent_loss"] is None and entry["n_innocent"] == 0 and entry["n_target"] == 6
    assert entry["loss"] == pytest.approx(-entry["target_loss"] / 2, rel=1e-6)
    torch.testing.assert_close(learner.logits, expected)


def test_tensors_without_gradient_are_left_alone():
    class WithSpare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.spare = torch.nn.Parameter(torch.ones(3))  # never used in forward

        def forward(self, x):
            return self.net(x)

    model = WithSpare()
    pre, ft = states(model)
    learner = fg.MaskLearner(model, pre, ft, loss_fn, user_interval=2, user_lr=1e-2, backend="torch")
    i = learner.names.index("spare")
    x_before, spare_before = learner.logits[i].item(), model.spare.detach().clone()
    for b in batches(4):
        learner.step(b)
    # Only the budget moves its logit; the user never moves it (no gradient).
    m = torch.sigmoid(learner.logits / learner.temperature)
    assert learner.logits[i].item() != x_before
    expected = ft["spare"] + m[i] * (pre["spare"] - ft["spare"])
    torch.testing.assert_close(model.spare.detach(), expected)
    assert not torch.equal(model.spare.detach(), spare_before)


# --- errors -----------------------------------------------------------------------------------
def test_mismatched_states_are_named():
    model = mlp()
    pre, ft = states(model)
    bad = dict(ft)
    bad.pop("2.bias")
    with pytest.raises(ValueError, match=r"finetuned state does not match the model \(missing: 2.bias"):
        fg.MaskLearner(model, pre, bad, loss_fn)
    bad = dict(pre, **{"0.weight": torch.zeros(3, 6)})
    with pytest.raises(ValueError, match=r"pretrained state .*shapes differ \(model -> state\): 0.weight \(\d+, \d+\) -> \(3, 6\)"):
        fg.MaskLearner(model, bad, ft, loss_fn)
    with pytest.raises(ValueError, match="not parameters of the model: extra"):
        fg.MaskLearner(model, dict(pre, extra=torch.zeros(1)), ft, loss_fn)


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match="freeze_ratio must be in"):
        make(freeze_ratio=ratio)


@pytest.mark.parametrize("kw, match", [({"budget_by": "layers"}, "budget_by"),
                                       ({"user_optimizer": "lion"}, "user_optimizer"),
                                       ({"user_interval": 0}, "user_interval"), ({"temperature": 0.0}, "temperature")])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_batch_without_is_target():
    learner, _ = make()
    b = batches(1)[0]
    b.pop("is_target")
    with pytest.raises(KeyError, match="is_target"):
        learner.step(b)
    with pytest.raises(TypeError, match="bool"):
        learner.step(dict(batches(1)[0], is_target=torch.tensor([0.5] * 8)))


def test_loss_fn_must_return_per_sample_losses():
    learner, _ = make()
    learner.loss_fn = lambda m, b: loss_fn(m, b).mean()
    with pytest.raises(ValueError, match="per-sample losses"):
        learner.step(batches(1)[0])


def test_nan_loss_stops_naming_the_step():
    learner, model = make(user_interval=2)
    data = batches(3)
    learner.step(data[0])
    data[1]["x"][0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="step 1: non-finite loss"):
        learner.step(data[1])
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))  # nothing was updated


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kind_step", [0, 1])
def test_nan_gradient_stops_naming_the_step_and_tensor(kind_step, bad):
    learner, model = make(user_interval=2)
    data = batches(2)
    if kind_step == 1:
        learner.step(data[0])

    def poison(g):  # one bad element among finite ones
        g = g.clone()
        g.view(-1)[0] = bad
        return g

    hook = model[2].bias.register_hook(poison)
    with pytest.raises(FloatingPointError, match=rf"step {kind_step}: non-finite gradient .* in 2.bias"):
        learner.step(data[kind_step])
    hook.remove()


# --- low precision ----------------------------------------------------------------------------
@pytest.mark.parametrize("user_optimizer", ["sgd", "adamw"])
def test_bf16_model_learns_with_fp32_logits(user_optimizer):
    model = mlp().to(torch.bfloat16)
    pre, ft = states(model)
    learner = fg.MaskLearner(model, pre, ft, lambda m, b: loss_fn(m, {**b, "x": b["x"].bfloat16()}).float(),
                             user_interval=2, user_lr=1e-2, user_optimizer=user_optimizer, backend="torch")
    assert learner.logits.dtype == torch.float32 and all(d.dtype == torch.bfloat16 for d in learner._delta)
    start = [p.detach().clone() for p in model.parameters()]
    for b in batches(4):
        entry = learner.step(b)
        assert math.isfinite(entry["loss"])
    assert any(not torch.equal(a, p) for a, p in zip(start, model.parameters(), strict=True))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
