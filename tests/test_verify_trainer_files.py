"""verify on the adapter files ai-toolkit and OneTrainer write to disk (issue 25, item 3).

The key names are those of the tools' savers, read from their repositories (cited per test; no
code copied); weights are random stand-ins of the right shapes. Each file is audited on a frozen
module (tampered: exit 1) and on a trainable one (honest: exit 0).
"""
from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from support.tiny_models import build_tiny_unet
from test_verify_formats import _tiny_sdxl, original_unet_name

import freezeguard as fg
from freezeguard.cli import main

pytest.importorskip("diffusers")

FROZEN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
FROZEN_CONV = "down_blocks.0.resnets.0.conv1"
TRAINABLE = {FROZEN: FROZEN.replace("to_q", "to_k"), FROZEN_CONV: "down_blocks.0.resnets.0.conv2"}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("release")
    unet = build_tiny_unet(seed=0, cross_attention_dim=8)
    unet.save_pretrained(tmp / "released")
    mask = fg.FreezeMask.from_names(unet, [f"{FROZEN}.weight", f"{FROZEN_CONV}.weight"])
    mask.save(tmp / "mask.safetensors", unet)
    return unet, tmp / "released", tmp / "mask.safetensors"


def _verify(capsys, release, state, path):
    save_file(state, str(path))
    _, released, mask = release
    code = main(["verify", "--released", str(released), "--mask", str(mask), "--finetuned", str(path), "--json"])
    return code, json.loads(capsys.readouterr().out)


def _weight(unet, module):
    return unet.get_submodule(module).weight


# ai-toolkit, old LoKr format ---------------------------------------------------------------------
def _balanced_factors(dim: int) -> tuple[int, int]:
    """(m, n), m <= n, m * n == dim, m the largest divisor up to sqrt(dim): what ai-toolkit's
    ``factorization(dim, factor=-1)`` returns (its docstring: 128 -> 8, 16; 250 -> 2, 125)."""
    m = max(d for d in range(1, int(dim ** 0.5) + 1) if dim % d == 0)
    return m, dim // m


def aitoolkit_old_lokr(unet, module: str, prefix: str, rank: int = 2) -> dict:
    """A LoKr file as ostris/ai-toolkit writes it (commit 27a03a91f23e, 2026-08-21), Linear layers.

    toolkit/lora_special.py, LoRASpecialNetwork.__init__ / create_modules: for a UNet the module
    name is ``lora_unet`` + the module path, dots -> ``_``; toolkit/network_mixins.py,
    ToolkitNetworkMixin.get_state_dict: with ``old_lokr_format`` on a transformer model
    ``lora_transformer_`` becomes ``lycoris_``. toolkit/models/lokr.py, LokrModule.__init__ (defaults:
    factor -1, decompose_both False): out = (a, b), in = (c, d) by ``factorization``; ``lokr_w1`` (a, c);
    ``lokr_w2`` (b, d) when rank >= max(b, d) / 2, else ``lokr_w2_a`` (b, rank) and ``lokr_w2_b``
    (rank, d); buffer ``alpha``.
    """
    weight = _weight(unet, module)
    (a, b), (c, d) = _balanced_factors(weight.shape[0]), _balanced_factors(weight.shape[1])
    name = prefix + module.replace(".", "_")
    gen = torch.Generator().manual_seed(0)
    out = {f"{name}.lokr_w1": torch.randn(a, c, generator=gen), f"{name}.alpha": torch.tensor(float(rank))}
    if rank >= max(b, d) / 2:
        out[f"{name}.lokr_w2"] = torch.randn(b, d, generator=gen)
    else:
        out[f"{name}.lokr_w2_a"] = torch.randn(b, rank, generator=gen)
        out[f"{name}.lokr_w2_b"] = torch.randn(rank, d, generator=gen)
    return out


