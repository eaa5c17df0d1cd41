"""Baselines (freezeguard.baselines): each runs, changes what it should, and rejects bad input clearly."""
from __future__ import annotations

import copy

import pytest
import torch

from freezeguard.apps.baselines import (
    add_lora,
    concept_ablation,
    finite_stream,
    imma,
    measure_cost,
    prediction_gap,
    uce_edit,
    uce_objective,
    udp,
    weight_change,
)
from freezeguard.apps.baselines._common import cross_attention_kv, snapshot
from freezeguard.integrations.diffusers import toy

TINY = toy.ToyModelConfig(block_out_channels=(8, 16), attention_head_dim=4, norm_num_groups=4)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return toy.build_model(TINY, seed=0)


@pytest.fixture(scope="module")
def loss_fn():
    return toy.make_loss_fn(TINY)


def emb(name):
    return toy.class_embedding(name)


# ------------------------------------------------------------------------------------------ UCE
def test_uce_solves_its_least_squares_objective_exactly(model):
    targets, anchor = [emb("frame")], emb("square")
    keep = [emb(c) for c in ("disc", "hbars", "checker")]
    res = uce_edit(model, targets, anchor, keep, lamb=0.5)
    assert len(res.edited) == len(cross_attention_kv(model)) == 8  # to_k and to_v of 4 blocks
    c_e, c_a, c_k = targets[0].double(), anchor.double(), torch.cat(keep).double()
    p = res.config["preserve_scale"]
    assert p == pytest.approx(max(0.1, 1 / 4))
    before, after = dict(model.named_parameters()), dict(res.model.named_parameters())
    for name in res.edited:
        w0, w = before[name].detach().double(), after[name].detach().double()
        v_star = c_a @ w0.t()
        # The closed form is the minimiser: the objective's gradient vanishes there ...
        w_req = w.clone().requires_grad_(True)
        obj = uce_objective(w_req, w0, c_e, v_star, c_k, 0.5, 1.0, p)
        (grad,) = torch.autograd.grad(obj, w_req)
        assert grad.abs().max() < 1e-4 * obj.detach().clamp_min(1.0)
        # ... and it equals an independent least-squares solve of the stacked system.
        rows = torch.cat([0.5 ** 0.5 * torch.eye(w0.shape[1], dtype=torch.float64), c_e, p ** 0.5 * c_k])
        rhs = torch.cat([0.5 ** 0.5 * w0.t(), v_star, p ** 0.5 * (c_k @ w0.t())])
        w_ls = torch.linalg.lstsq(rows, rhs).solution.t()
        torch.testing.assert_close(w, w_ls, rtol=1e-4, atol=1e-5)
        assert not torch.equal(w.float(), w0.float())


def test_uce_maps_target_onto_anchor_and_leaves_everything_else(model):
    res = uce_edit(model, [emb("frame")], emb("square"), lamb=1e-6, preserve_scale=0.0)
    for (name, layer), (_, old) in zip(cross_attention_kv(res.model), cross_attention_kv(model), strict=True):
        got = layer(emb("frame"))
        want = old(emb("square"))
        # λ -> 0, no preserve terms: W c_target = W0 c_anchor exactly (4 tokens < 32 dims)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    edited = set(res.edited)
    for (n, p), (_, q) in zip(model.named_parameters(), res.model.named_parameters(), strict=True):
        if n not in edited:
            assert torch.equal(p, q), n


def test_uce_preserve_terms_keep_preserved_concepts_closer(model):
    keep = [emb(c) for c in toy.BASE_CLASSES]
    loose = uce_edit(model, [emb("frame")], emb("square"), preserve_scale=0.0)
    tight = uce_edit(model, [emb("frame")], emb("square"), keep)
    (_, w0), (_, wl), (_, wt) = (cross_attention_kv(m)[0] for m in (model, loose.model, tight.model))
    drift = lambda w: float((w(torch.cat(keep)) - w0(torch.cat(keep))).norm().detach())  # noqa: E731
    assert drift(wt) < drift(wl)


@pytest.mark.parametrize("kwargs, err, match", [
    ({"target_conds": []}, ValueError, "empty"),
    ({"target_conds": [torch.zeros(4, 7)]}, ValueError, "dim 7"),
    ({"anchor_conds": torch.zeros(3, 32)}, ValueError, "token i"),
    ({"target_conds": "frame"}, TypeError, "tensor"),
    ({"lamb": 0.0}, ValueError, "lamb"),
    ({"technique": "tensor"}, ValueError, "technique"),
    ({"target_conds": [torch.full((4, 32), float("nan"))]}, ValueError, "non-finite"),
])
def test_uce_bad_input(model, kwargs, err, match):
    args = {"target_conds": [emb("frame")], "anchor_conds": emb("square")} | kwargs
    with pytest.raises(err, match=match):
        uce_edit(model, **args)


