"""`freezeguard bench` on a tiny UNet: the measurements and the CLI outputs."""
from __future__ import annotations

import json

import pytest

import freezeguard as fg
from freezeguard.apps.bench import _measure_isolated, configs, run_bench
from freezeguard.apps.bench_step import check_config, measure
from freezeguard.cli import main as cli_main
from freezeguard.integrations.diffusers.bench_presets import build_unet

TINY = dict(model="tiny", latent=8, steps=1, warmup=1)


def test_guarded_step_allocates_nothing_for_frozen_tensors():
    full = measure(dict(TINY, mode="full"))
    guard = measure(dict(TINY, mode="guard", ratio=0.5, by="params"))
    unet = build_unet("tiny")
    mask = fg.FreezeMask.random(unet, ratio=0.5, by="params", seed=0)
    trainable = sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if not mask.is_frozen(n))
    assert full["grad_bytes"] == full["param_bytes"]
    assert guard["frozen_tensors"] == len(mask.frozen_names) > 0
    # no .grad on a frozen tensor, and AdamW state (2 moments + a small step count) only for the rest
    assert guard["grad_bytes"] == trainable
    assert 2 * trainable <= guard["state_bytes"] <= 2 * trainable + 64 * guard["tensors"]
    assert guard["step_s"] > 0 and 0 < guard["opt_step_s"] <= guard["step_s"]


def test_optimizer_step_host_and_device_times():
    row = measure(dict(TINY, mode="guard", ratio=0.3))
    # host: until step() returns; on the CPU that is the whole step and there is no device time
    assert 0 < row["opt_host_s"] <= row["opt_step_s"]
    assert row["opt_device_s"] is None
    table = fg.apps.bench.format_table({"meta": {"model": "tiny", "device": "cpu", "device_name": "x", "batch": 1,
                                                 "bf16": False, "checkpointing": False, "torch": "t"},
                                        "rows": [dict(row, mode="full", impl="full", opt_host_s_vs_full=1.0,
                                                      opt_device_s_vs_full=None, step_s_vs_full=1.0,
                                                      opt_step_s_vs_full=1.0, peak_bytes_vs_full=None,
                                                      state_bytes_vs_full=1.0)]})
    assert "opt host ms" in table and "opt device ms" in table


def test_isolated_worker_reports_peak_rss():
    row = _measure_isolated(dict(TINY, mode="guard", ratio=0.3))
    assert row["peak_measure"].startswith("peak RSS") and row["peak_bytes"] > 0
    assert row["frozen_ratio_tensors"] == pytest.approx(0.3, abs=0.01)


def test_configs_start_with_the_anchor_and_skip_duplicate_empty_masks():
    cfgs = configs(ratios=(0.0, 0.5), by=("tensors", "params"), mask_path="m.safetensors", model="tiny")
    assert [c["mode"] for c in cfgs] == ["full", "guard", "guard", "guard", "guard"]
    assert [(c.get("ratio"), c.get("by")) for c in cfgs[2:]] == [(0.0, "tensors"), (0.5, "tensors"), (0.5, "params")]


@pytest.mark.parametrize("bad", [dict(mode="lora"), dict(ratio=1.0), dict(by="rows"), dict(steps=0), dict(nope=1)])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        check_config(bad)


def test_cli_writes_table_json_and_png(tmp_path, capsys):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    assert cli_main(["bench", "--model", "tiny", "--latent", "8", "--ratios", "0,0.5", "--budget-by", "tensors", "--steps", "1",
                 "--warmup", "0", "--in-process", "--json", str(out), "--png", str(png)]) == 0
    table = capsys.readouterr().out
    assert "guard 50% by tensors" in table
    res = json.loads(out.read_text())
    full, g0, g50 = res["rows"]
    assert full["step_s_vs_full"] == 1.0 and g50["state_bytes_vs_full"] < 0.75
    assert png.stat().st_size > 1000


def test_bf16_on_cpu_is_refused():
    with pytest.raises(ValueError, match="bf16"):
        run_bench(model="tiny", bf16=True, progress=False)


