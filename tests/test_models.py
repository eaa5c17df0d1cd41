"""The model table (README "Models"): one row per diffusers denoiser family, each row tested here.

Full size: names and shapes from the meta device (nothing allocated), tensor and parameter counts
asserted exactly and against the size the publisher states. Tiny configs of the same classes:
masks (random / names / scores, save + load with fingerprint), ``fg.guard`` and ``fg.wrap`` steps
with the family's per-sample loss, ``fg.verify`` (passes after a guarded fine-tune, catches an
unguarded one) and a MaskLearner releaser + user step.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import freezeguard as fg  # noqa: E402
from freezeguard.integrations.diffusers.loss import make_loss_fn, objective_of  # noqa: E402
from freezeguard.integrations.diffusers.models import FAMILIES, family_of, get_family, layout  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = sorted(FAMILIES)


def test_the_table_has_the_five_families():
    assert NAMES == ["flux", "sd15", "sd21", "sd3", "sdxl"]
    assert {f.objective for f in FAMILIES.values()} == {"epsilon", "v_prediction", "flow_matching"}


@pytest.mark.parametrize("name", NAMES)
def test_full_size_layout_from_the_meta_device(name, tmp_path):
    fam = get_family(name)
    model = fam.build("full", device="meta")
    params = dict(model.named_parameters())
    assert all(p.device.type == "meta" for p in params.values())  # nothing allocated
    assert len(params) == fam.tensors
    total = sum(p.numel() for p in params.values())
    assert total == fam.parameters
    stated, source = fam.published
    assert abs(total - stated) / stated < 0.05, f"{total:,} is not the {stated:.3g} that {source} states"
    assert type(model).__name__ == fam.class_name
    assert family_of(model, fam.objective) is fam
    # a mask of the full-size model is made, saved and checked without any weight in memory
    mask = fg.FreezeMask.random(model, ratio=0.3, by="params", seed=0)
    assert abs(mask.ratio("params") - 0.3) < 0.02
    path = tmp_path / f"{name}.safetensors"
    mask.save(path, model=model)
    assert fg.FreezeMask.load(path, model=model) == mask
    assert layout(name) == {n: tuple(p.shape) for n, p in params.items()}


def test_full_size_figures_of_the_meta_layouts():
    """The exact figures of the README table (a regression guard on diffusers' classes too)."""
    got = {n: (len(layout(n)), sum(int(torch.Size(s).numel()) for s in layout(n).values())) for n in NAMES}
    assert got == {"sd15": (686, 859_520_964), "sd21": (686, 865_910_724), "sdxl": (1680, 2_567_463_684),
                   "sd3": (682, 2_028_328_000), "flux": (1160, 11_901_408_320)}
    # SD-1.5 is diffusers' default UNet2DConditionModel except for cross_attention_dim (1280 -> 768)
    assert get_family("sd15").full_config == {"sample_size": 64, "cross_attention_dim": 768}


def _batch(fam, model, bsz=4, seed=0, latent=8):
    gen = torch.Generator().manual_seed(seed)
    cond = fam.conditioning(model, bsz, generator=gen)
    latents = torch.randn(bsz, fam.latent_channels(model), latent, latent, generator=gen)
    return {"latents": latents, **cond, "is_target": torch.tensor([True, False] * (bsz // 2))}


def _fixed(batch, seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    return dict(batch, generator=gen)


@pytest.mark.parametrize("name", NAMES)
def test_tiny_guard_wrap_verify(name, tmp_path):
    fam = get_family(name)
    model = fam.build("tiny", seed=0)
    loss_fn = make_loss_fn(fam.scheduler())
    assert objective_of(fam.scheduler()) == fam.objective
    released = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]

    mask = fg.FreezeMask.random(model, ratio=0.4, by="tensors", seed=1)
    path = tmp_path / "mask.safetensors"
    mask.save(path, model=model)
    mask = fg.FreezeMask.load(path, model=model)
    assert fg.FreezeMask.from_names(model, mask.frozen_names) == mask
    scores = {n: float(i) for i, n in enumerate(names)}
    top = fg.FreezeMask.from_scores(model, scores, ratio=0.25)
    assert set(top.frozen_names) == set(names[len(names) - round(0.25 * len(names)):])

    opt = fg.guard(model, mask, lr=1e-2)
    batch = _batch(fam, model)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        losses = loss_fn(model, _fixed(batch, step))
        assert losses.shape == (4,) and bool(torch.isfinite(losses).all())
        losses.mean().backward()
        opt.step()
    state = model.state_dict()
    frozen = set(mask.frozen_names)
    assert all(torch.equal(state[n], released[n]) for n in frozen)
    moved = [n for n in names if n not in frozen and not torch.equal(state[n], released[n])]
    assert len(moved) > 0.5 * (len(names) - len(frozen))
    params = dict(model.named_parameters())
    assert {id(p) for p in opt.state} <= {id(params[n]) for n in names if n not in frozen}
    assert fg.verify(released, model, mask).ok

    # an unguarded fine-tune of the same model is caught
    rogue = fam.build("tiny", seed=0)
    rogue.load_state_dict(state)
    plain = torch.optim.SGD(rogue.parameters(), lr=1e-2)
    loss_fn(rogue, _fixed(batch, 9)).mean().backward()
    plain.step()
    report = fg.verify(released, rogue, mask)
    assert not report.ok and len(report.violations) > 0

    # fg.wrap around a plain torch optimizer holds the mask even with requires_grad switched back on
    model.requires_grad_(True)
    wrapped = fg.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), mask, model)
    loss_fn(model, _fixed(batch, 5)).mean().backward()
    wrapped.step()
    assert fg.verify(released, model, mask).ok


@pytest.mark.parametrize("name", NAMES)
def test_tiny_mask_learner_step(name):
    fam = get_family(name)
    model = fam.build("tiny", seed=0)
    pre = {k: v.detach().clone() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    ft = {k: v + 1e-2 * torch.randn(v.shape, generator=gen) for k, v in pre.items()}
    learner = fg.MaskLearner(model, pre, ft, make_loss_fn(fam.scheduler()), freeze_ratio=0.3,
                             c_sparsity=50.0, mask_lr=1e3, user_interval=2, seed=0)
    batch = _batch(fam, model)
    kinds = [learner.step(_fixed(batch, i))["kind"] for i in range(2)]
    assert sorted(kinds) == ["releaser", "user"]
    soft = learner.soft_mask()
    assert set(soft) == set(pre) and all(0.0 <= v <= 1.0 for v in soft.values())
    hard = learner.hard_mask()
    assert len(hard.frozen_names) == round(0.3 * len(pre))
    hard.check_model(model)


# -- per-sample losses against a direct computation -----------------------------------------------
class _Recorder(torch.nn.Module):
    """A stand-in denoiser called as a UNet: prediction w * x_t; remembers what it was given."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x, t, encoder_hidden_states=None, return_dict=False):
        self.seen = (x.detach().clone(), torch.as_tensor(t).detach().clone())
        return (self.w * x,)


@pytest.mark.parametrize("objective", ["epsilon", "v_prediction", "flow_matching"])
def test_objectives_match_direct_computation(objective):
    fam = {"epsilon": get_family("sd15"), "v_prediction": get_family("sd21"),
           "flow_matching": get_family("sd3")}[objective]
    sched = fam.scheduler()
    assert objective_of(sched) == objective
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, 6, generator=gen)
    n = torch.randn(3, 4, 6, 6, generator=gen)
    model = _Recorder()
    if objective == "flow_matching":
        s = torch.tensor([0.05, 0.5, 0.97])
        got = make_loss_fn(sched)(model, {"latents": x, "noise": n, "sigmas": s})
        sv = s.view(-1, 1, 1, 1)
        x_t, target, t = (1 - sv) * x + sv * n, n - x, s * 1000
    else:
        t = torch.tensor([3, 400, 999])
        got = make_loss_fn(sched)(model, {"latents": x, "noise": n, "timesteps": t})
        a = sched.alphas_cumprod[t].double().view(-1, 1, 1, 1)
        x_t = (a.sqrt() * x + (1 - a).sqrt() * n).float()
        target = n if objective == "epsilon" else (a.sqrt() * n - (1 - a).sqrt() * x).float()
    torch.testing.assert_close(model.seen[0], x_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.seen[1].float(), t.float())
    want = ((0.7 * x_t - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


def test_flow_matching_draws_the_schedulers_sigmas():
    sched = get_family("flux").scheduler()
    model = _Recorder()
    x = torch.zeros(64, 1, 2, 2)
    n = torch.ones(64, 1, 2, 2)
    make_loss_fn(sched)(model, {"latents": x, "noise": n, "generator": torch.Generator().manual_seed(0)})
    s = model.seen[0][:, 0, 0, 0]  # x_t = (1 - s) * 0 + s * 1
    assert bool((s > 0).all() and (s <= 1).all()) and s.std() > 0.1
    assert all(bool(torch.isclose(sched.sigmas, v, atol=1e-6).any()) for v in s)
    torch.testing.assert_close(model.seen[1], s * 1000)


def _direct_prediction(name, model, x_t, t, cond):
    """Each family's forward written out as the diffusers pipelines call it."""
    if name == "sdxl":
        h, w = x_t.shape[-2:]
        time_ids = torch.tensor([[8 * h, 8 * w, 0, 0, 8 * h, 8 * w]] * x_t.shape[0], dtype=torch.float32)
        return model(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"],
                     added_cond_kwargs={"text_embeds": cond["pooled_projections"], "time_ids": time_ids}).sample
    if name == "sd3":
        return model(hidden_states=x_t, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                     pooled_projections=cond["pooled_projections"]).sample
    return model(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl", "sd3"])
def test_family_losses_match_direct_computation(name):
    fam = get_family(name)
    model = fam.build("tiny", seed=0)
    sched = fam.scheduler()
    batch = _batch(fam, model, bsz=2)
    n = torch.randn_like(batch["latents"])
    x = batch["latents"]
    with torch.no_grad():
        if fam.objective == "flow_matching":
            s = torch.tensor([0.3, 0.8])
            got = make_loss_fn(sched)(model, dict(batch, noise=n, sigmas=s))
            sv = s.view(-1, 1, 1, 1)
            pred = _direct_prediction(name, model, (1 - sv) * x + sv * n, s * 1000, batch)
            target = n - x
        else:
            t = torch.tensor([10, 700])
            got = make_loss_fn(sched)(model, dict(batch, noise=n, timesteps=t))
            pred = _direct_prediction(name, model, sched.add_noise(x, n, t), t, batch)
            target = n if fam.objective == "epsilon" else sched.get_velocity(x, n, t)
    torch.testing.assert_close(got, ((pred - target) ** 2).mean(dim=(1, 2, 3)))


def test_flux_loss_matches_the_pipelines_packing():
    from diffusers import FluxPipeline

    fam = get_family("flux")
    model = fam.build("tiny", seed=0)
    batch = _batch(fam, model, bsz=2)
    x = batch["latents"]
    n = torch.randn_like(x)
    s = torch.tensor([0.25, 0.9])
    b, c, h, w = x.shape
    with torch.no_grad():
        got = make_loss_fn(fam.scheduler())(model, dict(batch, noise=n, sigmas=s, guidance=4.0))
        sv = s.view(-1, 1, 1, 1)
        packed = FluxPipeline._pack_latents((1 - sv) * x + sv * n, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        txt_ids = torch.zeros(batch["encoder_hidden_states"].shape[1], 3)
        pred = model(hidden_states=packed, timestep=s, guidance=torch.full((b,), 4.0),
                     pooled_projections=batch["pooled_projections"],
                     encoder_hidden_states=batch["encoder_hidden_states"], txt_ids=txt_ids, img_ids=img_ids).sample
        target = FluxPipeline._pack_latents(n - x, b, c, h, w)
    torch.testing.assert_close(got, ((pred - target) ** 2).mean(dim=(1, 2)))
    # the guidance value reaches the model
    with torch.no_grad():
        other = make_loss_fn(fam.scheduler())(model, dict(batch, noise=n, sigmas=s, guidance=1.0))
    assert not torch.allclose(got, other)


def test_missing_conditioning_is_a_clear_error():
    for name in ("sdxl", "sd3", "flux"):
        fam = get_family(name)
        model = fam.build("tiny")
        batch = _batch(fam, model, bsz=2)
        del batch["pooled_projections"]
        with pytest.raises(KeyError, match="pooled_projections"):
            make_loss_fn(fam.scheduler())(model, batch)
    with pytest.raises(ValueError, match="unknown model family"):
        get_family("sd4")


def test_readme_model_table_matches_the_registry():
    """The README's model table says what the registry (and the meta-device builds above) say."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("`") and cells[0].split("`")[1] in FAMILIES:
            rows[cells[0].split("`")[1]] = cells
    assert sorted(rows) == NAMES
    objective = {"epsilon": "epsilon", "v_prediction": "v-prediction", "flow_matching": "flow matching"}
    for name, cells in rows.items():
        fam = get_family(name)
        assert cells[1].startswith(f"`{fam.class_name}`")
        assert int(cells[2].replace(",", "")) == fam.tensors
        assert int(cells[3].replace(",", "")) == fam.parameters
        assert cells[5] == objective[fam.objective]
