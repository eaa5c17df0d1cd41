"""LoRA (peft) on a tiny UNet: adapters on frozen modules are refused, excluded ones train safely."""
from __future__ import annotations

import pytest
import torch
from support.tiny_models import build_tiny_unet

import freezeguard as fg
from freezeguard.core.adapters import frozen_adapters
from freezeguard.core.names import FrozenAdapterError, canonical_name, trainable_target_modules

peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_unet() -> torch.nn.Module:
    return build_tiny_unet(seed=0, cross_attention_dim=8)


def attn_mask(unet) -> fg.FreezeMask:
    """Freeze the query and key projections of every self-attention."""
    names = [n for n, _ in unet.named_parameters() if ".attn1.to_q." in n or ".attn1.to_k." in n]
    assert names
    return fg.FreezeMask.from_names(unet, names)


def train_step(unet, opt):
    opt.zero_grad()
    out = unet(torch.randn(2, 4, 8, 8), torch.tensor([3, 7]), torch.randn(2, 3, 8)).sample
    out.pow(2).mean().backward()
    opt.step()


def lora(**kw):
    return peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", **kw)


def test_adapters_on_frozen_modules_are_refused():
    unet = tiny_unet()
    mask = attn_mask(unet)
    unet.add_adapter(lora(target_modules=TARGETS))
    bad = frozen_adapters(unet, mask)
    assert bad == sorted({n.rsplit(".", 1)[0] for n in mask.frozen_names})
    params = [p for p in unet.parameters() if p.requires_grad]
    with pytest.raises(FrozenAdapterError, match=r"attn1\.to_q"):
        fg.wrap(torch.optim.AdamW(params, lr=1e-3), mask, unet)
    with pytest.raises(FrozenAdapterError, match=r"attn1\.to_k"):
        fg.guard(unet, mask, lr=1e-3)


@pytest.mark.parametrize("how", ["exclude_modules", "target_modules"])
def test_adapters_on_trainable_modules_train_and_frozen_stay(how):
    unet = tiny_unet()
    mask = attn_mask(unet)
    if how == "exclude_modules":
        config = lora(target_modules=TARGETS, exclude_modules=mask.lora_exclude_modules(unet))
    else:
        config = lora(target_modules=trainable_target_modules(unet, mask, candidates=TARGETS))
    unet.add_adapter(config)
    assert frozen_adapters(unet, mask) == []
    wrapped = [n for n, m in unet.named_modules() if hasattr(m, "base_layer")]
    assert wrapped and not any(".attn1.to_q" in n or ".attn1.to_k" in n for n in wrapped)
    # a careless user re-enables every gradient: the frozen tensors must still not move
    for p in unet.parameters():
        p.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    opt = fg.wrap(torch.optim.AdamW(unet.parameters(), lr=1e-2), mask, unet)
    train_step(unet, opt)
    params = dict(unet.named_parameters())
    frozen_live = [n for n in params if canonical_name(n) in set(mask.frozen_names)]
    assert len(frozen_live) == len(mask.frozen_names)
    for n in frozen_live:
        assert torch.equal(params[n], before[n]) and params[n] not in opt.state
    lora_b = [n for n in params if "lora_B" in n]
    assert lora_b and any(not torch.equal(params[n], before[n]) for n in lora_b)


def test_peft_model_wrapper_names_map_back():
    unet = tiny_unet()
    mask = attn_mask(unet)
    model = peft.get_peft_model(unet, lora(target_modules=TARGETS,
                                           exclude_modules=mask.lora_exclude_modules(unet)))
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("base_model.model.") and ".base_layer." in n for n in names)
    opt = fg.guard(model, mask, lr=1e-2, backend="torch")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    train_step(model.base_model.model, opt)
    frozen = set(mask.frozen_names)
    for n, p in model.named_parameters():
        if canonical_name(n) in frozen:
            assert torch.equal(p, before[n]), n


def test_modules_to_save_copy_of_frozen_module_is_refused():
    unet = tiny_unet()
    mask = fg.FreezeMask.from_names(unet, ["conv_in.weight"])
    model = peft.get_peft_model(unet, lora(target_modules=["to_q"], modules_to_save=["conv_in"]))
    assert any("conv_in" in b for b in frozen_adapters(model, mask))
    with pytest.raises(FrozenAdapterError, match="conv_in"):
        fg.wrap(torch.optim.SGD(model.parameters(), lr=0.1), mask, model)


def test_verify_flags_lora_file_on_frozen_tensors(tmp_path):
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    released = tiny_unet()
    mask = attn_mask(released)
    bad = tiny_unet()
    bad.add_adapter(lora(target_modules=TARGETS))
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(bad).items()}, str(path))
    report = fg.verify(released, path, mask)
    assert not report.ok and not report.violations
    hit = {f for _, f in report.lora_violations}
    assert hit == {n for n in mask.frozen_names if n.endswith(".weight")}
    assert any("adapter file" in n for n in report.notes)

    good = tiny_unet()
    good.add_adapter(lora(target_modules=TARGETS, exclude_modules=mask.lora_exclude_modules(good)))
    save_file({f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(good).items()}, str(path))
    assert fg.verify(released, tmp_path, mask).ok  # the folder form finds the LoRA file