def test_learned_mask_file_is_measured(tmp_path):
    path = tmp_path / "mask.safetensors"
    unet = build_unet("tiny")
    mask = fg.FreezeMask.random(unet, ratio=0.4, by="tensors", seed=3)
    mask.save(path, model=unet)
    res = run_bench(model="tiny", latent=8, ratios=(), by=("tensors",), mask_path=str(path), steps=1, warmup=0,
                    isolate=False, progress=False)
    row = res["rows"][1]
    assert row["mask_path"] == str(path) and row["frozen_tensors"] == len(mask.frozen_names)


def test_quick_bench_as_a_user_runs_it(capsys):
    """`freezeguard bench --quick` end to end (~30 s on 2 cores): every configuration in the table."""
    assert cli_main(["bench", "--quick"]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| config")]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == [
        "torch.optim.AdamW(fused)", "guard 0% by tensors", "guard 30% by tensors", "guard 70% by tensors",
        "guard 30% by params", "guard 70% by params"]
    # frozen tensors own no optimizer state: the state column shrinks with the ratio
    state = [float(r.split("|")[10]) for r in rows]
    assert state[0] == state[1] > state[2] > state[3] and state[4] > state[5]


def test_quick_presets_come_back_from_the_checks_and_leave_the_arguments_as_parsed():
    from freezeguard.cli import build_parser
    from freezeguard.cli.bench import check_args

    args = build_parser().parse_args(["bench", "--quick", "--steps", "9"])
    checked = check_args(args)
    assert (checked["steps"], checked["warmup"], checked["ratios"]) == (3, 1, [0.0, 0.3, 0.7])
    assert args.steps == 9 and args.quick


# -- other model families: real steps on tiny configs, layout-only costing at full size ------------
@pytest.mark.parametrize("model", ["tiny", "sd21-tiny", "sdxl-tiny", "sd3-tiny", "flux-tiny"])
def test_layout_mode_equals_a_real_guarded_step(model):
    """What the layout mode predicts for a tiny family preset is what a real guarded step allocates."""
    from freezeguard.apps.bench import run_layout_bench

    real = measure(dict(model=model, mode="guard", ratio=0.5, by="params", steps=1, warmup=0))
    full = measure(dict(model=model, mode="full", steps=1, warmup=0))
    rows = run_layout_bench(model=model, ratios=(0.5,), by=("params",))["rows"]
    layout_full, layout_half = rows
    assert layout_half["frozen_tensors"] == real["frozen_tensors"] > 0
    assert (layout_half["grads"], layout_half["optimizer_state"]) == (real["grad_bytes"], real["state_bytes"])
    assert (layout_full["grads"], layout_full["optimizer_state"]) == (full["grad_bytes"], full["state_bytes"])
    assert layout_full["weights"] == real["param_bytes"]


FULL = {"sdxl": (1680, 2_567_463_684), "sd3": (682, 2_028_328_000), "flux": (1160, 11_901_408_320)}


def _check_layout_result(model, res):
    tensors, params = FULL[model]
    assert (res["meta"]["tensors"], res["meta"]["parameters"]) == FULL[model] and res["meta"]["layout_only"]
    rows = {(r["world_size"], r["by"], r["ratio"]): r for r in res["rows"]}
    full1, full8 = rows[(1, "tensors", 0.0)], rows[(8, "tensors", 0.0)]
    assert full1["grads"] == params * 4 and full1["optimizer_state"] == params * 8 + 4 * tensors
    assert full8["grads"] == pytest.approx(full1["grads"] / 8, rel=2e-3)
    assert rows[(1, "params", 0.7)]["saved_vs_full"] == pytest.approx(0.7, abs=0.01)
    assert 0 < rows[(1, "tensors", 0.3)]["saved_vs_full"] < rows[(1, "tensors", 0.7)]["saved_vs_full"] < 1


