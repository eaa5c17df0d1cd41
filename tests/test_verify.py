"""fg.verify and `freezeguard verify`: bit-exact audit of frozen tensors across input kinds."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from support.tiny_models import build_tiny_unet

import freezeguard as fg
from freezeguard.cli import main
from freezeguard.core.verify import VerifyInputError

diffusers = pytest.importorskip("diffusers")


def tiny_unet() -> torch.nn.Module:
    return build_tiny_unet(seed=0, cross_attention_dim=8)


def _lin() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))


def _sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_state_dicts_and_models():
    released = _lin()
    mask = fg.FreezeMask.from_names(released, ["0.weight", "1.bias"])
    tuned = _sd(released)
    tuned["0.bias"] += 1.0
    report = fg.verify(released, tuned, mask)
    assert report.ok and report.checked == 2 and not report.violations
    tuned["1.bias"][1] -= 0.25
    report = fg.verify(_sd(released), tuned, mask)
    assert not report.ok and [n for n, _ in report.violations] == ["1.bias"]
    assert report.violations[0][1] == pytest.approx(0.25, abs=1e-6)
    assert not bool(report) and "1.bias" in report.summary()


def test_bitwise_not_approximate():
    released = _lin()
    mask = fg.FreezeMask.from_names(released, ["0.weight"])
    tuned = _sd(released)
    w = tuned["0.weight"]
    w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(1.0))  # one ulp
    report = fg.verify(released, tuned, mask)
    assert not report.ok and 0 < report.violations[0][1] < 1e-6


def test_lower_precision_needs_opt_in_and_equals_the_rounded_release():
    released = _lin()
    mask = fg.FreezeMask.from_names(released, ["0.weight"])
    tuned = {k: v.to(torch.float16) for k, v in _sd(released).items()}
    report = fg.verify(released, tuned, mask)
    assert report.exit_code == 2 and "--allow-lower-precision fp16" in report.cannot_verify[0][1]
    report = fg.verify(released, tuned, mask, allow_lower_precision="fp16")
    assert report.ok and any("rounded to fp16" in n for n in report.notes)
    tuned["0.weight"][0, 0] += 1
    assert fg.verify(released, tuned, mask, allow_lower_precision="fp16").exit_code == 1


def test_reshaped_frozen_tensor_is_a_violation():
    released = _lin()
    mask = fg.FreezeMask.from_names(released, ["0.weight"])
    tuned = _sd(released)
    tuned["0.weight"] = torch.zeros(8, 5)
    report = fg.verify(released, tuned, mask)
    assert report.violations == [("0.weight", float("inf"))]
    assert report.to_dict()["violations"] == [{"name": "0.weight", "max_abs_diff": None}]


def test_peft_style_names_in_finetuned():
    released = _lin()
    mask = fg.FreezeMask.from_names(released, ["0.weight"])
    tuned = {f"base_model.model.0.base_layer.{k[2:]}" if k.startswith("0.") else k: v
             for k, v in _sd(released).items()}
    assert fg.verify(released, tuned, mask).checked == 1
    tuned["base_model.model.0.base_layer.weight"] += 1
    assert fg.verify(released, tuned, mask).violations[0][0].startswith("0.weight")


def test_files_folders_and_pipelines(tmp_path):
    released = tiny_unet()
    mask = fg.FreezeMask.random(released, 0.3, seed=0)
    released.save_pretrained(tmp_path / "released")
    tuned = tiny_unet()
    name = mask.trainable_names[0]
    with torch.no_grad():
        dict(tuned.named_parameters())[name].add_(1.0)
    tuned.save_pretrained(tmp_path / "pipe" / "unet")  # a pipeline folder
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, str(tmp_path / "tuned.safetensors"))
    for ft in (tmp_path / "pipe", tmp_path / "pipe" / "unet", tmp_path / "tuned.safetensors", tuned):
        report = fg.verify(tmp_path / "released", ft, mask)
        assert report.ok and report.checked == len(mask.frozen_names), ft
    frozen = mask.frozen_names[0]
    with torch.no_grad():
        dict(tuned.named_parameters())[frozen].mul_(-1)
    tuned.save_pretrained(tmp_path / "pipe" / "unet")
    report = fg.verify(str(tmp_path / "released"), tmp_path / "pipe", mask)
    assert [n for n, _ in report.violations] == [frozen]


def test_bad_inputs(tmp_path):
    released = _lin()
    mask = fg.FreezeMask.from_names(released, ["0.weight"])
    with pytest.raises(VerifyInputError, match="does not exist"):
        fg.verify(released, tmp_path / "nope.safetensors", mask)
    (tmp_path / "model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(VerifyInputError, match="pickle"):
        fg.verify(released, tmp_path / "model.bin", mask)
    with pytest.raises(VerifyInputError, match="only pickle"):
        fg.verify(released, tmp_path, mask)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    report = fg.verify(released, tmp_path / "junk.safetensors", mask)  # in the report: the key list stays whole
    assert report.exit_code == 2 and "not a readable safetensors" in report.cannot_verify[0][1]
    with pytest.raises(VerifyInputError, match="made for a different model"):
        fg.verify({"1.bias": torch.zeros(2)}, _sd(released), mask)
    with pytest.raises(VerifyInputError, match="must be a model"):
        fg.verify(released, 42, mask)


def _finetune(model, opt, steps=3):
    torch.manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        out = model(torch.randn(2, 4, 8, 8), torch.tensor([5, 9]), torch.randn(2, 3, 8)).sample
        out.pow(2).mean().backward()
        opt.step()


def _run_cli(capsys, *args):
    code = main(["verify", *map(str, args)])
    return code, capsys.readouterr()


def test_cli_catches_unguarded_finetune_and_passes_guarded(tmp_path, capsys):
    released = tiny_unet()
    released.save_pretrained(tmp_path / "released")
    mask = fg.FreezeMask.random(released, 0.4, seed=0)
    mask.save(tmp_path / "mask.safetensors", released)

    unguarded = tiny_unet()
    _finetune(unguarded, torch.optim.AdamW(unguarded.parameters(), lr=1e-2))
    unguarded.save_pretrained(tmp_path / "unguarded")
    guarded = tiny_unet()
    _finetune(guarded, fg.guard(guarded, fg.FreezeMask.load(tmp_path / "mask.safetensors", guarded), lr=1e-2,
                                backend="torch"))
    guarded.save_pretrained(tmp_path / "guarded", safe_serialization=True)

    args = ["--released", tmp_path / "released", "--mask", tmp_path / "mask.safetensors", "--json"]
    code, out = _run_cli(capsys, *args, "--finetuned", tmp_path / "unguarded")
    data = json.loads(out.out)
    assert code == 1 and data["ok"] is False
    assert {v["name"] for v in data["violations"]} == set(mask.frozen_names)
    code, out = _run_cli(capsys, *args, "--finetuned", tmp_path / "guarded")
    data = json.loads(out.out)
    assert code == 0 and data["ok"] is True and data["checked"] == len(mask.frozen_names)
    code, out = _run_cli(capsys, "--released", tmp_path / "released", "--mask", tmp_path / "mask.safetensors",
                         "--finetuned", tmp_path / "guarded")
    assert code == 0 and out.out.startswith("OK")


def test_cli_bad_input_exit_2(tmp_path, capsys):
    released = _lin()
    save_file(_sd(released), str(tmp_path / "r.safetensors"))
    code, out = _run_cli(capsys, "--released", tmp_path / "r.safetensors", "--finetuned",
                         tmp_path / "r.safetensors", "--mask", tmp_path / "missing.safetensors")
    assert code == 2 and "does not exist" in out.err
    fg.FreezeMask.from_names(released, ["0.weight"]).save(tmp_path / "m.safetensors")
    code, out = _run_cli(capsys, "--released", tmp_path / "r.safetensors", "--finetuned",
                         tmp_path / "gone", "--mask", tmp_path / "m.safetensors", "--json")
    data = json.loads(out.out)
    assert code == 2 and data["ok"] is False and data["status"] == "cannot_verify" and data["exit_code"] == 2
