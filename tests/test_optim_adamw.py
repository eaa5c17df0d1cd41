"""fg.optim.AdamW against torch.optim.AdamW: a masked UNet fine-tune, state dicts, schedulers, hooks.

The reference is torch.optim.AdamW(foreach=False) given only the trainable tensors: a masked
optimizer must follow it on those and leave every frozen tensor bit-identical and stateless.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from support.tolerances import TRAJECTORY

import freezeguard as fg
from freezeguard.backends import status

BACKENDS = [pytest.param("torch"),
            pytest.param("cpp", marks=pytest.mark.skipif(not status("cpp").available,
                                                         reason=f"cpp backend: {status('cpp').reason}"))]
# fp32 after 50 steps: the backends compute in fp32 like torch, in a slightly different order.
TOL = TRAJECTORY.kwargs()  # tests/support/tolerances.py


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, cross_attention_dim=8, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2)


def unet_loss(unet: torch.nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    cond = torch.randn(2, 3, 8, generator=gen)
    t = torch.randint(0, 1000, (2,), generator=gen)
    device = next(unet.parameters()).device
    x, noise, cond, t = (v.to(device) for v in (x, noise, cond, t))
    return torch.nn.functional.mse_loss(unet(x + noise, t, cond).sample, noise)


def roundtrip(state_dict: dict) -> dict:
    """Through a file, as a checkpoint would go; weights_only proves it holds plain data."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_unet_matches_torch_adamw(backend):
    check_masked_unet_against_torch(backend, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_masked_unet_matches_torch_adamw_on_cuda(backend):
    if backend != "auto" and not status(backend).available:
        pytest.skip(f"{backend} backend: {status(backend).reason}")
    check_masked_unet_against_torch(backend, torch.device("cuda"))


def check_masked_unet_against_torch(backend: str, device: torch.device) -> None:
    """50 masked steps of a tiny UNet: trainable tensors follow torch.optim.AdamW, frozen ones never move."""
    ours_model = tiny_unet().to(device)
    ref_model = copy.deepcopy(ours_model)
    initial = {n: p.detach().clone() for n, p in ours_model.named_parameters()}
    mask = fg.FreezeMask.random(ours_model, ratio=0.3, seed=0)
    assert 0 < len(mask.frozen_names) < len(initial)
    kw = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-2)
    opt = fg.optim.AdamW(ours_model.named_parameters(), mask=mask, backend=backend, **kw)
    ref = torch.optim.AdamW([p for n, p in ref_model.named_parameters() if not mask.is_frozen(n)],
                            foreach=False, **kw)
    ref_params = dict(ref_model.named_parameters())
    for step in range(50):
        if step == 25:  # checkpoint and resume in a new optimizer, mid-run
            saved = roundtrip(opt.state_dict())
            opt = fg.optim.AdamW(ours_model.named_parameters(), mask=mask, backend=backend, **kw)
            opt.load_state_dict(saved)
        # frozen tensors get gradients too, and zero_grad keeps them allocated: neither may matter
        opt.zero_grad(set_to_none=False)
        unet_loss(ours_model, step).backward()
        # Both optimizers get the same gradients: the bias of a conv feeding a GroupNorm has a
        # gradient at rounding-noise level that Adam turns into full-size steps, so separate
        # forward passes would diverge for reasons that have nothing to do with the optimizer.
        for name, p in ours_model.named_parameters():
            if not mask.is_frozen(name):
                ref_params[name].grad = p.grad.clone()
        opt.step()
        ref.step()

    for name, p in ours_model.named_parameters():
        if mask.is_frozen(name):
            assert torch.equal(p, initial[name]), name
            assert p.grad is not None and p.grad.abs().sum() > 0  # it had a gradient all along
            assert len(opt.state[p]) == 0, name
        else:
            torch.testing.assert_close(p, ref_params[name], **TOL, msg=name)
            st, rst = opt.state[p], ref.state[ref_params[name]]
            assert sorted(st) == ["exp_avg", "exp_avg_sq", "step"]
            # step stays a float32 CPU scalar on every device, as torch keeps it (not fused/capturable)
            assert st["step"].dtype == torch.float32 and st["step"].device.type == "cpu" and st["step"].dim() == 0
            assert float(st["step"]) == float(rst["step"]) == 50.0
            torch.testing.assert_close(st["exp_avg"], rst["exp_avg"], **TOL)
            torch.testing.assert_close(st["exp_avg_sq"], rst["exp_avg_sq"], rtol=1e-4, atol=1e-9)
            assert not torch.equal(p, initial[name]), name


def small_model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)


def fake_grads(model: torch.nn.Module, step: int, skip=()) -> None:
    """Deterministic gradients, the same for two models with the same parameter names."""
    gen = torch.Generator().manual_seed(1000 + step)
    for name, p in model.named_parameters():
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        p.grad = None if name in skip else g