@pytest.mark.parametrize("model", ["sdxl", "sd3"])
def test_cli_layout_mode_for_full_size_models(model, tmp_path, capsys):
    """`freezeguard bench --model sdxl|sd3`: gradient and AdamW-state bytes saved at each ratio."""
    out = tmp_path / "layout.json"
    assert cli_main(["bench", "--model", model, "--ratios", "0,0.3,0.7", "--world-size", "1,8",
                     "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "layout only" in table and "| 8 | guard 70% by params |" in table
    _check_layout_result(model, json.loads(out.read_text()))


def test_cli_layout_mode_never_allocates_flux(tmp_path):
    """`freezeguard bench --model flux` in a fresh process: 12B parameters costed, the model never allocated."""
    import resource
    import subprocess
    import sys

    out = tmp_path / "layout.json"
    proc = subprocess.run([sys.executable, "-m", "freezeguard", "bench", "--model", "flux", "--ratios", "0,0.3,0.7",
                           "--world-size", "1,8", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # its fp32 weights alone would be 44 GiB; the whole command (torch + diffusers imported) stays below 3 GiB
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 < 3 * 2**30
    _check_layout_result("flux", json.loads(out.read_text()))


def test_layout_mode_takes_a_mask_file_and_refuses_bad_input(tmp_path, capsys):
    from freezeguard.integrations.diffusers.bench_presets import build_model

    meta = build_model("sd3", device="meta")
    mask = fg.FreezeMask.random(meta, ratio=0.4, by="params", seed=5)
    path = tmp_path / "sd3-mask.safetensors"
    mask.save(path, model=meta)
    assert cli_main(["bench", "--model", "sd3", "--mask", str(path), "--ratios", "0", "--budget-by", "params",
                     "--json", "-"]) == 0
    res = json.loads(capsys.readouterr().out)
    filed = [r for r in res["rows"] if r["mask"] == str(path)]
    assert len(filed) == 1 and filed[0]["frozen_tensors"] == len(mask.frozen_names)
    assert cli_main(["bench", "--model", "flux", "--world-size", "0"]) == 2
    assert "--world-size" in capsys.readouterr().err
    with pytest.raises(ValueError, match="layout only"):
        measure(dict(model="flux", steps=1, warmup=0))


@pytest.mark.parametrize("argv,said", [
    (["--model", "nosuch"], "--model 'nosuch'"),
    (["--ratios", "-0.3"], "--ratios must lie in [0, 1]"),
    (["--ratios", "0,abc"], "--ratios needs comma-separated numbers"),
    (["--ratios", "1.5", "--layout"], "--ratios must lie in [0, 1]"),
    (["--budget-by", "pixels"], "--budget-by takes tensors, params"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--batch", "0"], "--batch-size must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--latent", "0"], "--latent must be >= 1"),
    (["--device", "nodevice"], "is not a torch device"),
    (["--precision", "bf16"], "--precision bf16 is measured on CUDA only"),
    (["--backend", "nosuch"], "--backend"),
    (["--mask", "missing.safetensors"], "--mask missing.safetensors does not exist"),
    (["--json", "nofolder/b.json"], "does not exist"),
])
def test_every_bad_argument_exits_2_before_any_work(argv, said, capsys, monkeypatch):
    """`bench --model nosuch` once gave a worker traceback after 15 s; `--ratios -0.3` ran 136 s first."""
    from freezeguard.apps import bench

    def measured(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(bench, "run_bench", measured)
    monkeypatch.setattr(bench, "run_layout_bench", measured)
    assert cli_main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err


def test_old_flag_spellings_still_work_and_say_the_new_one(capsys, monkeypatch):
    from freezeguard.apps import bench

    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda **k: seen.update(k) or (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit):
        cli_main(["bench", "--model", "tiny", "--by", "params", "--ratios", "0.5"])
    assert seen["by"] == ["params"]
    assert "--by is deprecated; use --budget-by" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["bench", "--model", "tiny", "--batch", "3", "--ratios", "0.5"])
    assert seen["batch"] == 3 and "--batch is deprecated; use --batch-size" in capsys.readouterr().err
    # --bf16 is --precision bf16 (refused on a CPU, as the new spelling is)
    assert cli_main(["bench", "--model", "tiny", "--bf16"]) == 2
    err = capsys.readouterr().err
    assert "--bf16 is deprecated; use --precision bf16" in err and "--precision bf16 is measured on CUDA only" in err
