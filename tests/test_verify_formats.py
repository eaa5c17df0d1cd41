"""verify reads the formats people upload, through the converters their loaders use (issue 25).

Each upload is written the way its tool writes it; the loader that users run shows the frozen
tensor changed; verify exits 1 on it (or 2 where nothing maps) and 0 on the honest twin.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.tiny_models import build_tiny_unet

import freezeguard as fg
from freezeguard.cli import main
from freezeguard.core.names import canonical_name

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")


def _verify(capsys, released, upload, mask_path, *extra):
    code = main(["verify", "--released", str(released), "--mask", str(mask_path), "--finetuned", str(upload),
                 "--json", *map(str, extra)])
    return code, json.loads(capsys.readouterr().out)


def _released_params(model):
    return {canonical_name(n): p.detach() for n, p in model.named_parameters()}


def _flux_lora_loaded_and_verified(capsys, tmp_path, name, lora, model, frozen, released, mask):
    """Save ``lora``, let diffusers' Flux loader apply and fuse it, and check verify's exit code against
    what the loader did: a "bad" file changes the frozen tensor and is exit 1, a "good" one neither."""
    path = tmp_path / f"{name}.safetensors"
    save_file(lora, str(path))
    sd = diffusers.FluxPipeline.lora_state_dict(str(path))
    target = _tiny_flux()
    diffusers.FluxPipeline.load_lora_into_transformer(sd, network_alphas=None, transformer=target)
    target.fuse_lora()
    changed = not torch.equal(_released_params(target)[frozen], _released_params(model)[frozen])
    code, data = _verify(capsys, released, path, mask)
    assert (code, changed) == ((1, True) if name == "bad" else (0, False)), (name, data["cannot_verify"][:3])


def _release(model, tmp_path, frozen):
    model.save_pretrained(tmp_path / "released")
    mask = fg.FreezeMask.from_names(model, frozen)
    mask.save(tmp_path / "mask.safetensors", model)
    return tmp_path / "released", tmp_path / "mask.safetensors"


# ---------------------------------------------------------------------------------------------
# original-layout single files (what the diffusers -> SD conversion script, ai-toolkit and
# OneTrainer write for SD-1.x / SDXL)

_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
           ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def original_unet_name(name: str, layout, layers_per_block: int) -> str:
    """The original (LDM / SGM) name of a diffusers UNet tensor, for any number of blocks.

    The block arithmetic of huggingface/diffusers scripts/convert_diffusers_to_original_stable_diffusion.py
    (``unet_conversion_map_layer``: input_blocks.{3*i+j+1}, output_blocks.{3*i+j}, hard-wired there to
    4 blocks of 2 layers), written for ``layers_per_block`` and the blocks the model has; SDXL's
    ``label_emb`` as in kohya-ss/sd-scripts library/sdxl_model_util.py.
    """
    step = layers_per_block + 1
    module, _, leaf = name.rpartition(".")
    for hf, sd in _TOP.items():
        if module == hf:
            return f"{sd}.{leaf}"
    p = name.split(".")
    if p[0] == "down_blocks":
        i, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
        if kind == "downsamplers":
            return ".".join([f"input_blocks.{(i + 1) * step}.0.op"] + p[5:])
        head = f"input_blocks.{1 + i * step + j}.{0 if kind == 'resnets' else 1}"
    elif p[0] == "up_blocks":
        i, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
        if kind == "upsamplers":
            has_attn = any(n.startswith(f"up_blocks.{i}.attentions.") for n in layout)
            return ".".join([f"output_blocks.{i * step + layers_per_block}.{2 if has_attn else 1}"] + p[4:])
        head = f"output_blocks.{i * step + j}.{0 if kind == 'resnets' else 1}"
    elif p[0] == "mid_block":
        kind, j, rest = p[1], int(p[2]), p[3:]
        head = f"middle_block.{2 * j if kind == 'resnets' else 1}"
    else:
        raise KeyError(name)
    tail = ".".join(rest)
    if kind == "resnets":
        for sd, hf in _RESNET:
            tail = tail.replace(hf, sd)
    return f"{head}.{tail}"


def to_original_layout(state: dict, layers_per_block: int) -> dict:
    return {"model.diffusion_model." + original_unet_name(k, state, layers_per_block): v for k, v in state.items()}


def _tiny_sd15():
    return build_tiny_unet(seed=0, cross_attention_dim=8)


def test_original_layout_single_file_changed_honest_and_mixed(tmp_path, capsys):
    """``from_single_file`` loads an original-layout file; verify converts it with diffusers'
    ``convert_ldm_unet_checkpoint`` and compares every tensor (was: 0 compared, exit 0)."""
    unet = _tiny_sd15()
    frozen = [n for n, _ in unet.named_parameters() if "attn1.to_q" in n or "conv_in" in n]
    released, mask = _release(unet, tmp_path, frozen)
    honest = {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}
    changed = dict(honest)
    changed[frozen[0]] = honest[frozen[0]] + 1
    save_file(to_original_layout(changed, 1), str(tmp_path / "changed.safetensors"))
    save_file(to_original_layout(honest, 1), str(tmp_path / "honest.safetensors"))
    save_file({**honest, **{k: v.clone() for k, v in to_original_layout(changed, 1).items()}},
              str(tmp_path / "mixed.safetensors"))

    loaded = diffusers.UNet2DConditionModel.from_single_file(str(tmp_path / "changed.safetensors"), config=str(released))
    assert not torch.equal(_released_params(loaded)[frozen[0]], honest[frozen[0]])
    loaded = diffusers.UNet2DConditionModel.from_single_file(str(tmp_path / "honest.safetensors"), config=str(released))
    assert all(torch.equal(_released_params(loaded)[n], honest[n]) for n in frozen)

    for name in ("changed", "mixed"):
        code, data = _verify(capsys, released, tmp_path / f"{name}.safetensors", mask)
        assert code == 1 and [v["name"].split(" ")[0] for v in data["violations"]] == [frozen[0]], name
    code, data = _verify(capsys, released, tmp_path / "honest.safetensors", mask)
    assert code == 0, data["cannot_verify"][:3]
    assert data["classes"]["compared"] == len(honest) and data["files"][0]["formats"]


# ---------------------------------------------------------------------------------------------
# kohya-format LoRAs


def _peft_lora(model, modules, seed=0):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=modules))
    return get_peft_model_state_dict(model)


def test_kohya_lora_written_by_diffusers_training_scripts(tmp_path, capsys):
    """``--output_kohya_format`` of huggingface/diffusers examples/dreambooth/train_dreambooth_lora_sdxl.py:
    ``save_lora_weights`` -> ``convert_all_state_dict_to_peft`` -> ``convert_state_dict_to_kohya``
    (keys ``lora_unet_down_blocks_0_..._to_q.lora_down.weight`` + ``.alpha``)."""
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya

    unet = _tiny_sd15()
    frozen_module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    released, mask = _release(unet, tmp_path, [f"{frozen_module}.weight"])
    for name, module in (("bad", frozen_module), ("good", frozen_module.replace("to_q", "to_k"))):
        up = tmp_path / name
        diffusers.StableDiffusionPipeline.save_lora_weights(up, unet_lora_layers=_peft_lora(_tiny_sd15(), [module]))
        kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(
            load_file(str(up / "pytorch_lora_weights.safetensors"))))
        (up / "pytorch_lora_weights.safetensors").unlink()
        save_file(kohya, str(up / "pytorch_lora_weights_kohya.safetensors"))
        assert any(k.startswith("lora_unet_down_blocks_0_attentions_0") for k in kohya)
        sd, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(up / "pytorch_lora_weights_kohya.safetensors"))
        target = _tiny_sd15()
        diffusers.StableDiffusionPipeline.load_lora_into_unet(sd, alphas, unet=target)
        target.fuse_lora()
        changed = not torch.equal(_released_params(target)[f"{frozen_module}.weight"],
                                  _released_params(unet)[f"{frozen_module}.weight"])
        code, data = _verify(capsys, released, up, mask)
        assert (code, changed) == ((1, True) if name == "bad" else (0, False)), (name, data["cannot_verify"][:3])
        assert data["files"][0]["formats"] == ["LoRA (diffusers lora_state_dict)"]


def test_old_diffusers_attention_processor_lora(tmp_path, capsys):
    """The attention-processor LoRA layout of diffusers < 0.21 (``attn1.processor.to_q_lora.down.weight``;
    diffusers/utils/state_dict_utils.py UNET_TO_DIFFUSERS still maps it) hangs on ``attn1.to_q``, not on
    the whole ``attn1``: a LoRA on a trainable ``to_k`` beside a frozen ``to_q`` is fine."""
    unet = _tiny_sd15()
    block = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    released, mask = _release(unet, tmp_path, [f"{block}.to_q.weight"])
    for name, proj in (("bad", "to_q"), ("good", "to_k")):
        lora = {f"unet.{block}.processor.{proj}_lora.down.weight": torch.ones(2, 8),
                f"unet.{block}.processor.{proj}_lora.up.weight": torch.ones(8, 2)}
        save_file(lora, str(tmp_path / f"{name}.safetensors"))
        sd, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(tmp_path / f"{name}.safetensors"))
        target = _tiny_sd15()
        diffusers.StableDiffusionPipeline.load_lora_into_unet(sd, alphas, unet=target)
        target.fuse_lora()
        changed = not torch.equal(_released_params(target)[f"{block}.to_q.weight"],
                                  _released_params(unet)[f"{block}.to_q.weight"])
        code, data = _verify(capsys, released, tmp_path / f"{name}.safetensors", mask)
        assert (code, changed) == ((1, True) if name == "bad" else (0, False)), (name, data["lora_violations"][:3])


def _tiny_sdxl(seed=0):
    from freezeguard.integrations.diffusers.models import get_family

    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**get_family("sdxl").tiny_config)


def kohya_sgm_lora(model, modules, rank=2, seed=0) -> dict:
    """A LoRA as kohya-ss/sd-scripts networks/lora.py writes it for SDXL (``LoRANetwork.create_modules``:
    ``lora_name = ("lora_unet." + name + "." + child_name).replace(".", "_")`` over the modules of its
    SGM UNet, library/sdxl_original_unet.py: input_blocks / middle_block / output_blocks), with
    ``lora_down.weight``, ``lora_up.weight`` and ``alpha`` per module. OneTrainer's SDXL LoRA files use
    the same names (Nerogar/OneTrainer modules/util/convert/lora/convert_sdxl_lora.py,
    convert_sdxl_lora_key_sets: "lora_unet" + input_blocks / middle_block / output_blocks)."""
    layout = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module in modules:
        weight = layout[f"{module}.weight"]
        sgm = original_unet_name(f"{module}.weight", layout, model.config.layers_per_block).rsplit(".", 1)[0]
        name = "lora_unet_" + sgm.replace(".", "_")
        out[f"{name}.lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=gen)
        out[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=gen)
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def test_kohya_sdxl_lora_with_original_block_names(tmp_path, capsys):
    """``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``-style keys (was: a note, exit 0)."""
    unet = _tiny_sdxl()
    attn = sorted({n.rsplit(".", 1)[0] for n, _ in unet.named_parameters() if n.endswith("attn1.to_q.weight")})
    frozen_module = attn[0]
    released, mask = _release(unet, tmp_path, [f"{frozen_module}.weight"])
    for name, modules in (("bad", attn), ("good", [m.replace("to_q", "to_k") for m in attn])):
        path = tmp_path / f"{name}.safetensors"
        lora = kohya_sgm_lora(unet, modules)
        assert any("input_blocks" in k for k in lora) and any("output_blocks" in k for k in lora)
        save_file(lora, str(path))
        sd, alphas = diffusers.StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=unet.config)
        target = _tiny_sdxl()
        diffusers.StableDiffusionXLPipeline.load_lora_into_unet(sd, alphas, unet=target)
        target.fuse_lora()
        changed = not torch.equal(_released_params(target)[f"{frozen_module}.weight"],
                                  _released_params(unet)[f"{frozen_module}.weight"])
        code, data = _verify(capsys, released, path, mask)
        assert (code, changed) == ((1, True) if name == "bad" else (0, False)), (name, data["cannot_verify"][:3])
        assert data["classes"]["adapter"] > 0 and data["classes"]["unmapped"] == 0


def _tiny_flux(seed=0):
    from freezeguard.integrations.diffusers.models import get_family

    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(**get_family("flux").tiny_config)


def test_kohya_flux_lora_double_block_qkv(tmp_path, capsys):
    """kohya-ss/sd-scripts networks/lora_flux.py names modules of BFL's Flux
    (``lora_unet_double_blocks_0_img_attn_qkv``: one fused qkv LoRA); diffusers splits it onto
    ``attn.to_q/to_k/to_v`` (``_convert_kohya_flux_lora_to_diffusers``)."""
    model = _tiny_flux()
    frozen = "transformer_blocks.0.attn.to_k.weight"
    released, mask = _release(model, tmp_path, [frozen])
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    gen = torch.Generator().manual_seed(0)
    for name, module in (("bad", "lora_unet_double_blocks_0_img_attn_qkv"), ("good", "lora_unet_double_blocks_0_img_attn_proj")):
        rows = 3 * inner if name == "bad" else inner
        lora = {f"{module}.lora_down.weight": torch.randn(2, inner, generator=gen),
                f"{module}.lora_up.weight": torch.randn(rows, 2, generator=gen), f"{module}.alpha": torch.tensor(2.0)}
        _flux_lora_loaded_and_verified(capsys, tmp_path, name, lora, model, frozen, released, mask)


def test_kohya_flux_lora_with_a_key_the_converter_leaves_is_cannot_verify(tmp_path, capsys):
    model = _tiny_flux()
    released, mask = _release(model, tmp_path, ["transformer_blocks.0.attn.to_k.weight"])
    d = model.config.num_attention_heads * model.config.attention_head_dim
    module = "lora_unet_double_blocks_0_img_attn_proj"
    lora = {f"{module}.lora_down.weight": torch.ones(2, d), f"{module}.lora_up.weight": torch.ones(d, 2),
            f"{module}.alpha": torch.tensor(2.0), "lora_unet_not_a_block.lora_down.weight": torch.ones(2, d),
            "lora_unet_not_a_block.lora_up.weight": torch.ones(d, 2)}
    save_file(lora, str(tmp_path / "f.safetensors"))
    code, data = _verify(capsys, released, tmp_path / "f.safetensors", mask)
    assert code == 2 and {c["key"] for c in data["cannot_verify"]} >= {"lora_unet_not_a_block.lora_down.weight"}


def test_kohya_flux_single_block_lora_at_tiny_size_is_cannot_verify(tmp_path, capsys):
    """diffusers splits a kohya ``single_blocks_N_linear1`` LoRA at the full-size widths (3072 x 3 + 12288),
    so on a tiny Flux it cannot convert it, and neither can verify: exit 2, not a guess."""
    model = _tiny_flux()
    released, mask = _release(model, tmp_path, ["single_transformer_blocks.0.attn.to_q.weight"])
    d = model.config.num_attention_heads * model.config.attention_head_dim
    mlp = model.single_transformer_blocks[0].proj_mlp.out_features
    module = "lora_unet_single_blocks_0_linear1"
    save_file({f"{module}.lora_down.weight": torch.ones(2, d), f"{module}.lora_up.weight": torch.ones(3 * d + mlp, 2),
               f"{module}.alpha": torch.tensor(2.0)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(Exception):  # noqa: B017 - whatever diffusers raises: it cannot load this file
        diffusers.FluxPipeline.lora_state_dict(str(tmp_path / "f.safetensors"))
    code, data = _verify(capsys, released, tmp_path / "f.safetensors", mask)
    assert code == 2 and data["cannot_verify_count"] == 3


def test_xlabs_flux_lora(tmp_path, capsys):
    """XLabs-AI/x-flux names (``double_blocks.N.processor.qkv_lora1.down.weight``; their train_flux_lora
    saves the processors' state dicts); diffusers converts them (``_convert_xlabs_flux_lora_to_diffusers``)."""
    model = _tiny_flux()
    frozen = "transformer_blocks.0.attn.to_k.weight"
    released, mask = _release(model, tmp_path, [frozen])
    d = model.config.num_attention_heads * model.config.attention_head_dim
    gen = torch.Generator().manual_seed(0)
    for name, proc, rows in (("bad", "qkv_lora1", 3 * d), ("good", "proj_lora2", d)):
        lora = {f"double_blocks.0.processor.{proc}.down.weight": torch.randn(2, d, generator=gen),
                f"double_blocks.0.processor.{proc}.up.weight": torch.randn(rows, 2, generator=gen)}
        _flux_lora_loaded_and_verified(capsys, tmp_path, name, lora, model, frozen, released, mask)


def test_comfyui_style_peft_lora_is_cannot_verify(tmp_path, capsys):
    """``diffusion_model.``-prefixed peft keys (ComfyUI's naming): diffusers 0.42.1's Flux loader does not
    convert them, so verify cannot place them either: exit 2, honest or not."""
    model = _tiny_flux()
    released, mask = _release(model, tmp_path, ["transformer_blocks.0.attn.to_k.weight"])
    for module in ("transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"):
        lora = {f"diffusion_model.{module}.lora_A.weight": torch.ones(2, 16),
                f"diffusion_model.{module}.lora_B.weight": torch.ones(16, 2)}
        save_file(lora, str(tmp_path / "c.safetensors"))
        code, data = _verify(capsys, released, tmp_path / "c.safetensors", mask)
        assert code == 2 and {c["key"] for c in data["cannot_verify"]} == set(lora)


# ---------------------------------------------------------------------------------------------
# native LyCORIS files (lycoris-lora from the package index; what SimpleTuner saves)

LYCORIS_ALGOS = [("lora", {}), ("lora", {"dora_wd": True}), ("loha", {}), ("lokr", {}), ("full", {}), ("ia3", {}),
                 ("glora", {}), ("diag-oft", {}), ("boft", {})]


def _lycoris():
    lycoris = pytest.importorskip("lycoris")
    import logging

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    return lycoris


def _trained_lycoris(lycoris, tmp_path, name: str, module: str, algo: str, path, **extra):
    """A LyCORIS network (lycoris' own ``create_lycoris`` with a preset naming one module) on a tiny
    SD-1.5 UNet, its weights moved as if trained, saved to ``path``; returns (network, that UNet)."""
    preset = tmp_path / f"{name}.toml"
    preset.write_text(f'target_module = []\ntarget_name = ["{module}"]\n')
    live = _tiny_sd15()
    net = lycoris.create_lycoris(live, 1.0, linear_dim=2, linear_alpha=1, algo=algo, preset=str(preset), **extra)
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # "trained"
    net.save_weights(str(path), torch.float32, {})
    return net, live


def _merged_by_lycoris(lycoris, path):
    """The user's side: lycoris' own loader, merged into a fresh copy of the released UNet."""
    merged = _tiny_sd15()
    lycoris.create_lycoris_from_weights(1.0, str(path), merged)[0].merge_to()
    return merged


@pytest.mark.parametrize("algo,extra", LYCORIS_ALGOS, ids=[a + ("-dora" if e else "") for a, e in LYCORIS_ALGOS])
def test_lycoris_file_on_a_frozen_module(tmp_path, capsys, algo, extra):
    lycoris = _lycoris()
    unet = _tiny_sd15()
    frozen_module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    released, mask = _release(unet, tmp_path, [f"{frozen_module}.weight"])
    for name, module in (("bad", frozen_module), ("good", frozen_module.replace("to_q", "to_k"))):
        path = tmp_path / f"{name}.safetensors"
        net, live = _trained_lycoris(lycoris, tmp_path, name, module, algo, path, **extra)
        if algo == "ia3":  # lycoris 4.1.3 cannot load its own IA3 files (make_module_from_state_dict's arity)
            net.merge_to()
            merged = live
        else:
            merged = _merged_by_lycoris(lycoris, path)
        changed = not torch.equal(_released_params(merged)[f"{frozen_module}.weight"],
                                  _released_params(unet)[f"{frozen_module}.weight"])
        code, data = _verify(capsys, released, path, mask)
        assert (code, changed) == ((1, True) if name == "bad" else (0, False)), (name, data["cannot_verify"][:3])
        assert data["files"][0]["formats"] == ["lycoris"]


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_kohya_named_lycoris_file(tmp_path, capsys, algo):
    """LyCORIS trained through kohya's sd-scripts (``--network_module lycoris.kohya``) names modules
    ``lora_unet_<path with _>`` (lycoris/kohya.py, LycorisNetworkKohya.LORA_PREFIX_UNET) with the same
    weights as a native file; diffusers' loader rejects LoHa/LoKr keys there, other tools apply them."""
    lycoris = _lycoris()
    unet = _tiny_sd15()
    frozen_module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    released, mask = _release(unet, tmp_path, [f"{frozen_module}.weight"])
    for name, module in (("bad", frozen_module), ("good", frozen_module.replace("to_q", "to_k"))):
        _trained_lycoris(lycoris, tmp_path, name, module, algo, tmp_path / "native.safetensors")
        merged = _merged_by_lycoris(lycoris, tmp_path / "native.safetensors")
        changed = not torch.equal(_released_params(merged)[f"{frozen_module}.weight"],
                                  _released_params(unet)[f"{frozen_module}.weight"])
        kohya = {k.replace("lycoris_", "lora_unet_", 1): v for k, v in load_file(str(tmp_path / "native.safetensors")).items()}
        save_file(kohya, str(tmp_path / f"{name}.safetensors"))
        code, data = _verify(capsys, released, tmp_path / f"{name}.safetensors", mask)
        assert (code, changed) == ((1, True) if name == "bad" else (0, False)), (name, data["cannot_verify"][:3])
        assert "kohya module names" in data["files"][0]["formats"]


def test_kohya_sdxl_file_mixing_naming_schemes(tmp_path, capsys):
    """diffusers drops the SGM-named keys of a kohya file that also has diffusers-named ones
    (``_maybe_map_sgm_blocks_to_diffusers``: "if state_dict contains both patterns, remove sgm"); kohya's
    own tools apply them. A converter dropping a key does not make it safe: the SGM keys on a frozen
    module are found."""
    unet = _tiny_sdxl()
    attn = sorted({n.rsplit(".", 1)[0] for n, _ in unet.named_parameters() if n.endswith("attn1.to_q.weight")})
    released, mask = _release(unet, tmp_path, [f"{m}.weight" for m in attn])
    honest = {k.replace(original_unet_name(f"{m.replace('to_q', 'to_k')}.weight", dict(unet.named_parameters()), 1)
                        .rsplit(".", 1)[0].replace(".", "_"), m.replace("to_q", "to_k").replace(".", "_")): v
              for m in attn for k, v in kohya_sgm_lora(unet, [m.replace("to_q", "to_k")]).items()}
    assert all(k.startswith("lora_unet_down_blocks_") or k.startswith(("lora_unet_up_blocks_", "lora_unet_mid_block"))
               for k in honest)
    hidden = kohya_sgm_lora(unet, attn, seed=1)  # SGM names, on the frozen to_q modules
    save_file(honest, str(tmp_path / "honest.safetensors"))
    save_file({**honest, **hidden}, str(tmp_path / "mixed.safetensors"))
    sd, _ = diffusers.StableDiffusionXLPipeline.lora_state_dict(str(tmp_path / "mixed.safetensors"),
                                                                unet_config=unet.config)
    assert not any("to_q" in k for k in sd)  # diffusers silently dropped them
    assert _verify(capsys, released, tmp_path / "honest.safetensors", mask)[0] == 0
    code, data = _verify(capsys, released, tmp_path / "mixed.safetensors", mask)
    assert code == 1 and {v["frozen"] for v in data["lora_violations"]} == {f"{m}.weight" for m in attn}


# ---------------------------------------------------------------------------------------------
# full size, on the meta device: every key of an original-layout file or a kohya LoRA is mapped


def _full(family):
    from freezeguard.integrations.diffusers.models import get_family

    model = get_family(family).build("full", device="meta")
    return model, {n: p for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_full_size_original_layout_maps_every_tensor(family):
    from freezeguard.core.formats import convert_foreign, family_of

    model, state = _full(family)
    layout = {n: tuple(p.shape) for n, p in state.items()}
    original = to_original_layout(state, model.config.layers_per_block)
    readings, left, problems = convert_foreign(list(original), original, family_of(layout), layout)
    assert left == [] and problems == [] and len(readings) == 1
    converted = readings[0][1]
    assert {k: tuple(v.shape) for k, v in converted.items()} == layout  # every released tensor, once


def _lora_pair(name, weight, rank=1):
    if weight.dim() == 4:
        down, up = torch.zeros(rank, weight.shape[1], *weight.shape[2:]), torch.zeros(weight.shape[0], rank, 1, 1)
    else:
        down, up = torch.zeros(rank, weight.shape[1]), torch.zeros(weight.shape[0], rank)
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_full_size_kohya_lora_on_every_layer_maps_to_its_module(family):
    """kohya's LoRA with ``conv_dim`` targets every Linear/Conv2d of Transformer2DModel and
    ResnetBlock2D/Downsample2D/Upsample2D (sd-scripts networks/lora.py, UNET_TARGET_REPLACE_MODULE
    + UNET_TARGET_REPLACE_MODULE_CONV2D_3X3); SD-1.x names follow diffusers' modules, SDXL's the SGM ones."""
    from freezeguard.core.adapter_rule import AdapterRule
    from freezeguard.core.formats import convert_foreign, family_of

    model, state = _full(family)
    layout = {n: tuple(p.shape) for n, p in state.items()}
    lpb = model.config.layers_per_block
    modules = {n.rsplit(".", 1)[0]: p for n, p in state.items() if n.endswith(".weight") and p.dim() in (2, 4)
               and n.startswith(("down_blocks", "mid_block", "up_blocks")) and "norm" not in n}
    lora, expect = {}, {}
    for module, weight in modules.items():
        path = original_unet_name(f"{module}.weight", layout, lpb).rsplit(".", 1)[0] if family == "sdxl" else module
        name = "lora_unet_" + path.replace(".", "_")
        lora.update(_lora_pair(name, weight))
        expect[name] = module
    readings, left, problems = convert_foreign(list(lora), lora, family_of(layout), layout)
    assert left == [] and problems == []
    rule = AdapterRule(fg.FreezeMask(layout, []))
    targets = {rule.target(k.removeprefix("unet.")) for k in readings[0][1]}
    assert targets == set(modules)


def test_full_size_kohya_flux_lora_maps_to_its_modules():
    """kohya-ss/sd-scripts networks/lora_flux.py names the Linear layers of BFL's Flux
    (flux/model.py: double_blocks.N.{img,txt}_{attn.qkv,attn.proj,mlp.0,mlp.2,mod.lin},
    single_blocks.N.{linear1,linear2,modulation.lin}); diffusers splits qkv and linear1 with the
    full-size widths (3072, 12288) wired into _convert_kohya_flux_lora_to_diffusers."""
    from freezeguard.core.adapter_rule import AdapterRule
    from freezeguard.core.formats import convert_foreign, family_of

    model, state = _full("flux")
    layout = {n: tuple(p.shape) for n, p in state.items()}
    d, mlp = 3072, 12288
    shapes = {"img_attn_qkv": (3 * d, d), "img_attn_proj": (d, d), "img_mlp_0": (mlp, d), "img_mlp_2": (d, mlp),
              "img_mod_lin": (6 * d, d)}
    shapes.update({k.replace("img", "txt"): v for k, v in shapes.items()})
    single = {"linear1": (3 * d + mlp, d), "linear2": (d, d + mlp), "modulation_lin": (3 * d, d)}
    lora = {}
    for i in range(model.config.num_layers):
        for part, shape in shapes.items():
            lora.update(_lora_pair(f"lora_unet_double_blocks_{i}_{part}", torch.empty(shape, device="meta")))
    for i in range(model.config.num_single_layers):
        for part, shape in single.items():
            lora.update(_lora_pair(f"lora_unet_single_blocks_{i}_{part}", torch.empty(shape, device="meta")))
    readings, left, problems = convert_foreign(list(lora), lora, family_of(layout), layout)
    assert left == [] and problems == []
    rule = AdapterRule(fg.FreezeMask(layout, []))
    targets = {rule.target(k.removeprefix("transformer.")) for k in readings[0][1]}
    assert None not in targets
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.18.ff_context.net.2",
            "single_transformer_blocks.37.proj_mlp", "single_transformer_blocks.37.norm.linear"} <= targets


def bfl_flux_layout(layout) -> dict[str, tuple[int, ...]]:
    """name -> shape of BFL's original Flux checkpoint (black-forest-labs/flux src/flux/model.py,
    what flux1-dev.safetensors holds), derived from the diffusers layout: fused qkv, linear1 =
    qkv + mlp, the ``*_in`` embedders and ``final_layer``."""
    d = layout["transformer_blocks.0.attn.to_q.weight"][1]
    mlp = layout["single_transformer_blocks.0.proj_mlp.weight"][0]
    out = {}

    def linear(name, diffusers, rows=None):
        w = layout[f"{diffusers}.weight"]
        out[f"{name}.weight"] = (rows or w[0],) + tuple(w[1:])
        out[f"{name}.bias"] = (rows or w[0],)
    for bfl, hf in (("time_in", "time_text_embed.timestep_embedder"), ("vector_in", "time_text_embed.text_embedder"),
                    ("guidance_in", "time_text_embed.guidance_embedder")):
        linear(f"{bfl}.in_layer", f"{hf}.linear_1")
        linear(f"{bfl}.out_layer", f"{hf}.linear_2")
    linear("txt_in", "context_embedder")
    linear("img_in", "x_embedder")
    linear("final_layer.linear", "proj_out")
    linear("final_layer.adaLN_modulation.1", "norm_out.linear")
    for i in range(sum(1 for n in layout if n.startswith("transformer_blocks.") and n.endswith("attn.to_q.weight"))):
        b, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for side, mod, attn, ff in (("img", "norm1", ("to_q", "to_out.0", "norm_q", "norm_k"), "ff"),
                                    ("txt", "norm1_context", ("add_q_proj", "to_add_out", "norm_added_q",
                                                              "norm_added_k"), "ff_context")):
            linear(f"{b}.{side}_mod.lin", f"{t}.{mod}.linear")
            linear(f"{b}.{side}_attn.qkv", f"{t}.attn.{attn[0]}", rows=3 * d)
            linear(f"{b}.{side}_attn.proj", f"{t}.attn.{attn[1]}")
            out[f"{b}.{side}_attn.norm.query_norm.scale"] = layout[f"{t}.attn.{attn[2]}.weight"]
            out[f"{b}.{side}_attn.norm.key_norm.scale"] = layout[f"{t}.attn.{attn[3]}.weight"]
            linear(f"{b}.{side}_mlp.0", f"{t}.{ff}.net.0.proj")
            linear(f"{b}.{side}_mlp.2", f"{t}.{ff}.net.2")
    for i in range(sum(1 for n in layout if n.startswith("single_transformer_blocks.") and n.endswith("proj_mlp.weight"))):
        b, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        linear(f"{b}.modulation.lin", f"{t}.norm.linear")
        linear(f"{b}.linear1", f"{t}.attn.to_q", rows=3 * d + mlp)
        linear(f"{b}.linear2", f"{t}.proj_out")
        out[f"{b}.norm.query_norm.scale"] = layout[f"{t}.attn.norm_q.weight"]
        out[f"{b}.norm.key_norm.scale"] = layout[f"{t}.attn.norm_k.weight"]
    return out


def test_full_size_bfl_flux_single_file_maps_every_tensor():
    """A full-size BFL Flux file (meta tensors) through diffusers' convert_flux_transformer_checkpoint_to_diffusers
    (it hard-wires the full widths): every released tensor comes out once, with its shape."""
    from freezeguard.core.formats import convert_foreign, family_of

    _, state = _full("flux")
    layout = {n: tuple(p.shape) for n, p in state.items()}
    original = {k: torch.empty(s, device="meta") for k, s in bfl_flux_layout(layout).items()}
    readings, left, problems = convert_foreign(list(original), original, family_of(layout), layout)
    assert left == [] and problems == [] and len(readings) == 1
    assert {k: tuple(v.shape) for k, v in readings[0][1].items()} == layout


def sai_sd3_layout(layout, config) -> dict[str, tuple[int, ...]]:
    """name -> shape of Stability AI's original SD3 checkpoint (sd3_medium*.safetensors, MMDiT names under
    ``model.diffusion_model.``: joint_blocks.N.{x,context}_block with fused qkv), from the diffusers layout,
    as diffusers' convert_sd3_transformer_checkpoint_to_diffusers reads it."""
    out = {"pos_embed": (1, config.pos_embed_max_size ** 2, layout["pos_embed.proj.weight"][0])}

    def linear(name, hf, rows=None):
        w = layout[f"{hf}.weight"]
        out[f"{name}.weight"] = (rows or w[0],) + tuple(w[1:])
        out[f"{name}.bias"] = (rows or w[0],)
    linear("x_embedder.proj", "pos_embed.proj")
    linear("context_embedder", "context_embedder")
    for sai, hf in (("t_embedder", "time_text_embed.timestep_embedder"), ("y_embedder", "time_text_embed.text_embedder")):
        linear(f"{sai}.mlp.0", f"{hf}.linear_1")
        linear(f"{sai}.mlp.2", f"{hf}.linear_2")
    linear("final_layer.linear", "proj_out")
    linear("final_layer.adaLN_modulation.1", "norm_out.linear")
    for i in range(config.num_layers):
        b, t = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        d = layout[f"{t}.attn.to_q.weight"][0]
        linear(f"{b}.x_block.attn.qkv", f"{t}.attn.to_q", rows=3 * d)
        linear(f"{b}.x_block.attn.proj", f"{t}.attn.to_out.0")
        linear(f"{b}.x_block.adaLN_modulation.1", f"{t}.norm1.linear")
        linear(f"{b}.x_block.mlp.fc1", f"{t}.ff.net.0.proj")
        linear(f"{b}.x_block.mlp.fc2", f"{t}.ff.net.2")
        linear(f"{b}.context_block.attn.qkv", f"{t}.attn.add_q_proj", rows=3 * d)
        linear(f"{b}.context_block.adaLN_modulation.1", f"{t}.norm1_context.linear")
        if f"{t}.attn.to_add_out.weight" in layout:  # the last block's context stream ends before attention
            linear(f"{b}.context_block.attn.proj", f"{t}.attn.to_add_out")
            linear(f"{b}.context_block.mlp.fc1", f"{t}.ff_context.net.0.proj")
            linear(f"{b}.context_block.mlp.fc2", f"{t}.ff_context.net.2")
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def test_full_size_sai_sd3_single_file_maps_every_tensor():
    """A full-size original SD3 file (meta tensors) through convert_sd3_transformer_checkpoint_to_diffusers:
    every released tensor comes out once with its shape, plus the positional-embedding buffer."""
    from freezeguard.core.formats import convert_foreign, family_of

    model, state = _full("sd3")
    layout = {n: tuple(p.shape) for n, p in state.items()}
    original = {k: torch.empty(s, device="meta") for k, s in sai_sd3_layout(layout, model.config).items()}
    readings, left, problems = convert_foreign(list(original), original, family_of(layout), layout)
    assert left == [] and problems == [] and len(readings) == 1
    converted = {k: tuple(v.shape) for k, v in readings[0][1].items()}
    assert converted.pop("pos_embed.pos_embed") == original["model.diffusion_model.pos_embed"].shape
    assert converted == layout


def test_original_checkpoint_with_ema_copy_and_schedule(tmp_path, capsys):
    """An original (CompVis ldm) checkpoint also holds the EMA copy (ldm/modules/ema.py, LitEma: buffers
    ``model_ema.<parameter name without dots>``, plus ``decay`` / ``num_updates``) and the DDPM schedule
    (ldm/models/diffusion/ddpm.py, register_schedule: ``betas``, ``alphas_cumprod``...).
    ``from_single_file(..., extract_ema=True)`` loads the EMA copy: it is compared too."""
    unet = _tiny_sd15()
    frozen = [n for n, _ in unet.named_parameters() if "attn1.to_q" in n]
    released, mask = _release(unet, tmp_path, frozen)
    honest = {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}
    main_keys = to_original_layout(honest, 1)
    schedule = {n: torch.linspace(0, 1, 10) for n in ("betas", "alphas_cumprod", "alphas_cumprod_prev",
                                                        "posterior_variance")}
    bookkeeping = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)}

    def ema(state):  # LitEma names the shadow of model.diffusion_model.X as model_ema.diffusion_modelX (no dots)
        return {"model_ema." + k.removeprefix("model.").replace(".", ""): v.clone() for k, v in state.items()}
    changed_ema = ema(main_keys)
    key = "model_ema." + next(k for k in main_keys if "attn1.to_q" in k).removeprefix("model.").replace(".", "")
    changed_ema[key] = changed_ema[key] + 1
    for name, shadow in (("honest", ema(main_keys)), ("tampered", changed_ema)):
        path = tmp_path / f"{name}.safetensors"
        save_file({**{k: v.clone() for k, v in main_keys.items()}, **shadow, **schedule, **bookkeeping}, str(path))
        loaded = diffusers.UNet2DConditionModel.from_single_file(str(path), config=str(released), extract_ema=True)
        differs = not all(torch.equal(_released_params(loaded)[n], honest[n]) for n in frozen)
        code, data = _verify(capsys, released, path, mask)
        assert (code, differs) == ((0, False) if name == "honest" else (1, True)), (name, data["cannot_verify"][:3])
        assert data["parts"] == {"scheduler": 4, "ema": 2}
