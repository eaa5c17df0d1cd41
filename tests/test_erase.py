"""The erase step of the authors' pipeline (apps.erase, ``freezeguard erase``) on the toy world and a
tiny SD pipeline, and the fresh-token attacker's domain."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from freezeguard.apps.baselines._common import cross_attention_kv
from freezeguard.apps.erase import changed_tensors, erase_pipeline, erase_toy
from freezeguard.apps.evaluate.toy_domains import fresh_token_domain, toy_domains
from freezeguard.cli import main
from freezeguard.integrations.diffusers import toy

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = toy.ToyModelConfig(block_out_channels=(8, 16), attention_head_dim=4, norm_num_groups=4)


def _kv(model, cond):
    """Every cross-attention key/value projection's output for one prompt embedding."""
    return [layer(cond) for _, layer in cross_attention_kv(model)]


def test_uce_erase_maps_the_target_onto_the_anchor_and_changes_nothing_else():
    model = toy.build_model(SMALL)
    erased = erase_toy(model, eraser="uce", config=SMALL, sample_steps=2, n_anchor_images=2)
    kv_names = {f"{n}.weight" for n, _ in cross_attention_kv(model)}
    assert set(erased.edited) == kv_names == set(changed_tensors(model, erased.model))
    frame, square, disc = (toy.class_embedding(c) for c in ("frame", "square", "disc"))
    with torch.no_grad():
        for before, after, anchor, kept, now in zip(_kv(model, frame), _kv(erased.model, frame), _kv(model, square),
                                                    _kv(model, disc), _kv(erased.model, disc), strict=True):
            # the target's keys/values moved most of the way to the anchor's
            assert (after - anchor).norm() < 0.5 * (before - anchor).norm()
            # a preserved class moves less than the target (with 28 prompt tokens in 32 dimensions
            # UCE cannot keep it exactly: measured ~25% of its norm in this small model)
            assert (now - kept).norm() < (after - before).norm()
    assert all(torch.equal(p, model.state_dict()[n]) for n, p in model.state_dict().items())  # not in place


def test_ablation_erase_trains_only_cross_attention():
    model = toy.build_model(SMALL)
    erased = erase_toy(model, eraser="ablation", config=SMALL, steps=2, sample_steps=2, n_anchor_images=2)
    kv_names = {f"{n}.weight" for n, _ in cross_attention_kv(model)}
    assert erased.eraser == "ablation" and erased.edited and set(erased.edited) <= kv_names
    with pytest.raises(ValueError, match="unknown eraser"):
        erase_toy(model, eraser="esd", config=SMALL, sample_steps=2, n_anchor_images=2)


def test_fresh_token_domain_is_the_target_under_a_new_prompt():
    fresh = fresh_token_domain("frame", batch_size=4, heldout_n=4)
    plain = toy_domains(("frame",), ("checker",), batch_size=4, heldout_n=4)[0]
    assert fresh.name == "frame (fresh token)" and fresh.role == "target"
    # the same held-out images, noise and timesteps; only the prompt differs
    for key in ("pixel_values", "noise", "timesteps"):
        assert torch.equal(fresh.heldout[key], plain.heldout[key]), key
    assert torch.equal(fresh.heldout["encoder_hidden_states"][0], toy.class_embedding("frame (fresh token)"))
    assert not torch.equal(fresh.heldout["encoder_hidden_states"][0], toy.class_embedding("frame"))
    batch = next(fresh.train_batches(0))
    assert torch.equal(batch["encoder_hidden_states"][0], toy.class_embedding(toy.fresh_prompt("frame")))
    assert bool(batch["is_target"].all())


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from support.tiny_models import build_tiny_sd_pipeline, write_tiny_imagefolder

    root = tmp_path_factory.mktemp("erase")
    return build_tiny_sd_pipeline(root / "sd"), write_tiny_imagefolder(root / "anchor", n=4, caption="a photo",
                                                                       seed=0, style="stripes"), root


def test_erase_pipeline_writes_an_erased_release(tiny_sd):
    src, anchor_data, root = tiny_sd
    before = load_file(str(src / "unet" / "diffusion_pytorch_model.safetensors"))
    summary = erase_pipeline(src, root / "uce", target_prompt="a photo of sks", anchor_prompt="a photo of a dog",
                             preserve_prompts=["a photo of a cat"])
    after = load_file(str(root / "uce" / "unet" / "diffusion_pytorch_model.safetensors"))
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(summary["edited"]) and changed
    assert all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
    assert (root / "uce" / "text_encoder").is_dir() and (root / "uce" / "model_index.json").is_file()
    # the release itself is untouched
    assert all(torch.equal(v, load_file(str(src / "unet" / "diffusion_pytorch_model.safetensors"))[k])
               for k, v in before.items())
    abl = erase_pipeline(src, root / "abl", target_prompt="a photo of sks", anchor_prompt="a photo of a dog",
                         eraser="ablation", anchor_data=str(anchor_data), steps=2)
    assert abl["eraser"] == "ablation" and abl["edited"]
    with pytest.raises(ValueError, match="anchor_data"):
        erase_pipeline(src, root / "x", target_prompt="a", anchor_prompt="b", eraser="ablation")
    with pytest.raises(ValueError, match="overwrite"):
        erase_pipeline(src, src, target_prompt="a", anchor_prompt="b")


def test_cli_erase(tiny_sd, capsys):
    src, _, root = tiny_sd
    rc = main(["erase", "--pretrained", str(src), "--out", str(root / "cli"), "--target-prompt", "a photo of sks",
               "--anchor-prompt", "a photo of a dog", "--json", "--device", "cpu"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["eraser"] == "uce" and len(summary["edited"]) == 8   # to_k, to_v of 4 cross-attentions
    assert (root / "cli" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert main(["erase", "--pretrained", str(src), "--out", str(root / "y"), "--target-prompt", "a",
                 "--anchor-prompt", "b", "--eraser", "ablation"]) == 2
    assert "needs --anchor-data" in capsys.readouterr().err
    assert main(["erase", "--pretrained", str(root / "missing"), "--out", str(root / "z"), "--target-prompt", "a",
                 "--anchor-prompt", "b"]) == 2
    assert not (root / "y").exists() and not (root / "z").exists()
