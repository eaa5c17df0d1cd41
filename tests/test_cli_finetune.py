"""`freezeguard finetune` end to end on a tiny SD pipeline (offline), full and guarded."""
from __future__ import annotations

import json
import os

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


# --- outputs that cannot be lost -------------------------------------------------------------


def _listing(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes()) for p in folder.rglob("*") if p.is_file())


def test_a_failed_write_leaves_the_earlier_output_whole(setup, tmp_path, capsys, monkeypatch):
    """A write cut short (here: the denoiser's save raises ENOSPC) leaves the earlier output as it was."""
    import errno

    from freezeguard.integrations.diffusers import pipeline

    out = tmp_path / "ft"
    assert main(_args(setup, out, "--quiet")) == 0
    before = _listing(out)

    def full_disk(unet, path):
        (path / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "save_unet", full_disk)
    capsys.readouterr()
    assert main(_args(setup, out, "--quiet", "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert "No space left" in err and "unchanged" in err and "Traceback" not in err
    assert _listing(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"]  # no temporary folder or log left behind


def test_outputs_follow_the_umask(setup, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        assert main(_args(setup, tmp_path / "ft", "--quiet")) == 0
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ft").rglob("*")}
    assert modes["ft/unet/diffusion_pytorch_model.safetensors"] == 0o644
    assert all(m == (0o755 if (tmp_path / n).is_dir() else 0o644) for n, m in modes.items()), modes


@pytest.mark.parametrize("where", ["model", "unet-file", "inside-model", "holds-data", "not-ours", "unwritable"])
def test_bad_out_is_refused_before_any_work(setup, tmp_path, capsys, monkeypatch, where):
    import shutil

    from freezeguard.integrations.diffusers import pipeline

    model = tmp_path / "sd"
    shutil.copytree(setup["pipe"], model)
    data = tmp_path / "data"
    shutil.copytree(setup["target"], data / "target")
    out = {"model": model, "unet-file": model / "unet" / "diffusion_pytorch_model.safetensors",
           "inside-model": model / "ft", "holds-data": data, "not-ours": tmp_path / "mine",
           "unwritable": tmp_path / "ro" / "ft"}[where]
    if where == "not-ours":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    if where == "unwritable":
        out.parent.mkdir()
        out.parent.chmod(0o555)
        if os.access(out.parent, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
    loads = []
    monkeypatch.setattr(pipeline, "load_components", lambda *a, **k: loads.append(1))
    before = _listing(tmp_path) if where != "unwritable" else None
    args = ["finetune", "--model", str(model), "--train-data", str(data / "target"), "--out", str(out),
            "--steps", "1", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: --out" in err and not loads, err
    if before is not None:
        assert _listing(tmp_path) == before