def test_uce_needs_cross_attention():
    with pytest.raises(ValueError, match="cross-attention"):
        uce_edit(torch.nn.Linear(32, 4), [emb("frame")], emb("square"))
    with pytest.raises(TypeError, match="nn.Module"):
        uce_edit("unet", [emb("frame")], emb("square"))


# ------------------------------------------------------------------------------ Concept Ablation
def test_ablation_moves_target_prediction_toward_anchor(model):
    sched = toy.build_scheduler(TINY)
    held = toy.make_batch(["square"], 16, seed=99)["pixel_values"]
    gap = lambda m: prediction_gap(m, sched, emb("frame"), emb("square"), held, seed=3)  # noqa: E731
    res = concept_ablation(model, sched, emb("frame"), emb("square"), toy.batches(("square",), 8, seed=1),
                           steps=15, reference_lr=1e-3)
    assert gap(res.model) < 0.5 * gap(model)
    assert res.config["lr"] == pytest.approx(1.6e-3)
    # only the cross-attention K/V trained, and the input model is untouched
    trained = set(res.trained)
    assert trained == {f"{n}.weight" for n, _ in cross_attention_kv(model)}
    for (n, p), (_, q) in zip(model.named_parameters(), res.model.named_parameters(), strict=True):
        assert torch.equal(p, q) == (n not in trained), n
    assert all(p.requires_grad for p in res.model.parameters())


def test_ablation_noise_based_and_prior_preservation_run(model, loss_fn):
    sched = toy.build_scheduler(TINY)
    res = concept_ablation(model, sched, emb("frame"), emb("square"), toy.batches(("square",), 4, seed=1),
                           steps=2, reference_lr=1e-3, loss_type="noise", loss_fn=loss_fn, prior_weight=1.0,
                           params="full")
    assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    assert len(res.trained) == len(list(model.parameters()))


@pytest.mark.parametrize("kwargs, err, match", [
    ({"params": "everything"}, ValueError, "params"),
    ({"loss_type": "noise"}, ValueError, "loss_fn"),
    ({"steps": 0}, ValueError, "steps"),
    ({"steps": 1.5}, TypeError, "steps"),
    ({"reference_lr": -1.0}, ValueError, "reference_lr"),
    ({"anchor_cond": torch.zeros(2, 32)}, ValueError, "differ in shape"),
    ({"anchor_batches": {"pixel_values": torch.zeros(1)}}, TypeError, "iterator"),
    ({"noise_scheduler": object()}, TypeError, "scheduler"),
])
def test_ablation_bad_input(model, kwargs, err, match):
    args = dict(noise_scheduler=toy.build_scheduler(TINY), target_cond=emb("frame"), anchor_cond=emb("square"),
                anchor_batches=toy.batches(("square",), 4, seed=1), steps=1) | kwargs
    with pytest.raises(err, match=match):
        concept_ablation(model, **args)


def test_ablation_stream_that_runs_out(model):
    one = [toy.make_batch(["square"], 2, seed=0)]
    with pytest.raises(ValueError, match="ran out"):
        concept_ablation(model, toy.build_scheduler(TINY), emb("frame"), emb("square"), iter(one), steps=2)


