"""Random output-channel masks: their budget, their enforcement on the attacker, their place in the evaluation."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from freezeguard.apps.evaluate.channel_masks import ChannelMask
from freezeguard.apps.evaluate.harness import Attacker, attack_finetune, evaluate_masks
from freezeguard.apps.evaluate.toy_domains import toy_domains
from freezeguard.integrations.diffusers import toy

TINY = toy.ToyModelConfig(block_out_channels=(8, 16), attention_head_dim=4, norm_num_groups=4)

pytestmark = pytest.mark.usefixtures("one_thread")


def _largest_row(model: torch.nn.Module) -> int:
    return max(p.numel() // (p.shape[0] if p.dim() else 1) for p in model.parameters())


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.7, 0.95, 1.0])
def test_random_channel_mask_meets_its_budget_within_one_row(ratio):
    model = toy.build_model(TINY, seed=0)
    mask = ChannelMask.random(model, ratio, seed=3)
    total = sum(p.numel() for p in model.parameters())
    assert ratio <= mask.ratio("params") <= ratio + _largest_row(model) / total
    if 0.0 < ratio < 1.0:
        # spread over the network: far more tensors touched than a whole-tensor mask of that budget would
        assert mask.ratio("tensors") > 0.9


def test_random_channel_masks_are_seeded():
    model = toy.build_model(TINY, seed=0)
    a, b, c = (ChannelMask.random(model, 0.5, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(a.rows[n], b.rows[n]) for n in a.rows)
    assert any(not torch.equal(a.rows[n], c.rows[n]) for n in a.rows)


def test_enforce_keeps_frozen_rows_bit_identical_under_weight_decay():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    mask = ChannelMask.random(net, 0.5, seed=0)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-1, weight_decay=0.5)
    mask.enforce(net, opt)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, 6)).square().sum().backward()
        opt.step()
    moved = 0
    for n, p in net.named_parameters():
        rows = mask.rows[n]
        assert torch.equal(p.detach()[rows], before[n][rows]), n
        moved += int((p.detach()[~rows] != before[n][~rows]).any())
    assert moved, "the trainable rows should move"


def test_attack_under_a_channel_mask_moves_only_trainable_rows():
    model = toy.build_model(TINY, seed=0)
    loss_fn = toy.make_loss_fn(TINY)
    domain = toy_domains(heldout_n=4, batch_size=4)[0]
    mask = ChannelMask.random(model, 0.6, seed=0)
    tuned = copy.deepcopy(model)
    attack_finetune(tuned, mask, domain, loss_fn, Attacker("a", 1e-2, 2), curve_points=1)
    before = dict(model.named_parameters())
    moved = 0
    for n, p in tuned.named_parameters():
        rows = mask.rows[n]
        if p.dim() == 0:
            assert not rows.any() or torch.equal(p, before[n]), n
            continue
        assert torch.equal(p.detach()[rows], before[n].detach()[rows]), n
        moved += int(not torch.equal(p.detach()[~rows], before[n].detach()[~rows]))
    assert moved > 0


def test_evaluate_masks_scores_channel_masks_as_their_own_group_and_refuses_lora_up_front():
    model = toy.build_model(TINY, seed=0)
    loss_fn = toy.make_loss_fn(TINY)
    domains = toy_domains(heldout_n=4, batch_size=4)
    masks = {"full": None, "channels@0.5#0": ChannelMask.random(model, 0.5, seed=0)}
    res = evaluate_masks(model, masks, domains, loss_fn, [Attacker("std", 1e-3, 2)], curve_points=1, progress=False)
    summary = res.summary()
    assert "channels@0.5" in summary["table"]["std"]
    assert res.masks["channels@0.5#0"]["kind"] == "channels"
    assert math.isclose(res.masks["channels@0.5#0"]["ratio_params"], masks["channels@0.5#0"].ratio(), rel_tol=1e-9)
    with pytest.raises(ValueError, match="LoRA"):
        evaluate_masks(model, masks, domains, loss_fn, [Attacker("lora", 1e-3, 10**6, lora_rank=2)], progress=False)


def test_channel_mask_for_another_model_is_refused():
    mask = ChannelMask.random(torch.nn.Linear(4, 4), 0.5)
    with pytest.raises(ValueError, match="different model"):
        mask.enforce(torch.nn.Linear(4, 3), torch.optim.SGD(torch.nn.Linear(4, 3).parameters(), lr=0.1))
