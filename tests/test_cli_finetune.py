"""`freezeguard finetune` end to end on a tiny SD pipeline (offline), full and guarded."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from support.tiny_models import build_tiny_sd_pipeline, write_tiny_imagefolder  # noqa: E402

import freezeguard as fg  # noqa: E402
from freezeguard.apps.finetune import finetune  # noqa: E402
from freezeguard.cli import main  # noqa: E402
from freezeguard.integrations.diffusers import ImageFolderDataset, load_components  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    pipe = build_tiny_sd_pipeline(root / "tiny-sd", seed=0)
    target = write_tiny_imagefolder(root / "target", n=4, caption="a photo of sks", seed=0, style="checker")
    innocent = write_tiny_imagefolder(root / "innocent", n=4, caption="a photo of dog", seed=1, style="stripes")
    return {"root": root, "pipe": pipe, "target": target, "innocent": innocent}


def _args(s, out, *extra):
    return ["finetune", "--model", str(s["pipe"]), "--train-data", str(s["target"]), "--innocent-data",
            str(s["innocent"]), "--out", str(out), "--steps", "2", "--lr", "1e-3", "--batch-size", "2",
            "--seed", "0", *extra]


def test_full_finetune_writes_pipeline(setup, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(_args(setup, out, "--json")) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["steps"] == 2 and not summary["guarded"] and summary["frozen_tensors"] == 0
    assert all(isinstance(x, float) for x in summary["losses"] + summary["target_losses"] + summary["innocent_losses"])
    assert "step     2/2" in captured.err  # per-step log on stderr, stdout stays JSON
    log = [json.loads(line) for line in (out / "finetune_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    before, after = load_components(setup["pipe"]), load_components(out)
    changed = [n for n, p in after.unet.named_parameters()
               if not torch.equal(p, before.unet.get_parameter(n))]
    assert len(changed) > 0.9 * len(list(after.unet.parameters()))
    torch.testing.assert_close(after.vae.state_dict(), before.vae.state_dict())
    torch.testing.assert_close(after.text_encoder.state_dict(), before.text_encoder.state_dict())
    assert (out / "tokenizer").is_dir() and (out / "model_index.json").is_file()


@pytest.mark.parametrize("lean", [False, True], ids=["plain", "lean-frozen-convs"])
def test_guarded_finetune_keeps_frozen_tensors(setup, tmp_path, capsys, lean):
    unet = load_components(setup["pipe"]).unet
    mask = fg.FreezeMask.random(unet, ratio=0.5, by="tensors", seed=0)
    mask_path = tmp_path / "mask.safetensors"
    mask.save(mask_path, unet)
    out = tmp_path / "guarded"
    extra = ["--lean-frozen-convs"] if lean else []
    assert main(_args(setup, out, "--mask", str(mask_path), "--json", "--quiet", *extra)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["guarded"] and summary["frozen_tensors"] == len(mask.frozen_names)
    after = load_components(out).unet
    for name, p in after.named_parameters():
        same = torch.equal(p, unet.get_parameter(name))
        if mask.is_frozen(name):
            assert same, f"frozen tensor {name} changed"
    assert sum(not torch.equal(p, unet.get_parameter(n)) for n, p in after.named_parameters()) > 0


def test_finetune_is_reproducible(setup):
    runs = []
    for _ in range(2):
        comps = load_components(setup["pipe"])
        ds = ImageFolderDataset(setup["target"], role="target", tokenizer=comps.tokenizer)
        result = finetune(comps, ds, steps=2, lr=1e-3, batch_size=2, seed=3, progress=False)
        runs.append(result.losses)
    assert runs[0] == runs[1] and len(runs[0]) == 2
    # no innocent data: innocent losses are NaN in memory and null in the JSON summary
    assert result.summary()["innocent_losses"] == [None, None]
    assert result.summary()["target_losses"] == pytest.approx(runs[1], rel=1e-5)


def test_bf16_autocast_and_gradient_checkpointing(setup):
    comps = load_components(setup["pipe"])
    ds = ImageFolderDataset(setup["target"], role="target", tokenizer=comps.tokenizer)
    before = comps.unet.conv_in.weight.detach().clone()
    result = finetune(comps, ds, steps=1, lr=1e-3, batch_size=2, seed=0, mixed_precision="bf16",
                      gradient_checkpointing=True, progress=False)
    assert len(result.losses) == 1 and torch.isfinite(torch.tensor(result.losses)).all()
    assert comps.unet.conv_in.weight.dtype == torch.float32  # master weights stay fp32
    assert not torch.equal(comps.unet.conv_in.weight, before)
    with pytest.raises(ValueError, match="mixed_precision"):
        finetune(comps, ds, steps=1, mixed_precision="fp8", progress=False)


@pytest.mark.gpu
def test_guarded_bf16_finetune_on_cuda(setup, tmp_path, capsys):
    unet = load_components(setup["pipe"]).unet
    mask = fg.FreezeMask.random(unet, ratio=0.3, by="params", seed=1)
    mask.save(tmp_path / "mask.safetensors", unet)
    out = tmp_path / "gpu"
    assert main(_args(setup, out, "--mask", str(tmp_path / "mask.safetensors"), "--device", "cuda",
                      "--mixed-precision", "bf16", "--json", "--quiet")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["device"].startswith("cuda") and summary["peak_memory_bytes"] > 0
    after = load_components(out).unet
    for name in mask.frozen_names:
        assert torch.equal(after.get_parameter(name), unet.get_parameter(name)), name


def test_bad_input_fails_before_training(setup, tmp_path, capsys):
    def err(*argv):
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    assert "does not exist" in err(*_args({**setup, "pipe": tmp_path / "nope"}, tmp_path / "o"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in err(*_args({**setup, "target": empty}, tmp_path / "o"))
    assert "steps must be >= 1" in err(*_args(setup, tmp_path / "o"), "--steps", "0")
    assert "--out must differ" in err(*_args(setup, setup["pipe"]))
    assert "needs --mask" in err(*_args(setup, tmp_path / "o", "--lean-frozen-convs"))
    assert "does not exist" in err(*_args(setup, tmp_path / "o", "--mask", str(tmp_path / "none.safetensors")))
    other = torch.nn.Linear(2, 2)
    fg.FreezeMask.from_names(other, ["weight"]).save(tmp_path / "other.safetensors", other)
    assert "different model" in err(*_args(setup, tmp_path / "o", "--mask", str(tmp_path / "other.safetensors")))
    no_caption = write_tiny_imagefolder(tmp_path / "nocap", n=2, caption="x", caption_column="prompt")
    assert "no caption" in err(*_args({**setup, "innocent": no_caption}, tmp_path / "o"))
    assert not (tmp_path / "o" / "unet").exists()


def test_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = capsys.readouterr().out
    for flag in ("--mask", "--mixed-precision", "--gradient-checkpointing", "--innocent-data", "--json"):
        assert flag in text