# ------------------------------------------------------------------------------------------ IMMA
def _attacked_target_loss(start, loss_fn, steps=12, lr=3e-3):
    """The simulated attacker the test judges by: full AdamW fine-tune on the target, fixed data."""
    tuned = copy.deepcopy(start)
    opt = torch.optim.AdamW(tuned.parameters(), lr=lr)
    stream = toy.batches(toy.TARGET_CLASSES, 8, seed=5)
    gen = torch.Generator().manual_seed(6)
    for _ in range(steps):
        loss = loss_fn(tuned, dict(next(stream), generator=gen)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    held = toy.make_batch(list(toy.TARGET_CLASSES), 16, seed=77)
    held["noise"] = torch.randn(held["pixel_values"].shape, generator=torch.Generator().manual_seed(1))
    held["timesteps"] = torch.linspace(0, 999, 16).long()
    with torch.no_grad():
        return float(loss_fn(tuned.eval(), held).mean())


def test_imma_raises_the_attackers_post_adaptation_target_loss(model, loss_fn):
    stream = toy.mixed_batches(toy.TARGET_CLASSES, toy.INNOCENT_CLASSES, 8, seed=2)
    res = imma(model, loss_fn, stream, steps=20, reference_lr=3e-3, outer_lr=3e-3, adaptation="full",
               defended="all", innocent_weight=0.0)
    assert [h["phase"] for h in res.history[:4]] == ["inner", "outer", "inner", "outer"]
    assert _attacked_target_loss(res.model, loss_fn) > 1.5 * _attacked_target_loss(model, loss_fn)
    assert weight_change(snapshot(model), res.model)["tensors_changed"] == len(list(model.parameters()))


def test_imma_attention_defence_moves_only_attention_projections(model, loss_fn):
    stream = toy.mixed_batches(toy.TARGET_CLASSES, toy.INNOCENT_CLASSES, 4, seed=2)
    before = snapshot(model)
    res = imma(model, loss_fn, stream, steps=2, reference_lr=1e-3, adaptation="full")
    defended = set(res.defended)
    assert defended and all(".to_" in n for n in defended)
    for (n, p), (_, q) in zip(model.named_parameters(), res.model.named_parameters(), strict=True):
        assert torch.equal(p, q) == (n not in defended), n
    assert weight_change(before, model)["tensors_changed"] == 0   # the input model is untouched


def test_imma_lora_attacker_and_defaults(model, loss_fn):
    stream = toy.mixed_batches(toy.TARGET_CLASSES, toy.INNOCENT_CLASSES, 4, seed=2)
    res = imma(model, loss_fn, stream, steps=4, reference_lr=1e-3, reset_every=2)
    assert res.config["outer_lr"] == pytest.approx(1e-4) and res.config["adaptation"] == "lora"
    assert "innocent_loss" in res.history[1]
    # the released model carries no adapter
    assert [n for n, _ in res.model.named_parameters()] == [n for n, _ in model.named_parameters()]


def test_imma_bad_input(model, loss_fn):
    stream = toy.batches(toy.TARGET_CLASSES, 4, seed=0)
    with pytest.raises(ValueError, match="adaptation"):
        imma(model, loss_fn, stream, adaptation="dreambooth")
    with pytest.raises(TypeError, match="callable"):
        imma(model, "mse", stream)
    with pytest.raises(ValueError, match="is_target"):
        imma(model, loss_fn, iter([{"pixel_values": torch.zeros(2, 1, 16, 16)}]), steps=1)
    with pytest.raises(ValueError, match="attention"):
        imma(torch.nn.Linear(2, 2), loss_fn, stream)
    with pytest.raises(ValueError, match=r"\[B\]"):
        imma(model, lambda m, b: torch.tensor(1.0), stream, steps=1)


# ------------------------------------------------------------------------------------------- UDP
@pytest.mark.parametrize("weighting", ["eudp", "uniform"])
def test_udp_noise_respects_its_linf_bound_and_lowers_the_loss(model, loss_fn, weighting):
    data = toy.make_batch(["frame"], 8, seed=0)
    eps = 8 / 255
    res = udp(model, loss_fn, data, epsilon=eps, rounds=3, surrogate_steps=2, pgd_steps=3, batch_size=4,
              noise_scheduler=toy.build_scheduler(TINY), reference_lr=1e-3, timestep_weighting=weighting)
    delta = res.data["pixel_values"] - data["pixel_values"]
    assert delta.abs().max() <= eps + 1e-6
    assert delta.abs().max() > 0.5 * eps            # it used its budget
    assert res.data["pixel_values"].min() >= -1 and res.data["pixel_values"].max() <= 1
    assert torch.equal(res.data["encoder_hidden_states"], data["encoder_hidden_states"])
    # error-minimising: the δ-steps' loss goes down over the rounds
    assert res.history[-1]["delta_loss"] < res.history[0]["delta_loss"]


def test_udp_bad_input(model, loss_fn):
    data = toy.make_batch(["frame"], 4, seed=0)
    sched = toy.build_scheduler(TINY)
    with pytest.raises(ValueError, match="noise_scheduler"):
        udp(model, loss_fn, data)
    with pytest.raises(ValueError, match="epsilon"):
        udp(model, loss_fn, data, epsilon=-0.1, noise_scheduler=sched)
    with pytest.raises(ValueError, match="timestep_weighting"):
        udp(model, loss_fn, data, timestep_weighting="snr", noise_scheduler=sched)
    with pytest.raises(ValueError, match="float tensor"):
        udp(model, loss_fn, {"encoder_hidden_states": data["encoder_hidden_states"]}, noise_scheduler=sched)
    with pytest.raises(TypeError, match="dict"):
        udp(model, loss_fn, [data], noise_scheduler=sched)
    # a loss that does not reach the pixels (a VAE under no_grad) is named, not silently ignored
    detached = lambda m, b: loss_fn(m, dict(b, pixel_values=b["pixel_values"].detach()))  # noqa: E731
    with pytest.raises(ValueError, match="latents"):
        udp(model, detached, data, rounds=1, surrogate_steps=1, pgd_steps=1, noise_scheduler=sched)


def test_finite_stream_cycles_shuffled_epochs():
    s = finite_stream({"x": torch.arange(6), "g": None}, 3, seed=0)
    seen = [next(s)["x"] for _ in range(4)]
    assert sorted(torch.cat(seen[:2]).tolist()) == list(range(6))
    assert not torch.equal(torch.cat(seen[:2]), torch.cat(seen[2:]))


# ---------------------------------------------------------------------------------------- shared
def test_lora_starts_at_the_base_model_and_trains_only_adapters(model):
    m = copy.deepcopy(model)
    x = torch.randn(2, 1, 16, 16)
    c = emb("frame").expand(2, -1, -1)
    with torch.no_grad():
        ref = model(x, 10, encoder_hidden_states=c).sample
    from freezeguard.apps.baselines._common import attention_projection_names

    params = add_lora(m, attention_projection_names(m), rank=2)
    with torch.no_grad():
        torch.testing.assert_close(m(x, 10, encoder_hidden_states=c).sample, ref)
    assert len(params) == 2 * len(attention_projection_names(model))
    with pytest.raises(ValueError, match="rank"):
        add_lora(m, [], rank=0)


def test_weight_change_and_cost():
    m = torch.nn.Linear(3, 3)
    ref = snapshot(m)
    assert weight_change(ref, m) == {"rel_l2": 0.0, "max_abs": 0.0, "tensors_changed": 0, "params_changed_share": 0.0}
    with torch.no_grad():
        m.bias.add_(1.0)
    wc = weight_change(ref, m)
    assert wc["tensors_changed"] == 1 and wc["max_abs"] == pytest.approx(1.0) and wc["rel_l2"] > 0
    with measure_cost() as cost:
        x = torch.ones(4_000_000)
        x.add_(1)
    assert cost.seconds > 0
    assert cost.peak_bytes is None or cost.peak_bytes > 8_000_000  # 16 MB allocated
    del x


# ------------------------------------------------------------------------------------ harness / CLI
def test_contenders_face_the_same_attackers_in_one_table(model, loss_fn):
    from freezeguard.apps.baselines.harness import build_baselines, contenders, resolve_methods, toy_inputs
    from freezeguard.apps.evaluate.harness import attacker_suite, evaluate_masks
    from freezeguard.apps.evaluate.report import format_table, table_rows
    from freezeguard.apps.evaluate.toy_domains import toy_domains
    from freezeguard.core.mask import FreezeMask

    assert resolve_methods("all") == ["imma", "ablation", "uce", "udp"]
    with pytest.raises(ValueError, match="unknown baselines"):
        resolve_methods("uce,esd")
    inputs = toy_inputs(model, reference_lr=1e-3, reference_steps=2, batch_size=4, n_anchor_images=4, n_protected=4,
                        sample_steps=2, config=TINY)
    overrides = {"ablation": {"steps": 1}, "udp": {"rounds": 1, "surrogate_steps": 1, "pgd_steps": 1}}
    mask = FreezeMask.random(model, 0.5, seed=0)
    entries = contenders(model, "all", inputs, mask=mask, random_seeds=1, overrides=overrides)
    assert list(entries) == ["full", "random#0", "learned", "imma", "ablation", "uce", "udp", "udp (clean pool)",
                             "imma+learned"]
    assert entries["imma+learned"].mask is mask and entries["imma+learned"].model is entries["imma"].model
    domains = toy_domains(batch_size=4, heldout_n=4)
    attackers = attacker_suite(1e-3, 1, lora_rank=4)
    assert [a.name for a in attackers] == ["standard", "10x lr", "3x steps", "LoRA r4"]
    res = evaluate_masks(model, entries, domains, loss_fn, attackers[-1:], progress=False)
    # forked workers give the very same figures (each fine-tune is seeded on its own)
    par = evaluate_masks(model, entries, domains, loss_fn, attackers[-1:], progress=False, workers=2)
    assert [(r.mask, r.domain, r.after) for r in par.runs] == [(r.mask, r.domain, r.after) for r in res.runs]
    with pytest.raises(ValueError, match="workers"):
        evaluate_masks(model, entries, domains, loss_fn, attackers[-1:], progress=False, workers=0)
    s = res.summary()
    row = s["table"]["LoRA r4"]
    assert set(row) == {"full", "random", "learned", "imma", "ablation", "uce", "udp", "udp (clean pool)",
                        "imma+learned"}
    assert s["masks"]["uce"]["kind"] == "model" and s["masks"]["uce"]["weight_change"]["tensors_changed"] == 8
    assert s["masks"]["uce"]["cost"]["seconds"] >= 0 and "released" in s["masks"]["uce"]
    assert s["masks"]["udp"]["kind"] == "data" and s["masks"]["imma+learned"]["kind"] == "model+mask"
    # UDP leaves the innocent domain's data alone: that run is the reference's, copied
    runs = {(r.mask, r.domain): r for r in res.runs}
    assert runs[("udp", "checker")].after == runs[("full", "checker")].after
    assert runs[("udp", "frame")].after != runs[("full", "frame")].after
    header, rows = table_rows(s)
    assert "publisher cost (time / peak)" in header and len(rows) == 9
    assert "imma+learned" in format_table(header, rows)
    with pytest.raises(ValueError, match="unknown domain"):
        evaluate_masks(model, {"full": None, "x": build_baselines(["udp"], inputs, overrides=overrides)["udp"].__class__(
            "data", train_batches={"nope": lambda s: iter(())})}, domains, loss_fn, attackers[:1], progress=False)


def _prefill_toy_cache(tmp_path):
    from safetensors.torch import save_file

    from freezeguard.integrations.diffusers import judge

    model = toy.build_model()
    save_file(model.state_dict(), str(tmp_path / f"toy-{toy.PretrainConfig().key()}.safetensors"))
    save_file(judge.Judge().state_dict(), str(judge.cache_path(tmp_path)))
    return model


def test_cli_evaluate_baselines_all_toy(tmp_path, capsys):
    import json

    from freezeguard.cli import main

    _prefill_toy_cache(tmp_path)
    rc = main(["evaluate", "--baselines", "all", "--cache-dir", str(tmp_path), "--steps", "1", "--baseline-steps", "1",
               "--heldout", "4", "--samples", "2", "--sample-steps", "2", "--batch-size", "4", "--no-strong",
               "--quiet", "--json", "--out", str(tmp_path / "rep")])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data["table"]) == ["standard"]
    assert set(data["table"]["standard"]) == {"full", "imma", "ablation", "uce", "udp", "udp (clean pool)"}
    assert main(["evaluate", "--baselines", "esd", "--cache-dir", str(tmp_path), "--quiet"]) == 2
    assert "--baselines: unknown baselines" in capsys.readouterr().err
    assert main(["evaluate", "--cache-dir", str(tmp_path), "--quiet"]) == 2
    assert "give --mask, --baselines" in capsys.readouterr().err