@pytest.mark.parametrize("rank", [1, 2])  # 8x8 layers: rank 1 -> lokr_w2_a/_b, rank 2 -> lokr_w2
@pytest.mark.parametrize("prefix", ["lora_unet_", "lycoris_"])
def test_aitoolkit_old_lokr_file(release, tmp_path, capsys, prefix, rank):
    unet = release[0]
    bad = aitoolkit_old_lokr(unet, FROZEN, prefix, rank)
    assert any(k.endswith(".lokr_w2" if rank == 2 else ".lokr_w2_a") for k in bad)
    code, data = _verify(capsys, release, bad, tmp_path / "bad.safetensors")
    assert code == 1 and {v["frozen"] for v in data["lora_violations"]} == {f"{FROZEN}.weight"}
    if prefix == "lycoris_" and rank == 2 and importlib.util.find_spec("lycoris"):
        # a loader applies it: lycoris-lora's own loader merges the file into the frozen layer
        import lycoris

        logging.getLogger("LyCORIS").setLevel(logging.ERROR)
        merged = build_tiny_unet(seed=0, cross_attention_dim=8)
        lycoris.create_lycoris_from_weights(1.0, str(tmp_path / "bad.safetensors"), merged)[0].merge_to()
        assert not torch.equal(_weight(merged, FROZEN), _weight(unet, FROZEN))
    good = aitoolkit_old_lokr(unet, TRAINABLE[FROZEN], prefix, rank)
    code, data = _verify(capsys, release, good, tmp_path / "good.safetensors")
    assert code == 0 and data["classes"]["adapter"] == len(good) and data["classes"]["unmapped"] == 0, \
        data["cannot_verify"]


# OneTrainer ---------------------------------------------------------------------------------------
def onetrainer_lora(unet, module: str, layout: str, rank: int = 2) -> dict:
    """The LoRA file OneTrainer's saver writes for an SD-1.x UNet module, per output format.

    Nerogar/OneTrainer (commit 23df3832e8f2, 2026-08-19), modules/modelSaver/mixin/LoRASaverMixin.py:
    the in-memory keys are ``unet.<diffusers path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
    (modules/modelSetup/StableDiffusionLoRASetup.py: LoRAModuleWrapper(model.unet, "unet", ...));
    ``_save_legacy`` (the default: TrainConfig migrates ``SAFETENSORS`` to ``LEGACY_LORA``) and
    ``_save_kohya`` flatten them (modules/util/convert_lora_util.py, kohya_flatten, lora_kohya_conversion:
    ``lora_unet_<path with _>``); ``_save_diffusers`` (convert_to_diffusers) renames to ``lora_A`` /
    ``lora_B`` with alpha folded; ``_save_internal`` keeps them raw; ``_save_original`` /
    ``_save_comfy`` rename the module to the original SGM layout (StableDiffusionModel.diffusers_to_original)
    with no prefix / ``diffusion_model.``, ``lora_A``/``lora_B`` and ``alpha``. Before July 2026
    (commit de1437cb^, modules/util/convert/lora/convert_lora_util.py, convert_to_omi with
    convert_sd_lora.py's ``LoraConversionKeySet("unet", "lora_unet")``) the OMI / INTERNAL saves held
    ``unet.<SGM path>.lora_down.weight``.
    """
    weight = _weight(unet, module)
    gen = torch.Generator().manual_seed(0)
    down = torch.randn(rank, *weight.shape[1:], generator=gen) if weight.ndim == 2 else \
        torch.randn(rank, weight.shape[1], *weight.shape[2:], generator=gen)
    up = torch.randn(weight.shape[0], rank, *([1, 1] if weight.ndim == 4 else []), generator=gen)
    alpha = torch.tensor(float(rank))
    params = dict(unet.named_parameters())
    sgm = original_unet_name(f"{module}.weight", params, unet.config.layers_per_block).rsplit(".", 1)[0]
    if layout in ("legacy", "kohya"):
        flat = "lora_unet_" + module.replace(".", "_")
        return {f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up, f"{flat}.alpha": alpha}
    if layout == "diffusers":
        return {f"unet.{module}.lora_A.weight": down, f"unet.{module}.lora_B.weight": up}
    if layout == "internal":
        return {f"unet.{module}.lora_down.weight": down, f"unet.{module}.lora_up.weight": up, f"unet.{module}.alpha": alpha}
    head = {"original": "", "comfy": "diffusion_model.", "omi": "unet."}[layout]
    a, b = ("lora_down", "lora_up") if layout == "omi" else ("lora_A", "lora_B")
    return {f"{head}{sgm}.{a}.weight": down, f"{head}{sgm}.{b}.weight": up, f"{head}{sgm}.alpha": alpha}


