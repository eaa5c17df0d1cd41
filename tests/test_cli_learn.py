"""`freezeguard learn` end to end on a tiny SD pipeline written with save_pretrained (no network)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
testing = pytest.importorskip("support.tiny_models")

from freezeguard.cli import main  # noqa: E402
from freezeguard.core.mask import FreezeMask  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A released pipeline, a fine-tune of it (perturbed UNet), target and innocent folders."""
    from diffusers import UNet2DConditionModel

    from freezeguard.integrations.diffusers.pipeline import save_pipeline_with_unet

    root = tmp_path_factory.mktemp("learn")
    pre = testing.build_tiny_sd_pipeline(root / "pre", seed=0)
    unet = UNet2DConditionModel.from_pretrained(str(pre / "unet"), local_files_only=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    ft = save_pipeline_with_unet(pre, root / "ft", unet)
    target = testing.write_tiny_imagefolder(root / "target", n=4, caption="sks stripes", seed=1, style="stripes")
    innocent = testing.write_tiny_imagefolder(root / "innocent", n=4, caption="a checker", seed=2, style="checker")
    return {"root": root, "pre": pre, "ft": ft, "target": target, "innocent": innocent}


def _argv(a, out, *extra):
    return ["learn", "--pretrained", str(a["pre"]), "--finetuned", str(a["ft"]), "--target-data", str(a["target"]),
            "--innocent-data", str(a["innocent"]), "--freeze-ratio", "0.25", "--out", str(out), "--quiet",
            "--user-lr", "1e-3", "--user-interval", "2", "--backend", "torch", "--preset", "authors", "--c-sparsity",
            "auto", *extra]


def test_learn_writes_mask_plot_and_log(assets, tmp_path, capsys):
    out = tmp_path / "mask.safetensors"
    assert main(_argv(assets, out, "--steps", "4", "--json", "--budget-by", "params")) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(assets["pre"] / "unet"), local_files_only=True)
    mask = FreezeMask.load(str(out), model=unet)
    assert summary["frozen_tensors"] == len(mask.frozen_names) > 0
    assert summary["realised_ratio"] == pytest.approx(mask.ratio("params"))
    assert abs(mask.ratio("params") - 0.25) < 0.05  # the params budget, met as closely as tensor sizes allow
    assert json.loads(mask.metadata["learning"])["steps"] == 4
    png = (tmp_path / "mask.safetensors.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    log = [json.loads(line) for line in (tmp_path / "mask.safetensors.log.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in log] == ["releaser", "user", "releaser", "user"]
    assert all(e["n_target"] == 2 and e["n_innocent"] == 2 for e in log)
    # By params, a tensor's budget weight is its share of the parameters, so the data leads on small tensors.
    assert summary["mask_moved"] == log[-1]["mask_moved"] > 0
    assert "warning" not in captured.err
    assert isinstance(log[0]["data_to_budget"], float) and log[1]["data_to_budget"] is None


def test_a_mask_the_data_never_moved_is_reported(assets, tmp_path, capsys):
    # By tensors with the authors' c_sparsity, the budget term drowns a tiny model's data: said plainly.
    out = tmp_path / "mask.safetensors"
    assert main(_argv(assets, out, "--steps", "4", "--json", "--c-sparsity", "5e3")) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["mask_moved"] == 0
    assert "freezeguard learn: warning: MaskLearner: after 4 steps the hard mask is still exactly" in captured.err
    assert "UserWarning" not in captured.err
    assert main(_argv(assets, tmp_path / "m2.safetensors", "--steps", "4", "--json", "--c-sparsity", "1",
                      "--mask-lr", "1e4")) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["mask_moved"] > 0 and "warning" not in captured.err


