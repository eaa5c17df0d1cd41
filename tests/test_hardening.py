"""Issue 15: nothing lost, no silent unfreezing. One section per numbered finding; each test
reproduces the finding (it failed before the fix) and checks the fixed behaviour."""
from __future__ import annotations

import json
import os
import stat
import sys
import tracemalloc

import pytest
import torch

import freezeguard as fg
from freezeguard.cli import main
from freezeguard.core.mask_files import FreezeMaskFileError

diffusers = pytest.importorskip("diffusers")
testing = pytest.importorskip("support.tiny_models")

pytestmark = pytest.mark.usefixtures("one_thread")


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def grads(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny SD pipeline, a fine-tune of it and two image folders."""
    from freezeguard.integrations.diffusers.pipeline import load_components, save_pipeline_with_unet

    root = tmp_path_factory.mktemp("h15")
    pre = testing.build_tiny_sd_pipeline(root / "pre", seed=0)
    unet = load_components(pre).unet
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02)
    ft = save_pipeline_with_unet(pre, root / "ft", unet)
    target = testing.write_tiny_imagefolder(root / "target", n=4, caption="sks stripes", seed=1, style="stripes")
    innocent = testing.write_tiny_imagefolder(root / "innocent", n=4, caption="a checker", seed=2, style="checker")
    return {"root": root, "pre": pre, "ft": ft, "target": target, "innocent": innocent}


def _no_matplotlib(monkeypatch):
    """Make `import matplotlib` fail (and find_spec say it is absent), as on an install without it."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


# ---------------------------------------------------------------------------------------------
# 1. Finished work thrown away when matplotlib is missing

def test_1_demo_without_matplotlib_keeps_every_result(tmp_path, capsys, monkeypatch):
    _no_matplotlib(monkeypatch)
    out = tmp_path / "report"
    rc = main(["demo", "--quick", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed" in captured.err
    assert "learned" in captured.out and "report written to" in captured.out
    for f in ("report.md", "summary.json", "runs.json", "learned_mask.safetensors"):
        assert (out / f).stat().st_size > 0, f
    assert not (out / "loss_curves.png").exists()
    assert "No PNGs" in (out / "report.md").read_text()
    fg.FreezeMask.load(out / "learned_mask.safetensors")


def test_1_learn_without_matplotlib_writes_mask_and_json(pipeline, tmp_path, capsys, monkeypatch):
    _no_matplotlib(monkeypatch)
    out = tmp_path / "mask.safetensors"
    rc = main(_learn_argv(pipeline, out, "--steps", "2", "--json"))
    assert rc == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["plot"] is None and summary["out"] == str(out)
    assert "matplotlib is not installed" in captured.err
    fg.FreezeMask.load(out)
    assert not (tmp_path / "mask.safetensors.png").exists()


def test_1_evaluate_report_without_matplotlib(tmp_path, monkeypatch):
    from freezeguard.apps.evaluate.harness import Attacker, evaluate_masks
    from freezeguard.apps.evaluate.report import write_report
    from freezeguard.apps.evaluate.toy_domains import toy_domains
    from freezeguard.integrations.diffusers import toy

    model = toy.build_model(toy.ToyModelConfig(block_out_channels=(8, 16), attention_head_dim=4, norm_num_groups=4))
    masks = {"full": None, "learned": fg.FreezeMask.random(model, 0.5, seed=0)}
    domains = toy_domains(heldout_n=2, batch_size=2)
    res = evaluate_masks(model, masks, domains, toy.make_loss_fn(), [Attacker("std", 1e-3, 1)], curve_points=1,
                         progress=False)
    _no_matplotlib(monkeypatch)
    with pytest.warns(RuntimeWarning, match="matplotlib is not installed"):
        out = write_report(res, res.summary(), tmp_path / "rep", mask=masks["learned"])
    for f in ("report.md", "summary.json", "runs.json", "learned_mask.safetensors"):
        assert (out / f).stat().st_size > 0, f


def test_1_evaluate_warns_before_long_work(tmp_path, capsys, monkeypatch):
    from freezeguard.integrations.diffusers import toy

    calls = []
    monkeypatch.setattr(toy, "pretrained_model", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(
        RuntimeError("stop here")))
    _no_matplotlib(monkeypatch)
    fg.FreezeMask.random(toy.build_model(), 0.3, seed=0).save(tmp_path / "m.safetensors")
    with pytest.raises(RuntimeError, match="stop here"):
        main(["evaluate", "--mask", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "rep"), "--quiet"])
    assert calls and "matplotlib is not installed" in capsys.readouterr().err


def test_1_bench_checks_matplotlib_and_outputs_before_measuring(tmp_path, capsys, monkeypatch):
    from freezeguard.apps import bench

    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured")))
    _no_matplotlib(monkeypatch)
    assert main(["bench", "--quick", "--png", str(tmp_path / "b.png")]) == 2
    assert "--png needs matplotlib" in capsys.readouterr().err
    assert main(["bench", "--quick", "--json", str(tmp_path / "missing" / "b.json")]) == 2
    assert "--json" in (err := capsys.readouterr().err) and "does not exist" in err


# ---------------------------------------------------------------------------------------------
# 2. A loaded optimizer state (or a param group) can move the freeze

def _two_layers_first_weight_frozen():
    """(model, mask, optimizer): two Linear(3, 3), "0.weight" frozen, names bound by fg.optim.AdamW."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    mask = fg.FreezeMask.from_names(model, ["0.weight"])
    return model, mask, fg.optim.AdamW(model.named_parameters(), lr=0.1, mask=mask)


def test_2_state_dict_with_swapped_names_cannot_move_the_freeze():
    model, mask, opt = _two_layers_first_weight_frozen()
    grads(model)
    opt.step()
    sd = opt.state_dict()
    names = sd["param_groups"][0]["param_names"]
    i, j = names.index("0.weight"), names.index("1.weight")
    names[i], names[j] = names[j], names[i]  # same shapes: torch would take these names as the truth
    fresh = fg.optim.AdamW(model.named_parameters(), lr=0.1, mask=mask)
    with pytest.raises(ValueError, match="param_names do not match"):
        fresh.load_state_dict(sd)
    frozen = model[0].weight.detach().clone()
    grads(model, 1)
    fresh.step()
    assert torch.equal(model[0].weight, frozen)
    assert fresh.param_groups[0]["param_names"][i] == "0.weight"


def test_2_names_are_bound_to_parameter_objects():
    model, mask, opt = _two_layers_first_weight_frozen()
    names = opt.param_groups[0]["param_names"]
    i, j = names.index("0.weight"), names.index("1.weight")
    names[i], names[j] = names[j], names[i]  # rewriting the group's names does not unfreeze
    frozen = model[0].weight.detach().clone()
    grads(model)
    opt.step()
    assert torch.equal(model[0].weight, frozen)


def test_2_param_group_aliasing_a_frozen_tensor_is_refused():
    model, mask, opt = _two_layers_first_weight_frozen()
    alias = torch.nn.Parameter(model[0].weight.data[1:])  # shares the frozen tensor's storage
    with pytest.raises(ValueError, match="shares memory with a frozen tensor"):
        opt.add_param_group({"params": [("extra", alias)]})
    assert len(opt.param_groups) == 1
    ok = torch.nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [("extra", ok)]})  # unrelated memory is fine


def test_2_state_aliasing_a_frozen_tensor_is_refused():
    model, mask, opt = _two_layers_first_weight_frozen()
    grads(model)
    opt.step()
    sd = opt.state_dict()
    k = sd["param_groups"][0]["param_names"].index("1.weight")
    sd["state"][k]["exp_avg"] = model[0].weight.data  # the state *is* the frozen tensor
    with pytest.raises(ValueError, match="shares memory with a frozen tensor"):
        opt.load_state_dict(sd)


def test_2_mask_shapes_are_checked():
    model = small_model()
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    mask = fg.FreezeMask.from_names(other, ["0.weight"])  # same names, other shapes
    with pytest.raises(ValueError, match="different model"):
        fg.optim.AdamW(model.named_parameters(), lr=0.1, mask=mask)


# ---------------------------------------------------------------------------------------------
# 3. verify accepts a mask made for another model

def test_3_verify_refuses_a_mask_for_another_model(tmp_path, capsys):
    from safetensors.torch import save_file

    released = small_model()
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2), torch.nn.Linear(2, 2))
    fg.FreezeMask.from_names(other, ["0.bias"]).save(tmp_path / "other.safetensors")
    fg.FreezeMask.from_names(released, ["0.bias"]).save(tmp_path / "mask.safetensors")
    save_file({k: v.contiguous() for k, v in released.state_dict().items()}, str(tmp_path / "rel.safetensors"))
    save_file({k: v.contiguous() for k, v in released.state_dict().items()}, str(tmp_path / "ft.safetensors"))
    argv = ["verify", "--released", str(tmp_path / "rel.safetensors"), "--finetuned", str(tmp_path / "ft.safetensors")]
    assert main(argv + ["--mask", str(tmp_path / "mask.safetensors")]) == 0
    capsys.readouterr()
    assert main(argv + ["--mask", str(tmp_path / "other.safetensors")]) == 2
    assert "made for a different model" in capsys.readouterr().err
    # a mask for a bigger model (extra layers, the same names otherwise) is refused as well
    bigger = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))
    fg.FreezeMask.from_names(bigger, ["0.bias"]).save(tmp_path / "bigger.safetensors")
    assert main(argv + ["--mask", str(tmp_path / "bigger.safetensors")]) == 2
    # and a released model with modules the mask does not know
    with pytest.raises(ValueError, match="does not know"):
        fg.verify(bigger, bigger.state_dict(), fg.FreezeMask.from_names(released, ["0.bias"]))


# ---------------------------------------------------------------------------------------------
# 4. One weights rule: safetensors only, nothing reaches an unpickler

def _copy_pipeline(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _pickle_part(folder):
    """Replace a part's safetensors weights by a pickle (that must never be loaded)."""
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_4_no_part_of_a_pipeline_reaches_an_unpickler(pipeline, tmp_path, monkeypatch, part):
    from freezeguard.integrations.diffusers.pipeline import PipelineError, load_components

    pipe = _copy_pipeline(pipeline["pre"], tmp_path / "p")
    _pickle_part(pipe / part)
    if part == "text_encoder":
        (pipe / part / "diffusion_pytorch_model.bin").rename(pipe / part / "pytorch_model.bin")

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(PipelineError, match="pickle"):
        load_components(pipe)


def test_4_model_index_may_not_name_other_libraries(pipeline, tmp_path):
    from freezeguard.integrations.diffusers.pipeline import PipelineError, load_components

    pipe = _copy_pipeline(pipeline["pre"], tmp_path / "p")
    index = json.loads((pipe / "model_index.json").read_text())
    index["vae"] = ["pickle", "Unpickler"]
    (pipe / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineError, match="only loads classes from"):
        load_components(pipe)


@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_4_finetune_and_evaluate_refuse_pickled_unets(pipeline, tmp_path, capsys, command):
    pipe = _copy_pipeline(pipeline["pre"], tmp_path / "p")
    _pickle_part(pipe / "unet")
    mask = tmp_path / "m.safetensors"
    fg.FreezeMask.random(testing.build_tiny_unet(), 0.3, seed=0).save(mask)
    if command == "finetune":
        argv = ["finetune", "--model", str(pipe), "--train-data", str(pipeline["target"]), "--out",
                str(tmp_path / "out"), "--steps", "1", "--quiet"]
    else:
        argv = ["evaluate", "--pretrained", str(pipe), "--mask", str(mask), "--target-data",
                str(pipeline["target"]), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# 5. evaluate: late checks and tracebacks

@pytest.mark.parametrize("bad, message", [
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--steps", "-1"], "--steps must be >= 1"),
    (["--random-seeds", "-2"], "--random-seeds must be >= 0"),
    (["--attack-seeds", "0"], "--attack-seeds must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--mask", "MISSING"], "does not exist"),
    (["--mask", "OTHER"], "made for a different model"),
    (["--target-data", "x"], "need --pretrained"),
])
def test_5_evaluate_checks_every_input_before_any_work(tmp_path, capsys, monkeypatch, bad, message):
    from freezeguard.integrations.diffusers import judge, toy

    def no_work(*a, **k):
        raise AssertionError("long work started before the inputs were checked")

    monkeypatch.setattr(toy, "pretrained_model", no_work)
    monkeypatch.setattr(judge, "train_judge", no_work)
    fg.FreezeMask.random(toy.build_model(), 0.3, seed=0).save(tmp_path / "m.safetensors")
    fg.FreezeMask.random(small_model(), 0.3, seed=0).save(tmp_path / "other.safetensors")
    argv = ["evaluate", "--mask", str(tmp_path / "m.safetensors"), "--quiet", *bad]
    argv = [str(tmp_path / "nope.safetensors") if a == "MISSING" else str(tmp_path / "other.safetensors")
            if a == "OTHER" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("bad", [["--weight-decay", "nan"], ["--lr", "inf"], ["--resolution", "0"], ["--steps", "0"]])
def test_5_finetune_checks_its_inputs_first(pipeline, tmp_path, capsys, bad):
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(pipeline["pre"]), "--train-data", str(pipeline["target"]), "--out", str(out),
            "--quiet", *bad]
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err and not out.exists()


def test_5_strong_multiplier_nan_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--mask", str(tmp_path / "m.safetensors"), "--strong-lr-mult", "nan"])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------
# 6. Overwrites that can lose the old result; a mask file read whole before its header

def test_6_finetune_failure_keeps_the_previous_unet(pipeline, tmp_path, monkeypatch):
    from freezeguard.integrations.diffusers import pipeline as pipe_mod

    out = tmp_path / "out"
    unet = pipe_mod.load_components(pipeline["pre"]).unet
    pipe_mod.save_pipeline_with_unet(pipeline["pre"], out, unet)
    before = {p.name: p.read_bytes() for p in (out / "unet").iterdir()}

    def broken(unet, path):
        (path / "partial.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(pipe_mod, "save_unet", broken)
    with pytest.raises(OSError, match="disk full"):
        pipe_mod.save_pipeline_with_unet(pipeline["pre"], out, unet)
    assert {p.name: p.read_bytes() for p in (out / "unet").iterdir()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".unet")]  # no temporary left behind


def test_6_finetune_cli_log_replaced_only_on_success(pipeline, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(pipeline["pre"]), "--train-data", str(pipeline["target"]), "--out", str(out),
            "--steps", "1", "--batch-size", "2", "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    log = (out / "finetune_log.jsonl").read_text()
    unet = {p.name: p.read_bytes() for p in (out / "unet").iterdir()}
    assert log
    from freezeguard.apps import finetune as app

    def diverges(*a, log=None, **k):
        log({"step": 0, "loss": 1.0, "target_loss": 1.0, "innocent_loss": float("nan")})
        raise FloatingPointError("loss became NaN at step 1")

    monkeypatch.setattr(app, "finetune", diverges)
    assert main(argv) == 2  # a run that fails half-way
    assert "NaN" in capsys.readouterr().err
    assert (out / "finetune_log.jsonl").read_text() == log
    assert {p.name: p.read_bytes() for p in (out / "unet").iterdir()} == unet
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_6_learner_state_write_is_unique_and_fsynced(tmp_path, monkeypatch):
    from freezeguard.apps.learn import state_io

    path = tmp_path / "state.safetensors"
    (tmp_path / "state.safetensors.tmp").mkdir()  # the old fixed temporary name is taken
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    state_io.write(path, {"logits": torch.zeros(3)}, {"format": state_io.FORMAT})
    assert synced
    tensors, meta = state_io.read(path)
    assert tensors["logits"].tolist() == [0.0, 0.0, 0.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors", "state.safetensors.tmp"]


def test_6_a_huge_mask_file_is_refused_from_its_header(tmp_path):
    model = small_model()
    path = tmp_path / "mask.safetensors"
    fg.FreezeMask.from_names(model, ["0.bias"]).save(path)
    with open(path, "r+b") as f:
        f.truncate(256 * 2**20)  # a sparse 256 MiB file with a valid mask header
    tracemalloc.start()
    try:
        with pytest.raises(FreezeMaskFileError, match="not a valid mask file"):
            fg.FreezeMask.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, peak


# ---------------------------------------------------------------------------------------------
# 7. Resume surprises

def _learn_argv(a, out, *extra):
    return ["learn", "--pretrained", str(a["pre"]), "--finetuned", str(a["ft"]), "--target-data", str(a["target"]),
            "--innocent-data", str(a["innocent"]), "--freeze-ratio", "0.25", "--out", str(out), "--quiet",
            "--user-lr", "1e-3", "--user-interval", "2", "--backend", "torch", "--preset", "authors",
            "--c-sparsity", "auto", *extra]


def test_7_resume_refuses_changed_hyperparameters(pipeline, tmp_path, capsys, monkeypatch):
    state = tmp_path / "state.safetensors"
    out = tmp_path / "m.safetensors"
    assert main(_learn_argv(pipeline, out, "--steps", "2", "--state", str(state))) == 0
    capsys.readouterr()
    from freezeguard.apps.learn import run as learn_run

    loaded = []
    real = learn_run.load_components
    monkeypatch.setattr(learn_run, "load_components", lambda *a, **k: loaded.append(1) or real(*a, **k))
    for flag, value in (("--mask-lr", "50"), ("--c-sparsity", "7"), ("--temperature", "0.5"),
                        ("--user-optimizer", "adamw")):
        rc = main(_learn_argv(pipeline, out, "--steps", "4", "--resume", str(state), "--state", str(state),
                              flag, value))
        assert rc == 2, flag
        assert f"{flag}" in capsys.readouterr().err
    assert not loaded  # refused from the state file's metadata, before any model was loaded
    # an explicit flag overrides the overridable ones, with a warning
    rc = main(_learn_argv(pipeline, out, "--steps", "3", "--resume", str(state), "--state", str(state),
                          "--mask-lr", "50", "--override-hparams"))
    assert rc == 0
    assert "--override-hparams: --mask-lr 10.0 from the state is replaced by 50.0" in capsys.readouterr().err
    from freezeguard.apps.learn.state_io import saved_hparams

    hp, steps = saved_hparams(state)
    assert hp["mask_lr"] == 50.0 and steps == 3
    for flag, value in (("--user-optimizer", "adamw"), ("--innocent-weight", "0.5")):
        rc = main(_learn_argv(pipeline, out, "--steps", "4", "--resume", str(state), "--state", str(state),
                              flag, value, "--override-hparams"))
        assert rc == 2 and "cannot change on resume" in capsys.readouterr().err, flag


def test_7_every_learner_setting_is_either_fixed_or_overridable_on_resume():
    import dataclasses

    from freezeguard.apps.learn.config import LearnerConfig
    from freezeguard.apps.learn.run import FIXED, OVERRIDABLE

    assert not set(FIXED) & set(OVERRIDABLE)
    assert set(FIXED) | set(OVERRIDABLE) == {f.name for f in dataclasses.fields(LearnerConfig)}


def test_7_log_does_not_repeat_steps_after_the_checkpoint(pipeline, tmp_path):
    state, out = tmp_path / "state.safetensors", tmp_path / "m.safetensors"
    log = tmp_path / "m.safetensors.log.jsonl"
    assert main(_learn_argv(pipeline, out, "--steps", "2", "--state", str(state))) == 0
    # the run went on to log steps 2 and 3 (and half a line) before it was killed, unsaved
    with open(log, "a") as f:
        f.write(json.dumps({"step": 2}) + "\n" + json.dumps({"step": 3}) + "\n" + '{"step": 4, "ki')
    assert main(_learn_argv(pipeline, out, "--steps", "4", "--resume", str(state), "--state", str(state))) == 0
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [0, 1, 2, 3]


@pytest.mark.parametrize("clash", ["--state", "--log", "--plot"])
def test_7_outputs_must_not_overwrite_each_other(pipeline, tmp_path, capsys, clash):
    out = tmp_path / "m.safetensors"
    assert main(_learn_argv(pipeline, out, "--steps", "1", clash, str(out))) == 2
    assert "same file" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 8. Small inconsistencies

def test_8_mask_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        fg.FreezeMask.from_names(small_model(), ["0.bias"]).save(tmp_path / "m.safetensors")
        from freezeguard.apps.learn import state_io

        state_io.write(tmp_path / "s.safetensors", {"logits": torch.zeros(1)}, {"format": state_io.FORMAT})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "s.safetensors").stat().st_mode) == 0o644


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")
@pytest.mark.parametrize("frozen", ["bias", "weight", "both"])
@pytest.mark.parametrize("lora_bias", [False, True])
def test_8_wrap_and_verify_agree_on_adapters(frozen, lora_bias):
    peft = pytest.importorskip("peft")
    from freezeguard.core.adapter_rule import AdapterRule
    from freezeguard.core.adapters import frozen_adapters
    from freezeguard.core.names import FrozenAdapterError, canonical_name

    unet = testing.build_tiny_unet(cross_attention_dim=8)
    released = {k: v.clone() for k, v in unet.state_dict().items()}
    suffixes = {"bias": (".bias",), "weight": (".weight",), "both": (".weight", ".bias")}[frozen]
    names = [n for n, _ in unet.named_parameters() if ".attn1.to_out.0" in n and n.endswith(suffixes)]
    mask = fg.FreezeMask.from_names(unet, names)
    unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights=True, lora_bias=lora_bias,
                                     target_modules=["to_q", "to_out.0"]))
    refused = {canonical_name(m) for m in frozen_adapters(unet, mask)}
    adapters = {n: p.detach() for n, p in unet.named_parameters() if "lora_" in n}
    report = fg.verify(released, adapters, mask)
    flagged = {canonical_name(k.split(".lora_")[0]) for k, _ in report.lora_violations}
    # guard and verify apply one rule (core.adapter_rule): an adapter on a module owning any frozen
    # tensor is a violation, whatever the tuner type and whichever tensor is frozen (a LoRA "only on
    # the weight" still changes what a module with a frozen bias computes)
    rule = AdapterRule(mask)
    targeted = {canonical_name(n.split(".lora_")[0]) for n in adapters}
    assert refused == {n.rsplit(".", 1)[0] for n in names}
    assert flagged == {m for m in targeted if rule.frozen_under(m)} and flagged
    assert refused == flagged
    params = [p for p in unet.parameters() if p.requires_grad]
    with pytest.raises(FrozenAdapterError, match=r"attn1\.to_out\.0"):
        fg.wrap(torch.optim.AdamW(params, lr=1e-3), mask, unet)


