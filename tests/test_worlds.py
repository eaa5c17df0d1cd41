"""The evaluation's toy worlds (apps.toy_worlds.WORLDS): the shapes world and the known family of faces,
each with an arm where the model knew the target and the publisher erased it, and one where it is new;
and the target streams of the prior-preservation attacker."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from freezeguard.apps.demo import WORLDS, DemoConfig, release
from freezeguard.apps.evaluate.toy_domains import prior_preservation_domain, toy_domains
from freezeguard.integrations.diffusers import toy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_family_members_are_faces_of_their_own_fixed_geometry():
    rng = np.random.default_rng(0)
    mean = {m: np.mean([toy.draw(m, rng) for _ in range(64)], axis=0) for m in toy.FAMILY_MEMBERS}
    generic = np.mean([toy.draw(toy.FAMILY, rng) for _ in range(64)], axis=0)
    for i, a in enumerate(toy.FAMILY_MEMBERS):
        # a member's images agree with each other more than with another member's
        for b in toy.FAMILY_MEMBERS[i + 1:]:
            assert np.abs(mean[a] - mean[b]).mean() > 0.05, (a, b)
        assert np.abs(mean[a] - generic).mean() > 0.03, a
    # and each coordinate of the geometry separates every pair
    geo = np.stack([toy.member_geometry(k) for k in range(toy.FAMILY_SIZE)])
    assert (np.abs(geo[:, None] - geo[None]) + np.eye(toy.FAMILY_SIZE)[..., None] > 0).all()
    with pytest.raises(ValueError, match="out of range"):
        toy.member_geometry(toy.FAMILY_SIZE)


@pytest.mark.parametrize("world", list(WORLDS))
def test_each_world_names_its_target_and_what_the_model_knew(world):
    cfg = DemoConfig(world=world)
    spec = WORLDS[world]
    assert cfg.target == spec.target and cfg.innocent == spec.innocent and cfg.anchor == spec.kin
    classes = cfg.pretrain_config().classes
    # the erasing arm's model knew the target; the other arm's never saw it
    assert (cfg.target[0] in classes) == spec.erases
    assert cfg.anchor in classes and not set(cfg.innocent) & set(classes)
    assert set(cfg.target) | set(cfg.innocent) <= set(spec.judge_classes())


def test_changing_world_takes_the_new_worlds_target_unless_given():
    family = DemoConfig().replace(world="family relearn")
    assert family.target == ("person 0",) and family.anchor == "person"
    kept = DemoConfig().replace(world="family relearn", target=("person 3",))
    assert kept.target == ("person 3",)
    assert DemoConfig().replace(eraser="ablation").target == ("frame",)   # same world: untouched
    with pytest.raises(ValueError, match="unknown world"):
        DemoConfig(world="faces")


def test_default_world_pretrains_and_judges_as_before():
    # the demo's figures and caches must not move with the second world: same classes, same order
    assert DemoConfig().pretrain_config().classes == toy.BASE_CLASSES + toy.TARGET_CLASSES
    assert WORLDS["relearn"].judge_classes() == toy.ALL_CLASSES
    assert DemoConfig(world="new concept").pretrain_config() == DemoConfig().pretrain


def test_family_relearn_release_erases_the_member_toward_the_family(tmp_path):
    cfg = DemoConfig.quick().replace(world="family relearn")
    pretrained, released, erased = release(cfg, tmp_path)
    assert erased is not None and erased.edited and all("attn2.to_" in n for n in erased.edited)
    changed = [n for n, p in released.state_dict().items() if not torch.equal(p, pretrained.state_dict()[n])]
    assert sorted(changed) == sorted(erased.edited)
    _, new_released, nothing = release(cfg.replace(world="family new member"), tmp_path)
    assert nothing is None


def test_prior_preservation_domain_mixes_the_class_into_every_batch():
    dom = prior_preservation_domain("person 0", "person", batch_size=6, heldout_n=4)
    plain = toy_domains(("person 0",), (), batch_size=6, heldout_n=4)[0]
    for key in ("pixel_values", "noise", "timesteps", "encoder_hidden_states"):
        assert torch.equal(dom.heldout[key], plain.heldout[key]), key    # judged on the target alone
    batch = next(dom.train_batches(0))
    own, kin = toy.class_embedding("person 0"), toy.class_embedding("person")
    emb = batch["encoder_hidden_states"]
    assert sum(torch.equal(e, own) for e in emb) == 3 and sum(torch.equal(e, kin) for e in emb) == 3
    with pytest.raises(ValueError, match="batch_size >= 2"):
        prior_preservation_domain(batch_size=1)


def test_the_demo_command_offers_every_world():
    import argparse

    from freezeguard.cli.demo import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    world = next(a for a in parser._actions if a.dest == "world")
    assert tuple(world.choices) == tuple(WORLDS)


def test_contrast_reference_ranks_what_the_target_moves_and_the_legal_data_does_not(tmp_path):
    from freezeguard.apps.demo import publisher_finetune, reference_scores
    from freezeguard.apps.learn.reference_masks import contrast_scores

    cfg = DemoConfig.quick().replace(publisher_steps=3)
    model = toy.build_model(cfg.pretrain.model)
    loss_fn = toy.make_loss_fn(cfg.pretrain.model)
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    scores = reference_scores(model, pre, cfg, loss_fn, ("contrast",))["contrast"]
    alone = {c: publisher_finetune(model, cfg, loss_fn, progress=False, only=c) for c in (cfg.target, cfg.innocent)}
    assert scores == contrast_scores(model, pre, alone[cfg.target], alone[cfg.innocent])
    assert set(scores) == {n for n, _ in model.named_parameters()} and max(scores.values()) > 0
    # each separate fine-tune saw only its own classes: they end in different places
    assert any(not torch.equal(alone[cfg.target][n], alone[cfg.innocent][n]) for n in scores)


def test_a_lora_attacker_facing_frozen_attention_trains_nothing():
    from freezeguard.apps.baselines._common import attention_projection_names
    from freezeguard.apps.evaluate.harness import Attacker, attack_finetune, attacker_optimizer
    from freezeguard.core.mask import FreezeMask

    cfg = DemoConfig.quick()
    model = toy.build_model(cfg.pretrain.model)
    projections = [f"{n}.weight" for n in attention_projection_names(model)]
    mask = FreezeMask.from_names(model, projections)
    lora = Attacker("LoRA r4", lr=1e-2, steps=3, lora_rank=4)
    assert attacker_optimizer(model, mask, lora) is None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dom = toy_domains(cfg.target, (), batch_size=4, heldout_n=4)[0]
    curve = attack_finetune(model, mask, dom, toy.make_loss_fn(cfg.pretrain.model), lora)
    assert curve[0][1] == curve[-1][1] and curve[-1][0] == 3
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # with one projection left trainable the adapters go there
    assert attacker_optimizer(model, FreezeMask.from_names(model, projections[1:]), lora) is not None


def test_demo_help_states_the_configs_defaults():
    import argparse

    from freezeguard.cli.demo import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions}
    cfg = DemoConfig()
    assert f"the demo's, {cfg.strong_lr_mult:g} " in helps["strong_lr_mult"]
    assert f"the demo's, {cfg.strong_steps_mult:g}," in helps["strong_steps_mult"]
    assert cfg.baselines == () and "default: none" in helps["baselines"]