def test_cli_evaluate_baselines_real_pipeline(tmp_path, capsys):
    import json

    from support.tiny_models import build_tiny_sd_pipeline, write_tiny_imagefolder

    from freezeguard.cli import main

    pipe = build_tiny_sd_pipeline(tmp_path / "sd")
    write_tiny_imagefolder(tmp_path / "t", n=4, caption="a photo of sks", seed=0, style="checker")
    write_tiny_imagefolder(tmp_path / "i", n=4, caption="a photo of stripes", seed=1, style="stripes")
    common = ["evaluate", "--pretrained", str(pipe), "--target-data", str(tmp_path / "t"), "--innocent-data",
              str(tmp_path / "i"), "--heldout", "2", "--batch-size", "2", "--steps", "1", "--no-strong", "--quiet",
              "--device", "cpu", "--baseline-steps", "1", "--out", str(tmp_path / "rep")]
    assert main(common + ["--baselines", "uce"]) == 2
    assert "--target-prompt" in capsys.readouterr().err
    rc = main(common + ["--baselines", "all", "--target-prompt", "a photo of sks", "--anchor-prompt", "a photo",
                        "--preserve-prompt", "a photo of stripes", "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["table"]["standard"]) == {"full", "imma", "ablation", "uce", "udp", "udp (clean pool)"}
    assert data["masks"]["uce"]["weight_change"]["tensors_changed"] > 0