def test_8_load_with_a_peft_model_maps_released_names(tmp_path):
    peft = pytest.importorskip("peft")
    unet = testing.build_tiny_unet(cross_attention_dim=8)
    mask = fg.FreezeMask.random(unet, 0.3, seed=0)
    mask.save(tmp_path / "m.safetensors")
    unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"]))
    loaded = fg.FreezeMask.load(tmp_path / "m.safetensors", model=unet)
    assert loaded == mask
    other = testing.build_tiny_unet(cross_attention_dim=16)
    with pytest.raises(FreezeMaskFileError, match="different model"):
        fg.FreezeMask.load(tmp_path / "m.safetensors", model=other)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_8_from_scores_refuses_non_finite_scores(bad):
    model = small_model()
    scores = {n: float(i) for i, (n, _) in enumerate(model.named_parameters())}
    scores["0.bias"] = bad
    with pytest.raises(ValueError, match="finite"):
        fg.FreezeMask.from_scores(model, scores, ratio=0.5)


# ---------------------------------------------------------------------------------------------
# 9. README and report

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _readme_section(title: str) -> str:
    text = open(README, encoding="utf-8").read()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 3)
    return text[start:end if end > 0 else None]


def _inline_calls(section: str) -> list[str]:
    """Inline code of a section that is a Python call (what a reader would paste)."""
    import ast
    import re

    fenced = re.sub(r"```.*?```", "", section, flags=re.S)
    out = []
    for code in re.findall(r"`([^`\n]+)`", fenced):
        if "(" not in code:
            continue
        try:
            ast.parse(code)
        except SyntaxError:
            continue
        out.append(code)
    return out


