"""Every peft tuner that can adapt a Linear / LayerNorm of a UNet, saved with ``save_pretrained``:
verify flags it on a frozen module and passes it on a trainable one (issue 25, one adapter rule).

The tuners are the ones the installed peft offers (``peft.PeftType``), not a list kept here:
a new tuner type runs with its defaults and is judged by where it hangs, not by its weight names.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from support.tiny_models import build_tiny_unet

import freezeguard as fg
from freezeguard.cli import main
from freezeguard.core.names import canonical_name

peft = pytest.importorskip("peft")
pytest.importorskip("diffusers")

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING  # noqa: E402

BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"
FROZEN = [f"{BLOCK}.attn1.to_q.weight", f"{BLOCK}.attn1.to_out.0.weight", f"{BLOCK}.attn1.to_out.0.bias",
          f"{BLOCK}.norm1.weight"]
# (module on frozen tensors, module on trainable tensors) per kind of layer a tuner adapts
LINEAR = (f"{BLOCK}.attn1.to_q", f"{BLOCK}.attn1.to_k")
BIASED = (f"{BLOCK}.attn1.to_out.0", f"{BLOCK}.attn2.to_out.0")
NORM = (f"{BLOCK}.norm1", f"{BLOCK}.norm2")
# settings the tiny 8-wide layers need (defaults assume LLM widths); the target kind where not Linear
SETTINGS = {
    "ADALORA": {"total_step": 10}, "IA3": {"feedforward_modules": []}, "FOURIERFT": {"n_frequency": 16},
    "VBLORA": {"vector_length": 4, "num_vectors": 8}, "C3A": {"block_size": 4}, "HRA": {"r": 2},
    "BOFT": {"boft_block_size": 4}, "OFT": {"r": 0, "oft_block_size": 4}, "RANDLORA": {"r": 2}, "SHIRA": {"r": 2},
    "WAVEFT": {"n_frequency": 16}, "GRALORA": {"r": 4, "gralora_k": 2}, "MISS": {"r": 2}, "DELORA": {"r": 2},
    "ROAD": {"group_size": 4}, "PSOFT": {"r": 2}, "SUPERTUNING": {"sparsity": 0.5}, "LORA": {"r": 2},
}
KIND = {"LN_TUNING": NORM, "BEFT": BIASED}
# not applicable to a UNet layer, with the reason
NOT_APPLICABLE = {
    "ADAPTION_PROMPT": "LLaMA-style attention only", "XLORA": "a mixture over other LoRA adapters (no target_modules)",
    "TRAINABLE_TOKENS": "token embeddings only", "ADAMSS": "needs scikit-learn",
    "SHADOW": "locates a transformer decoder backbone",
}
TUNERS = sorted(t.value for t, c in PEFT_TYPE_TO_CONFIG_MAPPING.items() if not issubclass(c, peft.PromptLearningConfig))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_release")
    unet = build_tiny_unet(seed=0, cross_attention_dim=8)
    unet.save_pretrained(root / "released")
    fg.FreezeMask.from_names(unet, FROZEN).save(root / "mask.safetensors", unet)
    return root, {k: v.clone() for k, v in unet.state_dict().items()}


def _adapted(tuner, module, out):
    """Save a peft model with ``tuner`` on ``module`` (weights moved off their init, as training does)."""
    cfg_cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType(tuner)]
    config = cfg_cls(target_modules=[module], **SETTINGS.get(tuner, {}))
    torch.manual_seed(0)
    model = peft.get_peft_model(build_tiny_unet(seed=0, cross_attention_dim=8), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point():
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    return model


@pytest.mark.parametrize("tuner", TUNERS)
def test_every_peft_tuner_on_a_frozen_module_is_flagged(release, tmp_path, capsys, tuner):
    if tuner in NOT_APPLICABLE:
        pytest.skip(NOT_APPLICABLE[tuner])
    root, released = release
    bad_module, good_module = KIND.get(tuner, LINEAR)
    argv = ["verify", "--released", str(root / "released"), "--mask", str(root / "mask.safetensors"), "--json"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _adapted(tuner, bad_module, tmp_path / "bad")
        code = main(argv + ["--finetuned", str(tmp_path / "bad")])
        data = json.loads(capsys.readouterr().out)
        assert code == 1, (tuner, data["cannot_verify"][:3])
        assert {f for v in data["lora_violations"] for f in [v["frozen"]]} & set(FROZEN)
        try:
            merged = model.merge_and_unload()
        except (NotImplementedError, ValueError, RuntimeError, AttributeError):
            merged = None  # this tuner cannot merge: it changes the layer's output at inference instead
        if merged is not None:
            params = {canonical_name(n): p for n, p in merged.named_parameters()}
            assert any(not torch.equal(params[f], released[f]) for f in FROZEN if f.startswith(bad_module + ".")), tuner
        _adapted(tuner, good_module, tmp_path / "good")
        code = main(argv + ["--finetuned", str(tmp_path / "good")])
        data = json.loads(capsys.readouterr().out)
        assert code == 0, (tuner, data["cannot_verify"][:3], data["lora_violations"][:3])


def test_the_installed_peft_offers_the_tuners_the_issue_names():
    named = {"LORA", "LOHA", "LOKR", "IA3", "ADALORA", "OFT", "BOFT", "VERA", "HRA", "FOURIERFT", "VBLORA", "MISS",
             "C3A", "RANDLORA", "SHIRA", "ROAD", "DELORA", "WAVEFT", "GRALORA", "LN_TUNING"}
    assert named <= set(TUNERS)


def test_adapter_config_targeting_a_frozen_module_without_its_weights(release, tmp_path, capsys):
    """peft's ``PeftModel.from_pretrained`` puts a layer on every module ``adapter_config.json`` targets;
    one whose weights the file lacks keeps its init (random with ``init_lora_weights=False``), and
    ``merge_and_unload`` writes it into the frozen tensor. The config is audited with the weights."""
    root, released = release
    good_module, bad_module = LINEAR[1], LINEAR[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(build_tiny_unet(seed=0, cross_attention_dim=8),
                                    peft.LoraConfig(r=2, init_lora_weights=False, target_modules=[good_module]))
        model.save_pretrained(tmp_path / "up")
        config = json.loads((tmp_path / "up" / "adapter_config.json").read_text())
        config["target_modules"] = [good_module, bad_module]
        (tmp_path / "up" / "adapter_config.json").write_text(json.dumps(config))
        loaded = peft.PeftModel.from_pretrained(build_tiny_unet(seed=0, cross_attention_dim=8), tmp_path / "up")
        merged = {canonical_name(n): p for n, p in loaded.merge_and_unload().named_parameters()}
    assert not torch.equal(merged[f"{bad_module}.weight"], released[f"{bad_module}.weight"])
    code = main(["verify", "--released", str(root / "released"), "--mask", str(root / "mask.safetensors"),
                 "--finetuned", str(tmp_path / "up"), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 1 and {"key": "adapter_config.json target_modules", "frozen": f"{bad_module}.weight"} \
        in data["lora_violations"]


def test_adapter_config_target_parameters_on_a_frozen_tensor(release, tmp_path, capsys):
    """peft's LoRA on parameters (``target_parameters``) adapts the module owning the parameter."""
    root, released = release
    bad = f"{LINEAR[0]}.weight"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(build_tiny_unet(seed=0, cross_attention_dim=8),
                                    peft.LoraConfig(r=2, target_modules=[], target_parameters=[bad],
                                                    init_lora_weights=False))
        model.save_pretrained(tmp_path / "up")
        merged = {canonical_name(n): p for n, p in model.merge_and_unload().named_parameters()}
    assert not torch.equal(merged[bad], released[bad])
    code = main(["verify", "--released", str(root / "released"), "--mask", str(root / "mask.safetensors"),
                 "--finetuned", str(tmp_path / "up"), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 1 and {"key": "adapter_config.json target_modules", "frozen": bad} in data["lora_violations"]
