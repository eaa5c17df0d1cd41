"""`freezeguard demo --quick` end to end on CPU: erase, relearn, learn, attack, the verdict, the table, the
report folder, the cache."""
from __future__ import annotations

import json

import pytest

from freezeguard.cli import main


def test_quick_demo_end_to_end_and_deterministic(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "report"
    rc = main(["demo", "--quick", "--cache-dir", str(cache), "--out", str(out), "--no-progress",
               "--baselines", "uce,ablation"])
    assert rc == 0
    text = capsys.readouterr().out
    for word in ("full", "random", "learned", "uce", "ablation", "mitigation", "innocent impact", "publisher cost",
                 "report written to", "release: uce erased the target toward square", "decision rule",
                 "verdict: the learned mask"):
        assert word in text, word
    for f in ("report.md", "summary.json", "runs.json", "loss_curves.png", "samples.png", "learned_mask.safetensors"):
        assert (out / f).stat().st_size > 0, f
    assert list(cache.glob("toy-*.safetensors")) and list(cache.glob("judge-*.safetensors"))
    first = json.loads((out / "summary.json").read_text())
    # the headline uses the held-out loss (recognisability's gaps did not repeat between draws)
    assert first["primary_metric"] == "loss" and "recognisability" in first["metrics"]
    assert set(first["domains"].values()) == {"target", "innocent"}
    row = first["table"]["standard"]["learned"]
    assert row["mitigation"] is None or isinstance(row["mitigation"], float)
    # The demo's budget counts parameters (a tensor-count budget is spent on biases; see the README).
    assert first["masks"]["learned"]["ratio_params"] == pytest.approx(0.9, abs=0.05)
    assert first["masks"]["ref: delta"]["ratio_params"] == pytest.approx(0.9, abs=0.05)
    # random masks at the other ratios trace the price of blocking; every other mask is compared at equal harm
    assert first["masks"]["random@0.7#0"]["ratio_params"] == pytest.approx(0.7, abs=0.05)
    assert first["masks"]["random@0.5#0"]["ratio_params"] == pytest.approx(0.5, abs=0.05)
    # the authors' pipeline: the release is the pretrained model with the target erased by UCE
    assert first["config"]["world"] == "relearn"
    assert first["erase"]["edited"] and all(".attn2.to_" in n for n in first["erase"]["edited"])
    # the decision rule's verdict, from the standard, 3x-steps and fresh-token attackers
    verdict = first["verdict"]
    assert verdict["label"] in ("MITIGATES", "DOES NOT MITIGATE") and verdict["mitigates"] == (
        verdict["label"] == "MITIGATES")
    assert set(verdict["figures"]) == {"standard", "3x steps", "fresh token"}
    assert "fresh token" in first["equal_harm"] and first["fresh_token"]["domain"] == "frame (fresh token)"
    assert "## Verdict" in (out / "report.md").read_text()
    harm = first["equal_harm"]["standard"]
    assert (harm["target"], harm["innocent"], harm["metric"]) == ("frame", "checker", "loss")
    assert {"learned", "ref: delta", "uce"} <= {r["group"] for r in harm["rows"]}
    assert not any(r["group"].startswith("random") for r in harm["rows"])
    assert "standard, at equal harm to checker" in text
    # the cheap baselines face the same attackers as the masks, with their cost and weight drift
    assert {"uce", "ablation"} <= set(first["table"]["standard"]) and "imma" not in first["table"]["standard"]
    assert first["masks"]["uce"]["weight_change"]["tensors_changed"] > 0
    assert first["masks"]["learned"]["cost"]["seconds"] > 0

    assert "ref: delta" in text   # the reference mask beside learned and random
    assert "the data moved" in text and "frozen tensors" in text
    # Second run, one evaluation process instead of two: the pretrained model and judge come from
    # the cache; the figures are identical.
    rc = main(["demo", "--quick", "--cache-dir", str(cache), "--out", str(tmp_path / "again"), "--json",
               "--workers", "1", "--baselines", "uce,ablation"])
    assert rc == 0
    second = json.loads(capsys.readouterr().out)
    assert second["table"] == first["table"] and second["verdict"] == first["verdict"]
    assert second["timings_s"]["pretrain"] < first["timings_s"]["pretrain"]


def test_demo_rejects_bad_arguments(tmp_path, capsys, monkeypatch):
    """Every bad argument exits 2 with a message before any work, as every other command does."""
    from freezeguard.apps import demo

    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work started")))
    (tmp_path / "file").write_text("")
    for bad in (["--ratio", "1.5"], ["--ratio", "-0.5"], ["--strong-lr-mult", "0"], ["--threads", "-1"],
                ["--workers", "0"], ["--baselines", "esd"], ["--attack-seeds", "0"],
                ["--out", str(tmp_path / "file" / "r")]):
        argv = ["demo", "--quick", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "r"), *bad]
        assert main(argv) == 2, bad
        err = capsys.readouterr().err
        assert "freezeguard demo: error: --" in err and "Traceback" not in err, (bad, err)
    assert not (tmp_path / "r").exists()


def test_demo_spells_quiet_like_the_other_commands(capsys):
    from freezeguard.cli import build_parser

    assert build_parser().parse_args(["demo", "--quiet"]).quiet
    assert build_parser().parse_args(["demo", "--no-progress"]).quiet
    assert "--no-progress is deprecated; use --quiet" in capsys.readouterr().err


def test_demo_without_diffusers_says_what_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    assert main(["demo", "--quick", "--out", str(tmp_path / "r")]) == 2
    assert "pip install 'freezeguard[diffusion]'" in capsys.readouterr().err