def test_9_readme_guard_snippets_run_as_written(tmp_path, monkeypatch):
    """The fenced snippet and every inline call of "Guard your fine-tuning script", as written, on a tiny
    UNet with the argument names of diffusers' train_text_to_image.py (non-default betas and eps)."""
    import argparse
    import re

    peft = pytest.importorskip("peft")
    section = _readme_section("Guard your fine-tuning script")
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    inline = _inline_calls(section)
    assert blocks and len(inline) >= 3, inline
    monkeypatch.chdir(tmp_path)
    unet = testing.build_tiny_unet(cross_attention_dim=8)
    fg.FreezeMask.random(unet, 0.3, seed=0).save("mask.safetensors")
    args = argparse.Namespace(learning_rate=1e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6,
                              adam_weight_decay=0.03)
    accelerate = pytest.importorskip("accelerate")
    ns = {"unet": unet, "args": args, "torch": torch, "LoraConfig": peft.LoraConfig,
          "text_encoder": torch.nn.Linear(8, 8),  # a model the mask does not cover (fg.wrap's others=)
          "FullyShardedDataParallelPlugin": accelerate.utils.FullyShardedDataParallelPlugin}
    # CUDA-graph snippets need a GPU (tests/test_capturable.py covers them there); "..." marks an elision
    runnable = [c for c in blocks if "cuda" not in c]
    assert runnable
    for code in runnable:
        exec(compile(code, "README.md", "exec"), ns)
    group = ns["optimizer"].param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 and group["weight_decay"] == 0.03
    for code in inline:
        if "cuda" in code or "..." in code:
            continue
        exec(compile(code, "README.md", "exec"), ns)


