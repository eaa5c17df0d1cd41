"""Every command checks its outputs before any work: writable, and never over or inside an input (exit 2)."""
from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from support.tiny_models import build_tiny_sd_pipeline, write_tiny_imagefolder  # noqa: E402

import freezeguard as fg  # noqa: E402
from freezeguard.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("outs")
    pipe = build_tiny_sd_pipeline(root / "sd", seed=0)
    target = write_tiny_imagefolder(root / "t", n=4, caption="a photo of sks", seed=0, style="checker")
    from freezeguard.integrations.diffusers import load_components

    mask = root / "m.safetensors"
    fg.FreezeMask.random(load_components(pipe).unet, 0.5, by="tensors", seed=0).save(str(mask))
    return {"root": root, "pipe": pipe, "target": target, "mask": mask}


def _files(root):
    return sorted((str(p), p.stat().st_size) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("where,said", [("t/report", "lies inside --target-data"), ("sd", "is --pretrained"),
                                        ("m.safetensors", "exists and is not a folder"),
                                        ("sd/unet/report", "lies inside --pretrained")])
def test_evaluate_refuses_a_report_over_or_inside_its_inputs(world, capsys, monkeypatch, where, said):
    from freezeguard.integrations.diffusers import pipeline

    monkeypatch.setattr(pipeline, "load_components", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work")))
    before = _files(world["root"])
    argv = ["evaluate", "--mask", str(world["mask"]), "--pretrained", str(world["pipe"]), "--target-data",
            str(world["target"]), "--quiet", "--out", str(world["root"] / where)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: --out {world['root'] / where}" in err and said in err, err
    assert _files(world["root"]) == before


def test_evaluate_writes_its_report_by_default():
    from freezeguard.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--mask", "m.safetensors"])
    assert args.out == "freezeguard-report"
    assert build_parser().parse_args(["evaluate", "--mask", "m", "--out", "none"]).out == "none"