def test_new_learner_options(assets, tmp_path, capsys):
    out = tmp_path / "mask.safetensors"
    assert main(_argv(assets, out, "--steps", "6", "--json", "--budget", "projected", "--signal-batches", "2",
                      "--signal-norm", "rms", "--mask-lr", "0.5", "--init", "delta", "--hard-mask", "threshold")) == 0
    summary = json.loads(capsys.readouterr().out)
    log = [json.loads(line) for line in (tmp_path / "mask.safetensors.log.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in log] == ["releaser", "releaser", "user"] * 2
    assert all(e["soft_ratio"] == pytest.approx(0.25, abs=1e-5) for e in log)
    assert summary["init"] == "delta" and summary["frozen_moved"] == log[-1]["frozen_moved"]
    assert json.loads(FreezeMask.load(str(out)).metadata["learning"])["hard_mask"] == "threshold"
    with pytest.raises(SystemExit):
        main(_argv(assets, tmp_path / "x.safetensors", "--steps", "2", "--c-sparsity", "lots"))
    assert main(_argv(assets, tmp_path / "x.safetensors", "--steps", "2", "--signal-batches", "0")) != 0
    assert "--signal-batches must be >= 1" in capsys.readouterr().err


def test_resume_continues_exactly(assets, tmp_path):
    from freezeguard.apps.learn.state_io import read

    straight = tmp_path / "straight.safetensors"
    assert main(_argv(assets, tmp_path / "a.safetensors", "--steps", "4", "--state", str(straight))) == 0
    part = tmp_path / "part.safetensors"
    assert main(_argv(assets, tmp_path / "b.safetensors", "--steps", "2", "--state", str(part))) == 0
    assert main(_argv(assets, tmp_path / "b.safetensors", "--steps", "4", "--resume", str(part),
                      "--state", str(part))) == 0
    a, meta_a = read(straight)
    b, meta_b = read(part)
    assert meta_a["step_count"] == meta_b["step_count"] == "4"
    for key in a:
        assert torch.equal(a[key], b[key]), key
    mask_a, mask_b = FreezeMask.load(str(tmp_path / "a.safetensors")), FreezeMask.load(str(tmp_path / "b.safetensors"))
    assert mask_a == mask_b and mask_a.metadata["learning"] == mask_b.metadata["learning"]
    log = (tmp_path / "b.safetensors.log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log] == [0, 1, 2, 3]


def _bad_folder(tmp_path, kind):
    if kind == "no images":
        d = tmp_path / "empty"
        d.mkdir()
        (d / "metadata.jsonl").write_text("")
        return d
    d = testing.write_tiny_imagefolder(tmp_path / kind.replace(" ", "_"), n=3, caption="x", seed=3)
    if kind == "missing captions":
        rows = (d / "metadata.jsonl").read_text().splitlines()
        (d / "metadata.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    elif kind == "mixed sizes":
        testing.write_tiny_imagefolder(tmp_path / "big", n=1, caption="x", seed=4, size=24, style="rings")
        shutil.copy(tmp_path / "big" / "rings_0000.png", d / "rings_0000.png")
        with open(d / "metadata.jsonl", "a") as fh:
            fh.write(json.dumps({"file_name": "rings_0000.png", "text": "x"}) + "\n")
    return d


@pytest.mark.parametrize("kind, message", [("no images", "no images"), ("missing captions", "no caption"),
                                           ("mixed sizes", "mixed sizes")])
def test_bad_data_folders_fail_before_learning(assets, tmp_path, capsys, kind, message):
    bad = _bad_folder(tmp_path, kind)
    argv = _argv(assets, tmp_path / "m.safetensors", "--steps", "2")
    argv[argv.index("--target-data") + 1] = str(bad)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors.log.jsonl").exists() and not (tmp_path / "m.safetensors").exists()


def test_mismatched_finetuned_model_is_rejected_before_loading(assets, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=8, cross_attention_dim=16,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)
    other.save_pretrained(str(tmp_path / "other" / "unet"))
    argv = _argv(assets, tmp_path / "m.safetensors", "--steps", "2")
    argv[argv.index("--finetuned") + 1] = str(tmp_path / "other")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not a fine-tune of --pretrained" in err and "shapes differ" in err


@pytest.mark.parametrize("ratio", ["1.5", "-0.1", "nan"])
def test_ratio_outside_unit_interval_is_a_usage_error(assets, tmp_path, capsys, ratio):
    argv = _argv(assets, tmp_path / "m.safetensors")
    argv[argv.index("--freeze-ratio") + 1] = ratio
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "must be in [0, 1]" in capsys.readouterr().err


def test_the_former_hard_mask_name_round_is_refused_naming_threshold(assets, tmp_path, capsys):
    from freezeguard.apps.learn.run import LearnInputError, check_learn_inputs

    with pytest.raises(SystemExit) as exc:
        main(_argv(assets, tmp_path / "m.safetensors", "--hard-mask", "round"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "argument --hard-mask: unknown hard-mask rule 'round': it was renamed to " \
        "'threshold'" in err, err
    assert not (tmp_path / "m.safetensors").exists()
    with pytest.raises(SystemExit):  # any other unknown name: the rules are listed
        main(_argv(assets, tmp_path / "m.safetensors", "--hard-mask", "nearest"))
    assert "unknown hard-mask rule 'nearest': the rules are topk, threshold" in capsys.readouterr().err
    # the library's check, for callers of learn() that bypass the command line
    with pytest.raises(LearnInputError, match="^--hard-mask: unknown hard-mask rule 'round': it was renamed to "
                                              "'threshold'$"):
        check_learn_inputs(assets["pre"], assets["ft"], assets["target"], assets["innocent"],
                           tmp_path / "m.safetensors", steps=2, batch_size=4, hard_mask="round")


def test_missing_paths_are_named(assets, tmp_path, capsys):
    argv = _argv(assets, tmp_path / "m.safetensors")
    argv[argv.index("--pretrained") + 1] = str(tmp_path / "nowhere")
    assert main(argv) == 2 and "--pretrained" in capsys.readouterr().err
    argv = _argv(assets, tmp_path / "m.safetensors")
    argv[argv.index("--innocent-data") + 1] = str(tmp_path / "nowhere")
    assert main(argv) == 2 and "--innocent-data" in capsys.readouterr().err
    assert main(_argv(assets, tmp_path)) == 2 and "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("flag,where", [("--out", "pre/unet/diffusion_pytorch_model.safetensors"),
                                        ("--log", "pre/model_index.json"), ("--plot", "target/plot.png"),
                                        ("--state", "ft/state.safetensors")])
def test_outputs_over_or_inside_an_input_are_refused_before_any_work(assets, tmp_path, capsys, monkeypatch,
                                                                      flag, where):
    """The released weights, the pipeline's index and the data folders are never written into (exit 2)."""
    from freezeguard.apps.learn import run as learn_run

    root = tmp_path / "copy"
    for name in ("pre", "ft", "target", "innocent"):
        shutil.copytree(assets[name], root / name)
    copied = {**assets, **{name: root / name for name in ("pre", "ft", "target", "innocent")}}
    before = sorted((str(p), p.read_bytes()) for p in root.rglob("*") if p.is_file())
    loads = []
    monkeypatch.setattr(learn_run, "load_components", lambda *a, **k: loads.append(1))
    argv = _argv(copied, tmp_path / "mask.safetensors", "--steps", "2")
    argv += [flag, str(root / where)] if flag != "--out" else []
    if flag == "--out":
        argv[argv.index("--out") + 1] = str(root / where)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {flag}" in err and ("is --" in err or "inside --" in err) and not loads, err
    assert sorted((str(p), p.read_bytes()) for p in root.rglob("*") if p.is_file()) == before