def test_9_readme_verify_command_runs_as_written(pipeline, tmp_path, capsys):
    """`freezeguard verify --released SD_DIR --finetuned FT_DIR --mask mask.safetensors` from the README."""
    import shlex

    section = _readme_section("Guard your fine-tuning script")
    line = next(c for c in _all_inline(section) if c.startswith("freezeguard verify"))
    from freezeguard.integrations.diffusers.pipeline import load_components

    fg.FreezeMask.random(load_components(pipeline["pre"]).unet, 0.3, seed=0).save(tmp_path / "mask.safetensors")
    words = shlex.split(line)[1:]
    subst = {"SD_DIR": str(pipeline["pre"]), "FT_DIR": str(pipeline["ft"]),
             "mask.safetensors": str(tmp_path / "mask.safetensors")}
    assert main([subst.get(w, w) for w in words]) == 1  # the fine-tune changed every tensor: violations
    assert "VIOLATION" in capsys.readouterr().out


def _all_inline(section: str) -> list[str]:
    import re

    return re.findall(r"`([^`\n]+)`", section)


def test_9_readme_has_a_security_section():
    text = _readme_section("Security")
    for phrase in ("verify", "own code", "platform", "exit 0"):
        assert phrase in text, phrase


def test_9_evaluate_defaults_are_the_demos(tmp_path):
    from freezeguard.apps.demo import DemoConfig
    from freezeguard.cli import build_parser
    from freezeguard.cli.evaluate import DEMO_DEFAULTS, check_args, demo_defaults
    from freezeguard.integrations.diffusers import toy

    args = build_parser().parse_args(["evaluate", "--mask", str(tmp_path / "m.safetensors")])
    given = demo_defaults(args)
    demo = DemoConfig()
    for arg, field in DEMO_DEFAULTS.items():
        assert given[arg] == getattr(demo, field), arg
    # the random masks match the mask on the basis it was made on (the demo's: tensors)
    fg.FreezeMask.random(toy.build_model(), demo.learner.freeze_ratio, by=demo.learner.budget_by, seed=0).save(
        tmp_path / "m.safetensors")
    args = build_parser().parse_args(["evaluate", "--mask", str(tmp_path / "m.safetensors")])
    parsed = vars(args).copy()
    settings = check_args(args)
    assert vars(args) == parsed  # the checks return what they fill in; the parsed arguments stay as given
    assert settings.budget_by == demo.learner.budget_by
    for arg, field in (("lr", "attacker_lr"), ("steps", "attacker_steps"), ("batch_size", "batch_size"),
                       ("random_seeds", "random_seeds"), ("samples", "sample_n"), ("sample_steps", "sample_steps")):
        assert getattr(settings, arg) == getattr(demo, field), arg
    assert settings.out == "freezeguard-report" and settings.toy_world == demo
    assert check_args(build_parser().parse_args(["evaluate", "--mask", str(tmp_path / "m.safetensors"),
                                                 "--out", "none"])).out is None  # 'none': no report
    from freezeguard.apps.demo import attackers as demo_attackers

    assert list(settings.attackers) == demo_attackers(demo)