@pytest.mark.parametrize("layout", ["legacy", "diffusers", "internal", "original", "comfy", "omi"])
def test_onetrainer_lora_file(release, tmp_path, capsys, layout):
    unet = release[0]
    for module in (FROZEN, FROZEN_CONV):
        code, data = _verify(capsys, release, onetrainer_lora(unet, module, layout), tmp_path / "bad.safetensors")
        assert code == 1, (layout, module, data["cannot_verify"][:3])
        assert {v["frozen"] for v in data["lora_violations"]} == {f"{module}.weight"}
        code, data = _verify(capsys, release, onetrainer_lora(unet, TRAINABLE[module], layout),
                             tmp_path / "good.safetensors")
        assert code == 0 and data["classes"]["unmapped"] == 0, (layout, module, data["cannot_verify"][:3])
        assert data["classes"]["adapter"] > 0


def test_onetrainer_original_names_that_are_no_lora_are_not_ok(release, tmp_path, capsys):
    """Only LoRA suffixes are renamed: a bare SGM weight (a full tensor under original names, with no
    ``model.diffusion_model.`` single-file prefix) stays unmapped (exit 2); so does a LoRA on a
    sub-module the release lacks (transformer block 7 of a one-block model): no loader applies it to
    the container above, so it is not accounted for (core.adapter_rule: only a module that owns a
    released tensor can carry an adapter)."""
    cases = (({"input_blocks.1.1.proj_in.weight": torch.ones(8, 8)}, 2),
             ({"input_blocks.1.1.transformer_blocks.7.attn1.to_q.lora_A.weight": torch.ones(2, 8),
               "input_blocks.1.1.transformer_blocks.7.attn1.to_q.lora_B.weight": torch.ones(8, 2)}, 2))
    for state, code_wanted in cases:
        code, data = _verify(capsys, release, state, tmp_path / "x.safetensors")
        assert code == code_wanted, (list(state), data["cannot_verify"][:3], data["lora_violations"][:3])


@pytest.mark.parametrize("layout", ["original", "comfy"])
def test_onetrainer_sdxl_original_layout_lora(tmp_path, capsys, layout):
    """SDXL: OneTrainer's ORIGINAL / COMFY names (StableDiffusionXLModel.diffusers_to_original, the SGM
    input_blocks / output_blocks of kohya's SDXL) on a frozen attention layer and on a trainable one."""
    unet = _tiny_sdxl()
    attn = sorted({n.rsplit(".", 1)[0] for n, _ in unet.named_parameters() if n.endswith("attn1.to_q.weight")})
    unet.save_pretrained(tmp_path / "released")
    mask = fg.FreezeMask.from_names(unet, [f"{m}.weight" for m in attn])
    mask.save(tmp_path / "mask.safetensors", unet)
    release = (unet, tmp_path / "released", tmp_path / "mask.safetensors")
    for name, modules in (("bad", attn), ("good", [m.replace("to_q", "to_k") for m in attn])):
        state = {k: v for m in modules for k, v in onetrainer_lora(unet, m, layout).items()}
        assert any("output_blocks" in k for k in state) and any("input_blocks" in k for k in state)
        code, data = _verify(capsys, release, state, tmp_path / f"{name}.safetensors")
        if name == "bad":
            assert code == 1 and {v["frozen"] for v in data["lora_violations"]} == {f"{m}.weight" for m in attn}
        else:
            assert code == 0 and data["classes"]["unmapped"] == 0, data["cannot_verify"][:3]


def test_onetrainer_default_file_changes_the_frozen_layer_when_loaded(release, tmp_path, capsys):
    """The loader side of the default (LEGACY = kohya names) file: diffusers' ``load_lora_weights``
    path (``lora_state_dict`` + ``load_lora_into_unet`` + ``fuse_lora``) changes the frozen weight
    verify flags."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    unet = release[0]
    path = tmp_path / "legacy.safetensors"
    save_file(onetrainer_lora(unet, FROZEN, "legacy"), str(path))
    sd, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(path), unet_config=unet.config)
    target = build_tiny_unet(seed=0, cross_attention_dim=8)
    diffusers.StableDiffusionPipeline.load_lora_into_unet(sd, alphas, unet=target)
    target.fuse_lora()
    assert not torch.equal(_weight(target, FROZEN).detach(), _weight(unet, FROZEN).detach())
    assert _verify(capsys, release, onetrainer_lora(unet, FROZEN, "legacy"), path)[0] == 1
