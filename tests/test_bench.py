"""`freezeguard bench` on a tiny UNet: the measurements and the CLI outputs."""
from __future__ import annotations

import json

import pytest

import freezeguard as fg
from freezeguard.apps.bench import _measure_isolated, configs, run_bench
from freezeguard.apps.bench_step import check_config, measure
from freezeguard.cli import main as cli_main
from freezeguard.integrations.diffusers.layouts import build_unet

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
    assert cli_main(["bench", "--model", "tiny", "--latent", "8", "--ratios", "0,0.5", "--by", "tensors", "--steps", "1",
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
