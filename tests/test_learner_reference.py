"""The fused MaskLearner against the authors' loop written out literally.

``literal_mask_learning`` follows pittisl/FreezeAsGuard ``src/mask_learner.py`` statement by
statement (a difference model, the schedule, means that divide by count + 1e-5); its per-tensor
updates are ``support.authors_loop``, the project's one copy of the authors' loop. The fused learner must end with the same logits, live weights
and Delta after a run mixing releaser and user steps, on every backend that can run here.
"""
from __future__ import annotations

import pytest
import torch
from support import authors_loop

import freezeguard as fg
from freezeguard.apps.learn.logits import budget_weights, soft_mask, updated_logits
from freezeguard.backends import get_backend, status

AUTHORS_HP = dict(T=0.2, freeze_ratio=0.2, c_sparsity=5e3, mask_lr=10.0, user_lr=1e-5)  # their scripts' defaults


def test_literal_loop_matches_fused_update():
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (5,), (2, 2, 2), (1,)]
    theta = [torch.randn(s, generator=gen) for s in shapes]
    delta = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    x = torch.rand(len(shapes), generator=gen)
    th_f, de_f = [t.clone() for t in theta], [d.clone() for d in delta]
    s = fg.ops.segment_dot(de_f, grads)
    new = updated_logits(x, s, weights=budget_weights([t.numel() for t in theta], "tensors"), ratio=AUTHORS_HP["freeze_ratio"],
                         temperature=AUTHORS_HP["T"], c_sparsity=AUTHORS_HP["c_sparsity"], mask_lr=AUTHORS_HP["mask_lr"])
    fg.ops.mask_shift_(th_f, de_f, soft_mask(new, AUTHORS_HP["T"]) - soft_mask(x, AUTHORS_HP["T"]))
    fg.ops.user_update_(th_f, de_f, grads, soft_mask(new, AUTHORS_HP["T"]), AUTHORS_HP["user_lr"] * 1e4)
    xl = x.clone().requires_grad_(True)
    authors_loop.releaser_update(theta, delta, xl, grads=grads, **{k: AUTHORS_HP[k] for k in ("T", "freeze_ratio", "c_sparsity", "mask_lr")})
    authors_loop.user_update(theta, delta, xl, grads=grads, T=AUTHORS_HP["T"], user_lr=AUTHORS_HP["user_lr"] * 1e4)
    torch.testing.assert_close(xl.detach(), new)
    for a, b in zip(theta + delta, th_f + de_f, strict=True):
        torch.testing.assert_close(a, b)


diffusers = pytest.importorskip("diffusers")

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
                 norm_num_groups=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**TINY_UNET)


def per_sample_loss(model, batch):
    """Deterministic per-sample denoising MSE (noise and timesteps come with the batch)."""
    pred = model(batch["noisy"], batch["timesteps"], batch["cond"]).sample
    return ((pred.float() - batch["noise"].float()) ** 2).mean(dim=(1, 2, 3))