def test_9_gitignore_has_the_demo_folder():
    root = os.path.dirname(README)
    assert "freezeguard-demo/" in open(os.path.join(root, ".gitignore")).read().split()


def test_9_report_defines_recognisability_shows_real_images_and_no_negative_share(tmp_path):
    from freezeguard.apps.evaluate.harness import Attacker, evaluate_masks
    from freezeguard.apps.evaluate.report import plot_samples, survival_line, write_report
    from freezeguard.apps.evaluate.toy_domains import toy_domains
    from freezeguard.integrations.diffusers import judge, toy

    model = toy.build_model(toy.ToyModelConfig(block_out_channels=(8, 16), attention_head_dim=4, norm_num_groups=4))
    masks = {"full": None, "learned": fg.FreezeMask.random(model, 0.5, seed=0)}
    j = judge.train_judge(steps=2, cache_dir=False, progress=False)
    domains = toy_domains(judge=j, heldout_n=2, sample_n=2, sample_steps=2, batch_size=2)
    res = evaluate_masks(model, masks, domains, toy.make_loss_fn(), [Attacker("std", 1e-3, 1)], curve_points=1,
                         progress=False)
    assert set(res.real_images) == {d.name for d in domains}
    summary = res.summary()
    summary["learner"] = {"final": {}}
    out = write_report(res, summary, tmp_path / "rep")
    md = (out / "report.md").read_text()
    assert "*Recognisability* = the mean probability a judge classifier" in md
    assert "real held-out images" in md and "`m>0.5=`" in md and "hard" in md
    import matplotlib.pyplot as plt

    shown = []
    real_subplots = plt.subplots

    def spy(*a, **k):
        fig, axes = real_subplots(*a, **k)
        shown.append(axes)
        return fig, axes

    plt.subplots = spy
    try:
        plot_samples(res, tmp_path / "s.png")
    finally:
        plt.subplots = real_subplots
    labels = [ax.get_ylabel() for ax in shown[0][:, 0]]
    assert labels[0].startswith("real") and any(lb.startswith("before") for lb in labels)
    # a negative "share kept" is not printed as a percentage
    summary = {"table": {"10x lr": {"learned": {"mitigation": -0.036}}}}
    line = survival_line(summary, "10x lr", -0.109)
    assert "-10.9%" not in line and "none of the learned mask's mitigation survives" in line
    assert "85%" in survival_line(summary, "10x lr", 0.85)


