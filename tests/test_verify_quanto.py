"""verify on models quantized with optimum-quanto (issue 25, item 5): exit 2, never a traceback.

A quantized frozen weight holds int8 values and a scale, not the released floats: it cannot be
shown equal to the release, so verify says "cannot verify" (exit 2), honest or not. The models
and checkpoint are built with the real ``optimum-quanto`` 0.2.7 from the package index, as its
README documents: ``quantize(model, weights=qint8)`` + ``freeze(model)``, then
``safetensors.torch.save_file(model.state_dict(), ...)`` beside
``json.dump(quantization_map(model), ...)`` (optimum/quanto/quantize.py, quantization_map).
"""
from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file
from support.tiny_models import build_tiny_unet

import freezeguard as fg
from freezeguard.cli import main
from freezeguard.core.verify import VerifyInputError

quanto = pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed (pip install '.[test]')")
pytest.importorskip("diffusers")

FROZEN_MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _quantized_unet():
    unet = build_tiny_unet(seed=0, cross_attention_dim=8)
    quanto.quantize(unet, weights=quanto.qint8)
    quanto.freeze(unet)
    return unet


@pytest.fixture
def release(tmp_path):
    unet = build_tiny_unet(seed=0, cross_attention_dim=8)
    unet.save_pretrained(tmp_path / "released")
    mask = fg.FreezeMask.from_names(unet, [f"{FROZEN_MODULE}.weight"])
    mask.save(tmp_path / "mask.safetensors", unet)
    return unet, mask


def test_live_quanto_model_is_cannot_verify_not_a_crash(release):
    """``fg.verify`` on a live model whose frozen weight is a quanto ``WeightQBytesTensor``: a report
    with exit 2 naming the tensor, or VerifyInputError; no other exception (was: a raw ValueError)."""
    unet, mask = release
    released = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    quantized = _quantized_unet()
    weight = quantized.get_submodule(FROZEN_MODULE).weight
    assert type(weight).__module__.startswith("optimum.quanto")  # really quantized by quanto
    # the honest twin: quantized from the released weights themselves (same seed), trained nothing
    for finetuned in (quantized, quantized.state_dict()):
        try:
            report = fg.verify(released, finetuned, mask)
        except VerifyInputError as exc:
            assert "quantiz" in str(exc) or "WeightQBytesTensor" in str(exc)
            continue
        assert report.exit_code == 2 and not report.ok
        keys = " ".join(k for k, _ in report.cannot_verify)
        assert FROZEN_MODULE in keys, report.cannot_verify[:3]
        assert any("quantiz" in reason for _, reason in report.cannot_verify)
    # a quantized model given as the release: bad input or cannot-verify, never a traceback or "OK"
    try:
        report = fg.verify(quantized, released, mask)
    except VerifyInputError as exc:
        assert str(exc)
    else:
        assert report.exit_code == 2, (report.status, report.cannot_verify[:3])


def test_quanto_checkpoint_file_is_exit_2(release, tmp_path, capsys):
    """The checkpoint quanto documents (state_dict with ``<name>.weight._data`` / ``._scale``, plus
    the JSON ``quantization_map``) in a folder: exit 2 listing the frozen tensor's parts."""
    _, _ = release
    quantized = _quantized_unet()
    state = quantized.state_dict()
    assert f"{FROZEN_MODULE}.weight._data" in state and f"{FROZEN_MODULE}.weight._scale" in state
    upload = tmp_path / "upload"
    upload.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(upload / "diffusion_pytorch_model.safetensors"))
    (upload / "quantization_map.json").write_text(json.dumps(quanto.quantization_map(quantized)))
    code = main(["verify", "--released", str(tmp_path / "released"), "--mask", str(tmp_path / "mask.safetensors"),
                 "--finetuned", str(upload), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 2 and data["exit_code"] == 2 and not data["ok"]
    keys = {c["key"] for c in data["cannot_verify"]}
    assert {f"{FROZEN_MODULE}.weight._data", f"{FROZEN_MODULE}.weight._scale"} <= keys
    assert not data["violations"]  # not a false "changed": it cannot be shown equal either way