def make_batches(n: int, bsz: int = 4, seed: int = 1) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        out.append({"noisy": torch.randn(bsz, 4, 8, 8, generator=gen),
                    "noise": torch.randn(bsz, 4, 8, 8, generator=gen),
                    "timesteps": torch.randint(0, 1000, (bsz,), generator=gen),
                    "cond": torch.randn(bsz, 3, 8, generator=gen),
                    "is_target": torch.tensor([True, False] * (bsz // 2))})
    return out


def literal_mask_learning(unet_pre, unet_ft, x_init, batches, *, T, freeze_ratio, c_sparsity, mask_lr,
                          user_lr, user_interval):
    """The authors' releaser / user loop, as written (per tensor, .data updates)."""
    unet_diff, unet = unet_pre, unet_ft
    x_for_mask = torch.nn.Parameter(x_init.clone())
    for i, (param_diff, param_ft) in enumerate(zip(unet_diff.parameters(), unet.parameters(), strict=True)):
        param_diff.data = param_diff.data - param_ft.data
        param_ft.data = param_ft.data + param_diff.data * torch.sigmoid(x_for_mask[i] / T)
    for step, batch in enumerate(batches):
        if step % user_interval == 0:
            loss = per_sample_loss(unet, batch)
            ffi_target = batch["is_target"].float()
            ffi_innocent = 1 - batch["is_target"].float()
            target_iqa_loss = (loss * ffi_target).sum() / (ffi_target.sum() + 1e-5)
            innocent_iqa_loss = (loss * ffi_innocent).sum() / (ffi_innocent.sum() + 1e-5)
            mixed_loss = ((-target_iqa_loss + innocent_iqa_loss) / 2).mean()
            mixed_loss.backward()
            authors_loop.releaser_update(list(unet.parameters()), list(unet_diff.parameters()), x_for_mask,
                                           T=T, freeze_ratio=freeze_ratio, c_sparsity=c_sparsity, mask_lr=mask_lr)
            unet.zero_grad()
        else:
            loss = per_sample_loss(unet, batch).mean()
            loss.backward()
            authors_loop.user_update(list(unet.parameters()), list(unet_diff.parameters()), x_for_mask,
                                       T=T, user_lr=user_lr)
            unet.zero_grad()
    return x_for_mask.detach(), unet, unet_diff


def _runnable(name: str, device: torch.device) -> tuple[bool, str]:
    st = status(name)
    if not st.available:
        return False, st.reason
    return get_backend(name).supports(device)


CASES = [("cpu", b) for b in ("torch", "cpp", "triton")] + [
    pytest.param("cuda", b, marks=pytest.mark.gpu) for b in ("torch", "triton", "cuda")]


@pytest.mark.parametrize("device, backend", CASES)
def test_fused_learner_matches_the_authors_loop(device, backend, monkeypatch):
    device = torch.device(device)
    ok, why = _runnable(backend, device)
    if not ok:
        pytest.skip(f"backend {backend} cannot run on {device} here: {why}")
    if device.type == "cuda":
        # Same math on both sides; TF32 would only add noise to the comparison.
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    hp = dict(freeze_ratio=0.2, temperature=0.2, c_sparsity=5e3, mask_lr=10.0, user_lr=1e-2, user_interval=3)
    # Triton runs in its CPU interpreter: fewer steps keep the case small.
    n_steps = 4 if backend == "triton" and device.type == "cpu" else 7
    batches = [{k: v.to(device) for k, v in b.items()} for b in make_batches(n_steps)]
    pre_model = tiny_unet(0).to(device)
    ft_model = tiny_unet(0).to(device)
    with torch.no_grad():
        for p in ft_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pre_state = {k: v.clone() for k, v in pre_model.state_dict().items()}
    ft_state = {k: v.clone() for k, v in ft_model.state_dict().items()}

    model = tiny_unet(5).to(device)  # weights get overwritten by the learner
    learner = fg.MaskLearner(model, pre_state, ft_state, per_sample_loss, backend=backend, seed=3, **hp)
    x0 = learner.logits.clone()
    kinds = [learner.step(b)["kind"] for b in batches]
    assert "releaser" in kinds and "user" in kinds

    x_ref, unet_ref, diff_ref = literal_mask_learning(
        pre_model, ft_model, x0, batches, T=hp["temperature"], freeze_ratio=hp["freeze_ratio"],
        c_sparsity=hp["c_sparsity"], mask_lr=hp["mask_lr"], user_lr=hp["user_lr"],
        user_interval=hp["user_interval"])

    # The literal loop divides by (count + 1e-5); the learner by count: a 1e-5 relative gap.
    torch.testing.assert_close(learner.logits, x_ref, rtol=1e-4, atol=1e-4)
    moved = (learner.logits - x0).abs().max()
    assert moved > 0.1, "the run must move the logits for the comparison to mean anything"
    for (name, p), p_ref, d, d_ref in zip(model.named_parameters(), unet_ref.parameters(), learner._delta,
                                          diff_ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), p_ref.detach(), rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(d, d_ref.detach(), rtol=1e-4, atol=1e-6, msg=lambda m: f"{name} delta: {m}")
    # User steps changed Delta (theta_pre = theta_ft + Delta is what stays fixed).
    assert any(not torch.equal(d, (pre_state[n] - ft_state[n])) for n, d in zip(learner.names, learner._delta, strict=True))
