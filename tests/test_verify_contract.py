"""verify fails closed (issue 25): every key of an upload is accounted for, or the answer is exit 2.

Each test builds the upload the way the tool that writes it lays it out (diffusers ``save_pretrained``
/ ``save_lora_weights``, peft ``save_pretrained``), shows where it matters that the real loader
changes a frozen tensor, and checks that ``freezeguard verify`` exits 1 or 2 while the honest
twin exits 0.
"""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.tiny_models import build_tiny_sd_pipeline, build_tiny_unet

import freezeguard as fg
from freezeguard.cli import main
from freezeguard.core.mask_files import FreezeMaskFileError
from freezeguard.core.names import canonical_name

diffusers = pytest.importorskip("diffusers")


def _unet(seed=0):
    return build_tiny_unet(seed=seed, cross_attention_dim=8)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A released tiny UNet folder, a mask bound to it (content hash), and its state dict."""
    root = tmp_path_factory.mktemp("release")
    unet = _unet()
    unet.save_pretrained(root / "released")
    mask = fg.FreezeMask.random(unet, 0.3, seed=0)
    mask.save(root / "mask.safetensors", unet)
    sd = {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}
    return root, mask, sd


def _verify(capsys, release, upload, *extra):
    root, _, _ = release
    code = main(["verify", "--released", str(root / "released"), "--mask", str(root / "mask.safetensors"),
                 "--finetuned", str(upload), "--json", *map(str, extra)])
    out = capsys.readouterr().out
    return code, json.loads(out)


def _released_params(model):
    """name -> parameter under released names (peft's ``base_layer`` dropped after a fuse)."""
    return {canonical_name(n): p for n, p in model.named_parameters()}


def _frozen_weight(mask):
    return next(n for n in mask.frozen_names if n.endswith(".weight") and "to_" in n)


def _trainable_linear(mask):
    frozen_modules = {n.rsplit(".", 1)[0] for n in mask.frozen_names}
    return next(n.rsplit(".", 1)[0] for n in mask.trainable_names
                if n.endswith("to_k.weight") and n.rsplit(".", 1)[0] not in frozen_modules)


# ---------------------------------------------------------------------------------------------
# the contract: classes of keys, three outcomes


def test_honest_full_model_is_ok_and_every_key_is_classed(release, tmp_path, capsys):
    _, mask, sd = release
    save_file(sd, str(tmp_path / "ft.safetensors"))
    code, data = _verify(capsys, release, tmp_path / "ft.safetensors")
    assert code == 0 and data["status"] == "ok" and data["exit_code"] == 0
    assert data["classes"]["compared"] == len(sd) and data["classes"]["compared_frozen"] == len(mask.frozen_names)
    assert data["classes"]["unmapped"] == 0 and data["cannot_verify"] == []
    assert data["files"] == [{"path": "ft.safetensors", "part": "denoiser", "keys": len(sd), "formats": []}]


@pytest.mark.parametrize("prefix", ["diffusion_model.", "model.", "UNET.", "model.diffusion_model."])
def test_unknown_prefixes_are_cannot_verify_even_beside_honest_copies(release, tmp_path, capsys, prefix):
    """Renamed changed copies of every frozen tensor: alone (was exit 0, "0 compared") and mixed
    into an honest file (was a clean report). Nobody maps these names: exit 2, keys listed."""
    _, mask, sd = release
    renamed = {prefix + n: sd[n] + 1 for n in mask.frozen_names}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    save_file({**sd, **renamed}, str(tmp_path / "mixed.safetensors"))
    for name in ("renamed", "mixed"):
        code, data = _verify(capsys, release, tmp_path / f"{name}.safetensors")
        assert code == 2 and data["status"] == "cannot_verify", name
        assert {c["key"] for c in data["cannot_verify"]} == set(renamed)
        assert data["classes"]["unmapped"] == len(renamed)


def test_wrapper_prefixed_changed_copy_beside_an_honest_one_is_a_violation(release, tmp_path, capsys):
    """``module.`` (DDP) maps to the released name: both copies are compared, the changed one flagged."""
    _, mask, sd = release
    frozen = _frozen_weight(mask)
    save_file({**sd, "module." + frozen: sd[frozen] + 1}, str(tmp_path / "ft.safetensors"))
    code, data = _verify(capsys, release, tmp_path / "ft.safetensors")
    assert code == 1 and [v["name"] for v in data["violations"]] == [f"{frozen} (module.{frozen})"]


def test_many_junk_keys_are_cannot_verify(release, tmp_path, capsys):
    _, _, sd = release
    junk = {f"junk_{i}": torch.zeros(()) for i in range(20_000)}
    save_file({**sd, **junk}, str(tmp_path / "ft.safetensors"))
    code, data = _verify(capsys, release, tmp_path / "ft.safetensors")
    assert code == 2 and data["cannot_verify_count"] == len(junk) and len(data["cannot_verify"]) == 1000


def test_adapter_of_any_type_on_a_frozen_module_is_a_violation(release, tmp_path, capsys):
    """No list of tuner names: a key under a released module is an adapter of that module."""
    _, mask, sd = release
    frozen_module = _frozen_weight(mask).rsplit(".", 1)[0]
    trainable = _trainable_linear(mask)
    save_file({f"{trainable}.some_new_tuner.weight": torch.ones(2)}, str(tmp_path / "ok.safetensors"))
    code, data = _verify(capsys, release, tmp_path / "ok.safetensors")
    assert code == 0 and data["classes"]["adapter"] == 1 and data["missing"]
    save_file({f"{frozen_module}.some_new_tuner.weight": torch.ones(2)}, str(tmp_path / "bad.safetensors"))
    code, data = _verify(capsys, release, tmp_path / "bad.safetensors")
    assert code == 1 and {v["frozen"] for v in data["lora_violations"]} >= {_frozen_weight(mask)}


def test_other_pipeline_parts_are_counted_per_part(release, tmp_path, capsys):
    _, _, sd = release
    save_file({**{f"unet.{k}": v for k, v in sd.items()}, "text_encoder.x.weight": torch.ones(1),
               "vae.decoder.y.weight": torch.ones(1)}, str(tmp_path / "ft.safetensors"))
    code, data = _verify(capsys, release, tmp_path / "ft.safetensors")
    assert code == 0 and data["parts"] == {"text_encoder": 1, "vae": 1} and data["classes"]["other_part"] == 2


def test_full_model_without_a_frozen_tensor_is_cannot_verify(release, tmp_path, capsys):
    _, mask, sd = release
    frozen = _frozen_weight(mask)
    save_file({k: v for k, v in sd.items() if k != frozen}, str(tmp_path / "ft.safetensors"))
    code, data = _verify(capsys, release, tmp_path / "ft.safetensors")
    assert code == 2 and frozen in data["cannot_verify"][0]["reason"]


# ---------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.uint8, torch.int32, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
def test_integer_bool_and_fp8_frozen_tensors_cannot_be_verified(release, tmp_path, capsys, dtype):
    _, mask, sd = release
    ft = dict(sd)
    frozen = _frozen_weight(mask)
    ft[frozen] = sd[frozen].to(dtype)
    save_file(ft, str(tmp_path / "ft.safetensors"))
    code, data = _verify(capsys, release, tmp_path / "ft.safetensors", "--allow-lower-precision", "fp16,bf16")
    assert code == 2 and data["cannot_verify"][0]["key"] == frozen
    assert "cannot be shown equal" in data["cannot_verify"][0]["reason"]


def test_quantized_parts_of_a_frozen_tensor_cannot_be_verified(release, tmp_path, capsys):
    """optimum-quanto serialises a quantized weight as ``<name>._data`` + ``<name>._scale``
    (optimum/quanto/tensor/weights/qbytes.py, WeightQBytesTensor.__tensor_flatten__)."""
    _, mask, sd = release
    frozen = _frozen_weight(mask)
    ft = {k: v for k, v in sd.items() if k != frozen}
    ft[f"{frozen}._data"] = sd[frozen].to(torch.int8)
    ft[f"{frozen}._scale"] = torch.ones(sd[frozen].shape[0], 1)
    save_file(ft, str(tmp_path / "ft.safetensors"))
    code, data = _verify(capsys, release, tmp_path / "ft.safetensors")
    assert code == 2 and {c["key"] for c in data["cannot_verify"]} >= {f"{frozen}._data", f"{frozen}._scale"}


def test_lower_precision_only_when_named_with_double_rounding(release, tmp_path, capsys):
    """A bf16 run saved in fp16 holds fp16(bf16(x)), not fp16(x): it passes with fp16,bf16 named."""
    _, _, sd = release
    plain = {k: v.half() for k, v in sd.items()}
    double = {k: v.bfloat16().half() for k, v in sd.items()}
    assert any(not torch.equal(plain[k], double[k]) for k in sd)
    save_file(plain, str(tmp_path / "fp16.safetensors"))
    save_file(double, str(tmp_path / "bf16_fp16.safetensors"))
    assert _verify(capsys, release, tmp_path / "fp16.safetensors")[0] == 2
    assert _verify(capsys, release, tmp_path / "fp16.safetensors", "--allow-lower-precision", "fp16")[0] == 0
    code, data = _verify(capsys, release, tmp_path / "bf16_fp16.safetensors", "--allow-lower-precision", "fp16")
    assert code in (1, 2)  # some tensors are not fp16(x): not accepted without bf16 named
    code, data = _verify(capsys, release, tmp_path / "bf16_fp16.safetensors", "--allow-lower-precision", "fp16,bf16")
    assert code == 0, data["cannot_verify"][:3]


def test_verify_raises_only_verify_input_error(release):
    from freezeguard.core.verify import VerifyInputError

    _, mask, sd = release
    with pytest.raises(VerifyInputError, match="non-tensor"):
        fg.verify(release[0] / "released", {"x": "not a tensor"}, mask)
    with pytest.raises(VerifyInputError, match="unknown dtype"):
        fg.verify(release[0] / "released", sd, mask, allow_lower_precision="fp8")


# ---------------------------------------------------------------------------------------------
# masks bind to a release


def test_mask_of_another_release_is_refused(release, tmp_path, capsys):
    root, mask, sd = release
    other = _unet(seed=1)  # same architecture, other weights
    other.save_pretrained(tmp_path / "other")
    code = main(["verify", "--released", str(tmp_path / "other"), "--mask", str(root / "mask.safetensors"),
                 "--finetuned", str(tmp_path / "other"), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 2 and "another release" in data["error"]
    with pytest.raises(FreezeMaskFileError, match="another release"):
        fg.FreezeMask.load(root / "mask.safetensors", model=other)
    assert fg.FreezeMask.load(root / "mask.safetensors", model=_unet()) == mask


def _rewrite_metadata(src, dst, **changes):
    raw = open(src, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"].update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del header["__metadata__"][k]
    body = json.dumps(header).encode()
    open(dst, "wb").write(struct.pack("<Q", len(body)) + body + raw[8 + n:])


def test_forged_fingerprint_does_not_bind_and_old_masks_get_a_note(release, tmp_path, capsys):
    root, _, sd = release
    other = _unet(seed=1)
    other.save_pretrained(tmp_path / "other")
    forged = tmp_path / "forged.safetensors"
    _rewrite_metadata(root / "mask.safetensors", forged, model_fingerprint=fg.model_fingerprint(other))
    code = main(["verify", "--released", str(tmp_path / "other"), "--mask", str(forged),
                 "--finetuned", str(tmp_path / "other")])
    assert code == 2 and "another release" in capsys.readouterr().err
    old = tmp_path / "old.safetensors"
    _rewrite_metadata(root / "mask.safetensors", old, release_hash=None)
    save_file(sd, str(tmp_path / "ft.safetensors"))
    code = main(["verify", "--released", str(root / "released"), "--mask", str(old),
                 "--finetuned", str(tmp_path / "ft.safetensors"), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and any("no content hash" in n for n in data["notes"])


@pytest.mark.parametrize("extra", ["[1, 2]", '"text"', '{"a": 1}', "not json"])
def test_malformed_mask_metadata_is_exit_2(release, tmp_path, capsys, extra):
    root, _, sd = release
    bad = tmp_path / "bad.safetensors"
    _rewrite_metadata(root / "mask.safetensors", bad, extra=extra)
    save_file(sd, str(tmp_path / "ft.safetensors"))
    code = main(["verify", "--released", str(root / "released"), "--mask", str(bad),
                 "--finetuned", str(tmp_path / "ft.safetensors")])
    assert code == 2 and "extra" in capsys.readouterr().err


def test_empty_mask_is_exit_2_unless_allowed(release, tmp_path, capsys):
    root, _, sd = release
    empty = fg.FreezeMask.from_names(_unet(), [])
    empty.save(tmp_path / "empty.safetensors", _unet())
    save_file(sd, str(tmp_path / "ft.safetensors"))
    argv = ["verify", "--released", str(root / "released"), "--mask", str(tmp_path / "empty.safetensors"),
            "--finetuned", str(tmp_path / "ft.safetensors")]
    assert main(argv) == 2 and "freezes nothing" in capsys.readouterr().out
    assert main(argv + ["--allow-empty-mask"]) == 0


# ---------------------------------------------------------------------------------------------
# folders: what the loaders read


def _changed_unet(mask, seed=0):
    unet = _unet(seed)
    with torch.no_grad():
        dict(unet.named_parameters())[_frozen_weight(mask)].add_(1.0)
    return unet


def test_changed_shards_beside_an_honest_file(release, tmp_path, capsys):
    """An index makes ``from_pretrained`` read the shards, not the honest single file beside them."""
    _, mask, sd = release
    bad = _changed_unet(mask)
    bad.save_pretrained(tmp_path / "up", max_shard_size="20KB")
    assert (tmp_path / "up" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    save_file(sd, str(tmp_path / "up" / "diffusion_pytorch_model.safetensors"))  # the decoy
    loaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "up")
    frozen = _frozen_weight(mask)
    assert not torch.equal(dict(loaded.named_parameters())[frozen], sd[frozen])
    code, data = _verify(capsys, release, tmp_path / "up")
    assert code == 1 and data["violations"][0]["name"] == frozen
    assert any(f["path"].endswith(".index.json") for f in data["files"])
    _unet().save_pretrained(tmp_path / "honest", max_shard_size="20KB")
    assert _verify(capsys, release, tmp_path / "honest")[0] == 0


def test_changed_fp16_variant_beside_an_honest_file(release, tmp_path, capsys):
    _, mask, _ = release
    _unet().save_pretrained(tmp_path / "up")
    _changed_unet(mask).half().save_pretrained(tmp_path / "up", variant="fp16")
    loaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "up", variant="fp16")
    frozen = _frozen_weight(mask)
    assert not torch.equal(dict(loaded.named_parameters())[frozen], dict(_unet().named_parameters())[frozen].half())
    code, data = _verify(capsys, release, tmp_path / "up", "--allow-lower-precision", "fp16")
    assert code == 1 and data["violations"][0]["name"].startswith(frozen)
    _unet().half().save_pretrained(tmp_path / "up", variant="fp16")
    assert _verify(capsys, release, tmp_path / "up", "--allow-lower-precision", "fp16")[0] == 0
    assert _verify(capsys, release, tmp_path / "up")[0] == 2  # fp16 without opting in


def test_pipeline_decoy_top_level_file_beside_a_changed_unet(tmp_path, capsys):
    """A pipeline folder: ``from_pretrained`` reads ``unet/`` (named by model_index.json), not the
    honest top-level ``model.safetensors``; every part is read, text encoder and VAE counted."""
    pipe = build_tiny_sd_pipeline(tmp_path / "pipe")
    released = diffusers.UNet2DConditionModel.from_pretrained(pipe / "unet")
    released.save_pretrained(tmp_path / "rel")
    mask = fg.FreezeMask.random(released, 0.3, seed=0)
    mask.save(tmp_path / "mask.safetensors", released)
    honest = {k: v.detach().clone().contiguous() for k, v in released.state_dict().items()}
    save_file(honest, str(pipe / "model.safetensors"))  # the decoy
    frozen = _frozen_weight(mask)
    with torch.no_grad():
        dict(released.named_parameters())[frozen].add_(1.0)
    released.save_pretrained(pipe / "unet")
    loaded = diffusers.StableDiffusionPipeline.from_pretrained(pipe, safety_checker=None).unet
    assert not torch.equal(dict(loaded.named_parameters())[frozen], honest[frozen])
    argv = ["verify", "--released", str(tmp_path / "rel"), "--mask", str(tmp_path / "mask.safetensors"),
            "--finetuned", str(pipe), "--json"]
    code = main(argv)
    data = json.loads(capsys.readouterr().out)
    assert code == 1 and data["violations"][0]["name"] == frozen
    assert {f["part"] for f in data["files"]} >= {"denoiser", "text_encoder", "vae"}
    assert data["parts"]["text_encoder"] > 0 and data["parts"]["vae"] > 0
    save_file(honest, str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))
    assert main(argv) == 0


def test_lora_on_frozen_layers_beside_a_decoy_full_model(release, tmp_path, capsys):
    """diffusers ``save_lora_weights`` next to an honest full model: ``load_lora_weights`` + ``fuse_lora``
    changes the frozen tensor."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    _, mask, sd = release
    frozen = _frozen_weight(mask)
    module = frozen.rsplit(".", 1)[0]
    unet = _unet()
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=[module]))
    up = tmp_path / "up"
    diffusers.StableDiffusionPipeline.save_lora_weights(up, unet_lora_layers=get_peft_model_state_dict(unet))
    save_file(sd, str(up / "diffusion_pytorch_model.safetensors"))  # the decoy
    target = _unet()
    target.load_lora_adapter(str(up / "pytorch_lora_weights.safetensors"), prefix="unet")
    target.fuse_lora()
    assert not torch.equal(_released_params(target)[frozen], sd[frozen])
    code, data = _verify(capsys, release, up)
    assert code == 1 and {v["frozen"] for v in data["lora_violations"]} == {
        n for n in mask.frozen_names if n.startswith(module + ".")}
    ok = _unet()
    ok.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=[_trainable_linear(mask)]))
    diffusers.StableDiffusionPipeline.save_lora_weights(up, unet_lora_layers=get_peft_model_state_dict(ok))
    assert _verify(capsys, release, up)[0] == 0


def test_index_paths_and_symlinks_stay_inside_the_upload(release, tmp_path, capsys, monkeypatch):
    _, _, sd = release
    outside = tmp_path / "outside.safetensors"
    save_file(sd, str(outside))
    for shard in ("../outside.safetensors", str(outside)):
        up = tmp_path / ("up" + str(abs(hash(shard))))
        up.mkdir()
        (up / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {k: shard for k in sd}}))
        code, data = _verify(capsys, release, up)
        assert code == 2 and "outside the upload" in data["cannot_verify"][0]["reason"], shard
    link = tmp_path / "linked"
    link.mkdir()
    save_file(sd, str(link / "diffusion_pytorch_model.safetensors"))
    os.symlink(outside, link / "extra.safetensors")
    code, data = _verify(capsys, release, link)
    assert code == 2 and data["cannot_verify"][0]["key"] == "extra.safetensors"
    (link / "extra.safetensors").unlink()
    (link / "model.ckpt").write_bytes(b"\x80\x04")
    code, data = _verify(capsys, release, link)
    assert code == 2 and data["cannot_verify"][0]["key"] == "model.ckpt"
    (link / "model.ckpt").unlink()
    save_file({k: v + 1 for k, v in sd.items()}, str(link / "weights.SafeTensors"))  # odd case
    save_file({k: v + 1 for k, v in sd.items()}, str(link / "weights"))  # no suffix: found by its header
    torch.save(sd, link / "state.data")  # a pickle (zip) under another name: refused, never unpickled
    code, data = _verify(capsys, release, link)
    assert code == 1 and {f["path"] for f in data["files"]} >= {"weights.SafeTensors", "weights"}
    assert ("state.data" in {c["key"] for c in data["cannot_verify"]})
    for name in ("weights.SafeTensors", "weights", "state.data"):
        (link / name).unlink()
    assert _verify(capsys, release, link)[0] == 0
    # a folder the audit cannot list (os.walk would skip it silently) is exit 2, not "nothing there"
    (link / "sub").mkdir()
    real_walk = os.walk

    def walk(top, onerror=None, **kw):
        onerror(PermissionError(13, "Permission denied", str(link / "sub")))
        yield from real_walk(top, onerror=onerror, **kw)
    monkeypatch.setattr("freezeguard.core.upload.os.walk", walk)
    code, data = _verify(capsys, release, link)
    assert code == 2 and data["cannot_verify"][0]["key"] == "sub"


def test_released_buffers_are_compared_not_taken_for_adapters(tmp_path, capsys):
    """SD3 saves ``pos_embed.pos_embed`` (a buffer, not a parameter): with ``pos_embed.proj`` frozen, an
    honest upload passes and a changed buffer cannot be verified."""
    from freezeguard.integrations.diffusers.models import get_family

    model = get_family("sd3").build("tiny")
    model.save_pretrained(tmp_path / "released")
    mask = fg.FreezeMask.from_names(model, ["pos_embed.proj.weight"])
    mask.save(tmp_path / "mask.safetensors", model)
    argv = ["verify", "--released", str(tmp_path / "released"), "--mask", str(tmp_path / "mask.safetensors"),
            "--finetuned", str(tmp_path / "released")]
    assert main(argv) == 0
    capsys.readouterr()
    sd = load_file(str(tmp_path / "released" / "diffusion_pytorch_model.safetensors"))
    sd["pos_embed.pos_embed"] = sd["pos_embed.pos_embed"] + 1
    save_file(sd, str(tmp_path / "up.safetensors"))
    argv[-1] = str(tmp_path / "up.safetensors")
    assert main(argv) == 2 and "buffer" in capsys.readouterr().out


def test_documented_json_schema_is_what_verify_prints(release, tmp_path, capsys):
    """docs/security.md's schema block names exactly the fields ``--json`` prints."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "security.md").read_text()
    block = doc.split("## `--json` schema", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    documented = json.loads(re.sub(r"//[^\n]*", "", block))
    _, _, sd = release
    save_file(sd, str(tmp_path / "ft.safetensors"))
    _, data = _verify(capsys, release, tmp_path / "ft.safetensors")
    assert set(documented) == set(data)
    assert set(documented["classes"]) == set(data["classes"])
