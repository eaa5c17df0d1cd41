"""The guard where people train LoRAs outside peft: kohya sd-scripts, LyCORIS, ai-toolkit, OneTrainer, SimpleTuner.

LyCORIS runs for real (``lycoris-lora`` from the package index, the code kohya's
``--network_module lycoris.kohya`` and SimpleTuner's ``lora_type=lycoris`` run). kohya's own
``networks/lora.py``, ai-toolkit and OneTrainer are not on the package index: their adapter
networks are rebuilt in ``support/trainer_networks.py`` with the same module structure, attribute
names and key names (cited there by repository, file and class).

For each: an adapter on a frozen module is refused naming it, found on the live model without
being told (patched ``forward``); the mask in the trainer's own filter
(``freezeguard.integrations.trainers``) keeps adapters off frozen modules; a guarded run leaves
every frozen tensor bit-identical; and the saved adapter file passes ``fg.verify`` as far as
verify maps the trainer's key format (an unguarded run on frozen modules is flagged).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from support.tiny_models import build_tiny_unet
from support.trainer_networks import (
    AIToolkitLoRASpecialNetwork,
    KohyaLoRANetwork,
    OneTrainerLoRAModuleWrapper,
    onetrainer_filter_matches,
)

import freezeguard as fg
from freezeguard.core.adapters import find_adapters, frozen_adapters
from freezeguard.core.names import FrozenAdapterError
from freezeguard.integrations import trainers

pytest.importorskip("diffusers")

# Frozen: attention projections and a resnet conv, i.e. modules every trainer here targets.
FROZEN_MODULES = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                  "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                  "down_blocks.0.attentions.0.proj_in",
                  "down_blocks.0.resnets.0.conv1")


def _unet():
    unet = build_tiny_unet(seed=0, cross_attention_dim=8)
    unet.requires_grad_(False)  # what every LoRA trainer does to the base model
    return unet


def _mask(unet):
    names = [f"{m}.weight" for m in FROZEN_MODULES]
    return fg.FreezeMask.from_names(unet, names)


def _released(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def _train(unet, opt, steps: int = 2, extra_loss=None):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(1, 4, 8, 8, generator=gen)
        cond = torch.randn(1, 4, 8, generator=gen)
        loss = unet(x, 10, encoder_hidden_states=cond).sample.pow(2).mean()
        if extra_loss is not None:
            loss = loss + extra_loss()
        loss.backward()
        opt.step()


def _frozen_unchanged(unet, mask, released) -> None:
    live = unet.state_dict()
    for name in mask.frozen_names:
        assert torch.equal(live[name], released[name]), name


def _adapter_file(tmp_path, state: dict[str, torch.Tensor], name: str = "adapter.safetensors"):
    path = tmp_path / name
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path


# kohya sd-scripts networks/lora.py ---------------------------------------------------------------
def test_kohya_lora_network_on_frozen_modules_is_refused():
    unet = _unet()
    mask = _mask(unet)
    net = KohyaLoRANetwork(None, unet, conv_lora_dim=2)
    net.apply_to()  # sd-scripts registers the modules in apply_to, before prepare_optimizer_params
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    hooks = len(opt._optimizer_step_pre_hooks)
    # found on the UNet alone (patched forward), no adapters= needed
    with pytest.raises(FrozenAdapterError, match=r"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
                                                 r"_to_q \(on .*attn1\.to_q: .*attn1\.to_q\.weight\)"):
        fg.wrap(opt, mask, unet)
    assert len(opt._optimizer_step_pre_hooks) == hooks
    with pytest.raises(FrozenAdapterError, match=r"resnets_0_conv1 \(on down_blocks\.0\.resnets\.0\.conv1"):
        fg.guard(unet, mask, adapters=net, lr=1e-3)
    assert sorted(frozen_adapters(unet, mask)) == sorted(
        "lora_unet_" + m.replace(".", "_") for m in FROZEN_MODULES)


def test_kohya_lora_network_guarded_run_passes_verify_and_unguarded_fails(tmp_path):
    unet = _unet()
    released = _released(unet)
    # a mask over modules kohya's networks/lora.py does not target (it has no module filter)
    ok_mask = fg.FreezeMask.from_names(unet, ["conv_in.weight", "time_embedding.linear_1.weight",
                                              "down_blocks.0.resnets.0.conv1.weight"])
    net = KohyaLoRANetwork(None, unet)
    net.apply_to()
    opt = fg.wrap(torch.optim.AdamW(net.parameters(), lr=1e-2), ok_mask, unet)
    for p in unet.parameters():  # a trainer that switches requires_grad back on (OneTrainer, ai-toolkit)
        p.requires_grad_(True)
    _train(unet, opt)
    _frozen_unchanged(unet, ok_mask, released)
    assert not torch.equal(net.unet_loras[0].lora_up.weight, torch.zeros_like(net.unet_loras[0].lora_up.weight))
    path = _adapter_file(tmp_path, net.state_dict())
    report = fg.verify(released, path, ok_mask)
    assert report.ok and not report.lora_violations

    # unguarded, on the frozen attention modules: the adapter file is flagged
    mask = _mask(unet)
    unet2 = _unet()
    bad = KohyaLoRANetwork(None, unet2)
    bad.apply_to()
    _train(unet2, torch.optim.AdamW(bad.parameters(), lr=1e-2))
    report = fg.verify(released, _adapter_file(tmp_path, bad.state_dict(), "bad.safetensors"), mask)
    assert not report.ok
    assert {t for _, t in report.lora_violations} >= {f"{m}.weight" for m in FROZEN_MODULES[:3]}


def test_kohya_text_encoder_lora_needs_others(tmp_path):
    transformers = pytest.importorskip("transformers")
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8))
    te.requires_grad_(False)
    unet = _unet()
    released = _released(unet)
    mask = fg.FreezeMask.from_names(unet, ["conv_in.weight"])
    net = KohyaLoRANetwork(te, unet)
    net.apply_to()
    assert net.text_encoder_loras
    with pytest.raises(RuntimeError, match=r"others=\[text_encoder\]"):
        fg.wrap(torch.optim.AdamW(net.parameters(), lr=1e-2), mask, unet)
    opt = fg.wrap(torch.optim.AdamW(net.parameters(), lr=1e-2), mask, unet, others=[te])
    ids = torch.tensor([[1, 2, 3, 4]])
    te_lora = net.text_encoder_loras[0].lora_up.weight
    before = te_lora.detach().clone()
    _train(unet, opt, extra_loss=lambda: te(ids).last_hidden_state.pow(2).mean())
    assert not torch.equal(te_lora, before)  # the text-encoder LoRA trains
    _frozen_unchanged(unet, mask, released)
    # guard takes the same others= (and optimizes the network's parameters with adapters=)
    opt = fg.guard(unet, mask, adapters=net, others=[te], lr=1e-2)
    assert {id(p) for p in net.parameters()} <= {id(p) for g in opt.param_groups for p in g["params"]}


# ai-toolkit toolkit/lora_special.py ---------------------------------------------------------------
def test_aitoolkit_network_filtered_by_the_mask_trains_guarded_and_passes_verify(tmp_path):
    unet = _unet()
    released = _released(unet)
    mask = _mask(unet)
    bad = AIToolkitLoRASpecialNetwork(unet)
    bad.apply_to()
    with pytest.raises(FrozenAdapterError, match=r"attn2_to_k"):
        fg.wrap(torch.optim.AdamW(bad.parameters(), lr=1e-2), mask, unet)

    unet = _unet()
    kwargs = trainers.aitoolkit_network_kwargs(unet, mask)
    net = AIToolkitLoRASpecialNetwork(unet, **kwargs)
    net.apply_to()
    assert frozen_adapters(unet, mask) == [] and len(find_adapters(unet)) == len(net.unet_loras) > 10
    opt = fg.wrap(torch.optim.AdamW(net.parameters(), lr=1e-2), mask, unet)
    _train(unet, opt)
    _frozen_unchanged(unet, mask, released)
    report = fg.verify(released, _adapter_file(tmp_path, net.state_dict()), mask)
    assert report.ok, report


# OneTrainer modules/module/LoRAModule.py ----------------------------------------------------------
def test_onetrainer_layer_filter_trains_guarded_and_keeps_frozen_modules_out(tmp_path):
    unet = _unet()
    released = _released(unet)
    mask = _mask(unet)
    everything = OneTrainerLoRAModuleWrapper(unet, "lora_unet")
    everything.hook_to_module()
    with pytest.raises(FrozenAdapterError, match=r"conv1"):  # found from the UNet: the wrapper is no Module
        fg.wrap(torch.optim.AdamW(everything.parameters(), lr=1e-2), mask, unet)

    unet = _unet()
    config = trainers.onetrainer_layer_filter(unet, mask)
    wrapper = OneTrainerLoRAModuleWrapper(unet, "lora_unet", config["layer_filter"], config["layer_filter_regex"])
    assert not set(FROZEN_MODULES) & set(wrapper.lora_modules)
    assert not any(onetrainer_filter_matches(p, True, m) for p in config["layer_filter"].split(",")
                   for m in FROZEN_MODULES)
    wrapper.hook_to_module()
    opt = fg.wrap(torch.optim.AdamW(wrapper.parameters(), lr=1e-2), mask, unet)
    _train(unet, opt)
    _frozen_unchanged(unet, mask, released)
    # The wrapper's in-memory key layout (OneTrainer before July 2026) is "lora_unet.<dotted path>.lora_down.weight".
    # No OneTrainer saver writes it to disk (they convert: kohya / legacy / OMI / diffusers / original / comfy
    # names, tested in test_verify_trainer_files.py); verify has no reading for it and fails closed on the
    # honest file too: exit 2 with the keys listed, never OK.
    state = wrapper.state_dict()
    assert all(k.startswith("lora_unet.") for k in state)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp_path / "onetrainer.safetensors"))
    report = fg.verify(released, tmp_path / "onetrainer.safetensors", mask)
    assert not report.ok and report.exit_code == 2 and report.cannot_verify


# LyCORIS (real), through kohya's lycoris.kohya and SimpleTuner's apply_preset -------------------------
@pytest.fixture
def lycoris_classes():
    """LycorisNetwork keeps presets in class attributes: restore them after each test."""
    lycoris = pytest.importorskip("lycoris")
    from lycoris import LycorisNetwork

    saved = {k: v for k, v in vars(LycorisNetwork).items() if k.isupper()}
    yield lycoris
    for k, v in saved.items():
        setattr(LycorisNetwork, k, v)


ALGOS = ["lora", "loha", "lokr", "full", "diag-oft", "ia3"]
# LyCORIS 4.1.3's "full" preset lists both the TimestepEmbedding class and time_embedding.linear_1 and
# asserts on the duplicate for SD UNets; name the targets as a kohya user's preset file would.
KOHYA_PRESET = {"unet_target_module": ["Transformer2DModel", "ResnetBlock2D"], "unet_target_name": ["conv_in"]}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("algo", ALGOS)
def test_lycoris_through_kohya_refused_then_filtered_by_preset(lycoris_classes, algo, tmp_path):
    from lycoris.kohya import create_network

    def build(unet, preset_path):
        net = create_network(1.0, 2, 1.0, None, [], unet, algo=algo, preset=str(preset_path), factor=2,
                             block_size=2)
        net.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
        return net

    unet = _unet()
    released = _released(unet)
    mask = _mask(unet)
    args = trainers.kohya_network_args(unet, fg.FreezeMask.from_names(unet, []), tmp_path / "none.toml",
                                       KOHYA_PRESET)
    bad = build(unet, args[0].split("=", 1)[1])
    if algo == "full":  # LyCORIS FullModule deletes the base weight and owns a trained copy: the mask no longer fits
        with pytest.raises(ValueError, match=r"mask does not fit .*attn1\.to_q\.weight"):
            fg.wrap(torch.optim.AdamW(bad.parameters(), lr=1e-3), mask, unet)
    else:
        with pytest.raises(FrozenAdapterError, match=r"attn1\.to_q"):
            fg.wrap(torch.optim.AdamW(bad.parameters(), lr=1e-3), mask, unet)

    # unguarded, the same network trains on the frozen modules and verify flags its file
    for p in bad.parameters():
        p.requires_grad_(True)
    _train(unet, torch.optim.AdamW(bad.parameters(), lr=1e-2), steps=1)
    bad.save_weights(str(tmp_path / "bad.safetensors"), torch.float32, {})
    report = fg.verify(released, tmp_path / "bad.safetensors", mask)
    assert not report.ok and {t for _, t in report.lora_violations} >= {f"{m}.weight" for m in FROZEN_MODULES[:2]}

    unet = _unet()
    args = trainers.kohya_network_args(unet, mask, tmp_path / "preset.toml", KOHYA_PRESET)
    net = build(unet, args[0].split("=", 1)[1])
    assert net.loras and frozen_adapters(unet, mask) == []
    opt = fg.wrap(torch.optim.AdamW(net.parameters(), lr=1e-2), mask, unet)
    for p in unet.parameters():
        p.requires_grad_(True)
    _train(unet, opt)
    _frozen_unchanged(unet, mask, released)
    path = tmp_path / "lycoris.safetensors"
    net.save_weights(str(path), torch.float32, {})
    report = fg.verify(released, path, mask)  # kohya key format (lora_unet_<path>.<weight>): verify maps it
    assert report.ok and not report.lora_violations, report


@pytest.mark.filterwarnings("ignore")
def test_simpletuner_lycoris_config_keeps_lokr_off_frozen_modules(lycoris_classes):
    from lycoris import LycorisNetwork, create_lycoris

    unet = _unet()
    mask = _mask(unet)
    config = trainers.simpletuner_lycoris_config(unet, mask, {
        "algo": "lokr", "multiplier": 1.0, "linear_dim": 2, "linear_alpha": 1, "factor": 2,
        "apply_preset": {"target_module": ["Attention", "ResnetBlock2D"]}})
    # what simpletuner/helpers/training/trainer.py init_trainable_peft_adapter does with the JSON
    LycorisNetwork.apply_preset(config["apply_preset"])
    net = create_lycoris(unet, config["multiplier"], linear_dim=config["linear_dim"],
                         linear_alpha=config["linear_alpha"], algo=config["algo"], factor=config["factor"])
    net.apply_to()
    assert net.loras and frozen_adapters(unet, mask) == []
    released = _released(unet)
    opt = fg.wrap(torch.optim.AdamW(net.parameters(), lr=1e-2), mask, unet)
    _train(unet, opt)
    _frozen_unchanged(unet, mask, released)


def test_kohya_exclude_patterns_fullmatch_only_the_frozen_modules(tmp_path):
    """kohya networks that read exclude_patterns (networks/lora_anima.py: ast.literal_eval, then
    re.fullmatch against each module's path) exclude exactly the frozen modules."""
    import ast
    import re

    unet = _unet()
    mask = _mask(unet)
    args = trainers.kohya_network_args(unet, mask, tmp_path / "p.toml")
    key, value = args[1].split("=", 1)
    assert key == "exclude_patterns"
    patterns = [re.compile(p) for p in ast.literal_eval(value)]
    hit = {n for n, _ in unet.named_modules() if any(p.fullmatch(n) for p in patterns)}
    assert hit == set(FROZEN_MODULES)


@pytest.mark.filterwarnings("ignore")
def test_lycoris_parametrize_mode_is_placed_on_its_module(lycoris_classes):
    """LyCORIS ``parametrize`` (torch.nn.utils.parametrize): the weight moves to
    ``<module>.parametrizations.weight.original`` and the adapter lives inside the module."""
    from lycoris.modules.locon import LoConModule

    unet = _unet()
    mask = _mask(unet)
    released = _released(unet)
    frozen_conv = unet.get_submodule("down_blocks.0.resnets.0.conv1")
    adapter = LoConModule.parametrize(frozen_conv, "weight", 1.0, 2, 1.0)
    with pytest.raises(FrozenAdapterError, match=r"on down_blocks\.0\.resnets\.0\.conv1: "):
        fg.wrap(torch.optim.AdamW(adapter.parameters(), lr=1e-2), mask, unet)

    unet = _unet()
    free_conv = unet.get_submodule("down_blocks.0.resnets.0.conv2")
    adapter = LoConModule.parametrize(free_conv, "weight", 1.0, 2, 1.0)
    torch.nn.init.normal_(adapter.lora_up.weight)
    opt = fg.wrap(torch.optim.AdamW(adapter.parameters(), lr=1e-2), mask, unet)
    _train(unet, opt)
    _frozen_unchanged(unet, mask, released)
