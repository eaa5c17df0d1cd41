"""The publisher's and the user's commands on SDXL, SD3 and Flux pipeline folders (tiny, offline).

Per family: `freezeguard finetune` (the publisher's full fine-tune), `freezeguard learn` on it,
`freezeguard finetune --mask` (a guarded user fine-tune), and `freezeguard verify`, which passes
the guarded fine-tune and flags the full one. The text conditioning comes from each pipeline's own
``encode_prompt`` (two CLIPs for SDXL, two CLIPs without T5 for SD3, CLIP + T5 for Flux).
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
testing = pytest.importorskip("support.tiny_models")

from freezeguard.cli import main  # noqa: E402
from freezeguard.core.mask import FreezeMask  # noqa: E402
from freezeguard.integrations.diffusers.models import family_of  # noqa: E402
from freezeguard.integrations.diffusers.pipeline import load_components  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"target": testing.write_tiny_imagefolder(root / "t", n=4, caption="a photo of sks stripes", seed=1),
            "innocent": testing.write_tiny_imagefolder(root / "i", n=4, caption="a checker", seed=2, style="checker")}


def _pipeline(family, path):
    if family != "sd21":
        return testing.build_tiny_family_pipeline(family, path, seed=0)
    # SD-2.x: the SD-1.x layout (one CLIP text encoder) trained with v-prediction
    pre = testing.build_tiny_sd_pipeline(path, seed=0)
    cfg_path = pre / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), prediction_type="v_prediction")))
    return pre


@pytest.mark.parametrize("family", ["sd21", "sdxl", "sd3", "flux"])
def test_finetune_learn_guard_verify(family, data, tmp_path, capsys):
    pre = _pipeline(family, tmp_path / "pre")
    comps = load_components(pre)
    objective = comps.loss_fn().prediction_type
    assert objective == {"sd21": "v_prediction", "sdxl": "epsilon"}.get(family, "flow_matching")
    assert family_of(comps.unet, objective).name == family
    assert (comps.prompt_encoder is None) == (family == "sd21")
    sub = comps.subfolder
    assert sub == ("unet" if family in ("sd21", "sdxl") else "transformer")
    common = ["--train-data", str(data["target"]), "--innocent-data", str(data["innocent"]), "--steps", "2",
              "--batch-size", "2", "--quiet", "--json", "--device", "cpu"]

    assert main(["finetune", "--model", str(pre), "--out", str(tmp_path / "ft"), "--lr", "1e-3", *common]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["steps"] == 2 and full["frozen_tensors"] == 0 and all(x is not None for x in full["losses"])

    mask_path = tmp_path / "mask.safetensors"
    assert main(["learn", "--pretrained", str(pre), "--finetuned", str(tmp_path / "ft"), "--target-data",
                 str(data["target"]), "--innocent-data", str(data["innocent"]), "--freeze-ratio", "0.3",
                 "--out", str(mask_path), "--steps", "2", "--batch-size", "2", "--user-interval", "2", "--quiet",
                 "--json", "--device", "cpu", "--preset", "authors"]) == 0
    learned = json.loads(capsys.readouterr().out)
    mask = FreezeMask.load(mask_path, model=comps.unet)
    assert learned["frozen_tensors"] == len(mask.frozen_names) == round(0.3 * learned["tensors"])

    guarded = tmp_path / "guarded"
    assert main(["finetune", "--model", str(pre), "--out", str(guarded), "--mask", str(mask_path), "--lr", "1e-3",
                 *common]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["frozen_tensors"] == len(mask.frozen_names)
    assert (guarded / sub / "config.json").is_file()
    tuned = load_components(guarded).unet.state_dict()
    released = comps.unet.state_dict()
    assert all(torch.equal(tuned[n], released[n]) for n in mask.frozen_names)
    assert any(not torch.equal(tuned[n], released[n]) for n in mask.trainable_names)

    assert main(["verify", "--released", str(pre), "--finetuned", str(guarded), "--mask", str(mask_path)]) == 0
    assert main(["verify", "--released", str(pre), "--finetuned", str(tmp_path / "ft"), "--mask", str(mask_path)]) == 1