def test_state_dict_interchangeable_with_torch():
    mask_model = small_model()
    mask = fg.FreezeMask.from_names(mask_model, ["0.bias", "2.weight"])
    frozen = set(mask.frozen_names)
    kw = dict(lr=1e-2, weight_decay=0.1)

    # ours -> torch: continue identically on the trainable tensors
    a, b = small_model(), small_model()
    ours = fg.optim.AdamW(a.named_parameters(), mask=mask, backend="torch", **kw)
    for s in range(3):
        fake_grads(a, s)
        ours.step()
    b.load_state_dict(a.state_dict())
    theirs = torch.optim.AdamW(b.named_parameters(), foreach=False, **kw)
    theirs.load_state_dict(roundtrip(ours.state_dict()))
    for s in range(3, 6):
        fake_grads(a, s)
        fake_grads(b, s, skip=frozen)  # torch skips tensors without a grad
        ours.step()
        theirs.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)

    # torch -> ours, including state torch kept for tensors the mask freezes (it is dropped)
    c, d = small_model(), small_model()
    theirs = torch.optim.AdamW(c.named_parameters(), foreach=False, **kw)
    for s in range(3):
        fake_grads(c, s)
        theirs.step()
    d.load_state_dict(c.state_dict())
    ours = fg.optim.AdamW(d.named_parameters(), mask=mask, backend="torch", **kw)
    ours.load_state_dict(roundtrip(theirs.state_dict()))
    params = dict(d.named_parameters())
    assert all(len(ours.state.get(params[n], {})) == 0 for n in frozen)
    frozen_before = {n: params[n].detach().clone() for n in frozen}
    for s in range(3, 6):
        fake_grads(c, s, skip=frozen)
        fake_grads(d, s)
        ours.step()
        theirs.step()
    for (n, p), q in zip(d.named_parameters(), c.parameters(), strict=True):
        if n in frozen:
            assert torch.equal(p, frozen_before[n])
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
            assert float(ours.state[p]["step"]) == 6.0


def test_state_dict_is_plain_data_and_keeps_names():
    model = small_model()
    opt = fg.optim.AdamW(model.named_parameters(), lr=1e-2)
    fake_grads(model, 0)
    opt.step()
    sd = roundtrip(opt.state_dict())  # raises if anything but tensors / plain values is inside
    assert sd["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    torch_keys = set(torch.optim.AdamW(small_model().parameters()).state_dict()["param_groups"][0])
    assert set(sd["param_groups"][0]) - {"param_names"} == torch_keys


@pytest.mark.parametrize("make", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy_continue_identically(make):
    model = small_model()
    mask = fg.FreezeMask.from_names(model, ["0.weight"])
    opt = fg.optim.AdamW(model.named_parameters(), lr=1e-2, mask=mask, backend="torch")
    fake_grads(model, 0)
    opt.step()
    clone = pickle.loads(pickle.dumps(opt)) if make == "pickle" else copy.deepcopy(opt)
    assert clone.mask == mask and clone.backend == "torch"
    clone_params = [p for g in clone.param_groups for p in g["params"]]
    for ps, o in ((list(model.parameters()), opt), (clone_params, clone)):
        gen = torch.Generator().manual_seed(7)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        o.step()
    for p, q in zip(model.parameters(), clone_params, strict=True):
        assert torch.equal(p, q)
    assert len(clone.state[clone_params[0]]) == 0


def _lr_run(make_opt, make_sched, steps=8):
    model = small_model()
    opt = make_opt(model)
    sched = make_sched(opt)
    lrs = []
    for s in range(steps):
        fake_grads(model, s)
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("which", ["torch_lambda", "torch_onecycle", "diffusers_cosine"])
def test_lr_schedulers_drive_it_like_torch_adamw(which):
    def make_sched(opt):
        if which == "torch_lambda":
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
        if which == "torch_onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
        from diffusers.optimization import get_scheduler

        return get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=8)

    lrs, params = _lr_run(lambda m: fg.optim.AdamW(m.named_parameters(), lr=1e-2, backend="torch"), make_sched)
    ref_lrs, ref_params = _lr_run(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False), make_sched)
    assert lrs == ref_lrs and len(set(lrs)) > 1
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_closure_hooks_and_zero_grad():
    model = small_model()
    opt = fg.optim.AdamW(model.named_parameters(), lr=1e-2)
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    h2 = opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    x = torch.randn(4, 6)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    h1.remove()
    h2.remove()
    opt.step(closure)
    assert calls == ["pre", "post"]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_add_param_group_later():
    model = small_model()
    (n0, w0), (n1, b0), *rest = model.named_parameters()
    mask = fg.FreezeMask.from_names(model, ["2.bias"])
    # the mask names "2.bias", so it must be among the params from the start
    opt = fg.optim.AdamW([(n0, w0), (n1, b0), rest[1]], lr=1e-2, mask=mask)
    opt.add_param_group({"params": [rest[0]], "lr": 0.1, "weight_decay": 0.0})
    assert opt.param_groups[1]["param_names"] == ["2.weight"] and opt.param_groups[1]["lr"] == 0.1
    frozen_before = rest[1][1].detach().clone()
    w2_before = rest[0][1].detach().clone()
    fake_grads(model, 0)
    opt.step()
    assert torch.equal(rest[1][1], frozen_before)
    assert not torch.equal(rest[0][1], w2_before)
    with pytest.raises(ValueError, match="need names"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    assert len(opt.param_groups) == 2


@pytest.mark.skipif(not status("triton").available or not fg.backends.get_backend("triton").supports(
    torch.device("cpu"))[0], reason="triton cannot run on CPU tensors here (needs TRITON_INTERPRET=1)")
def test_triton_backend_on_cpu_matches_torch_adamw():
    # the Triton interpreter is slow: a small model and a few steps cover the optimizer's use of it
    a, b = small_model(), small_model()
    mask = fg.FreezeMask.from_names(a, ["0.bias"])
    ours = fg.optim.AdamW(a.named_parameters(), lr=1e-2, mask=mask, backend="triton")
    ref = torch.optim.AdamW([p for n, p in b.named_parameters() if n != "0.bias"], lr=1e-2, foreach=False)
    bias = a[0].bias.detach().clone()
    for s in range(3):
        fake_grads(a, s)
        fake_grads(b, s)
        ours.step()
        ref.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert torch.equal(a[0].bias, bias) and len(ours.state[a[0].bias]) == 0