def test_9_setup_is_quick_the_second_time_and_warning_free(tmp_path):
    import subprocess
    import time

    root = os.path.dirname(README)
    started = time.perf_counter()
    proc = subprocess.run(["bash", "scripts/setup.sh", "--check"], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # this checkout was set up: nothing to redo
    assert time.perf_counter() - started < 30
    # setuptools reads pyproject.toml and lays out the packages without a deprecation warning
    env = {**os.environ, "FREEZEGUARD_SKIP_BUILD": "1"}
    proc = subprocess.run([sys.executable, "-W", "always", "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                           "build_py", "-d", str(tmp_path / "b")], cwd=root, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert "Deprecat" not in text and "absent from the `packages`" not in text, text[-3000:]
    assert (tmp_path / "b" / "freezeguard" / "_csrc" / "cpu" / "inner_loops.cpp").is_file()


def test_9_readme_publisher_workflow_runs_as_written(tmp_path, monkeypatch, capsys):
    """The walkthrough of "The publisher's workflow", every command exactly as written (nothing appended),
    in an empty folder: example-pipeline, finetune, learn, evaluate, a guarded finetune, verify."""
    import re
    import shlex

    block = re.search(r"```bash\n(.*?)```", _readme_section("The publisher's workflow"), flags=re.S).group(1)
    commands = [c.split("#")[0].strip() for c in block.replace("\\\n", " ").splitlines()]
    commands = [c for c in commands if c]
    assert [shlex.split(c)[1] for c in commands] == ["example-pipeline", "finetune", "learn", "evaluate",
                                                     "finetune", "verify"]
    monkeypatch.chdir(tmp_path)
    for command in commands:
        words = shlex.split(command)
        assert words[0] == "freezeguard"
        assert main(words[1:]) == 0, command
    out = capsys.readouterr().out
    assert fg.FreezeMask.load("example/mask.safetensors").ratio("params") == pytest.approx(0.5, abs=0.02)
    assert "learned" in out and (tmp_path / "example" / "report" / "report.md").is_file()
    assert "OK:" in out  # verify: the guarded fine-tune kept every frozen tensor