"""The evaluation harness: mitigation arithmetic, determinism, validation, report files, CLI."""
from __future__ import annotations

import json

import pytest
import torch

import freezeguard as fg
from freezeguard.apps.evaluate import equal_harm
from freezeguard.apps.evaluate.harness import Attacker, Domain, EvalResult, Run, evaluate_masks
from freezeguard.apps.evaluate.metrics import mask_reliability, random_rank, removed_share, summarize
from freezeguard.apps.evaluate.report import headline
from freezeguard.apps.evaluate.toy_domains import heldout_batch, toy_domains
from freezeguard.integrations.diffusers import toy

TINY = toy.ToyModelConfig(block_out_channels=(8, 16), attention_head_dim=4, norm_num_groups=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(attacker, mask, domain, role, before, after):
    return Run(attacker, mask, domain, role, {"loss": before}, {"loss": after}, [(0, before), (1, after)])


def test_removed_share_and_undefined_reference():
    assert removed_share(0.25, 1.0, 1.0) == pytest.approx(0.75)
    assert removed_share(1.0, 1.0, 1.0) == 0.0
    assert removed_share(-0.5, 1.0, 1.0) == pytest.approx(1.5)  # the mask made it worse than untouched
    assert removed_share(0.1, 0.0, 1.0) is None                # full fine-tune gained nothing
    assert removed_share(0.1, -0.2, 1.0) is None


def test_summary_mitigation_impact_random_average_and_survival():
    runs = []
    for att, scale in (("std", 1.0), ("strong", 2.0)):
        # target: loss 1.0 -> full 0.6 (gain .4); random seeds gain .3 and .2; learned .1
        runs += [_run(att, "full", "t", "target", 1.0, 1.0 - 0.4 * scale),
                 _run(att, "random#0", "t", "target", 1.0, 1.0 - 0.3 * scale),
                 _run(att, "random#1", "t", "target", 1.0, 1.0 - 0.2 * scale),
                 _run(att, "learned", "t", "target", 1.0, 1.0 - (0.1 if att == "std" else 0.6))]
        runs += [_run(att, "full", "i", "innocent", 1.0, 0.5), _run(att, "random#0", "i", "innocent", 1.0, 0.6),
                 _run(att, "random#1", "i", "innocent", 1.0, 0.5), _run(att, "learned", "i", "innocent", 1.0, 0.52)]
    res = EvalResult(runs=runs, masks={m: {"ratio_tensors": .5, "ratio_params": .5} for m in
                                       ("full", "random#0", "random#1", "learned")},
                     attackers=[Attacker("std", 1e-3, 10), Attacker("strong", 1e-2, 20)])
    s = summarize(res)
    std = s["table"]["std"]
    assert std["full"]["mitigation"] == pytest.approx(0.0)
    assert std["random"]["n_masks"] == 2
    assert std["random"]["mitigation"] == pytest.approx((0.25 + 0.5) / 2)
    assert std["random"]["mitigation_std"] == pytest.approx(0.125)
    assert std["learned"]["mitigation"] == pytest.approx(0.75)
    assert std["learned"]["vs_random"] == pytest.approx(0.75 / 0.375)
    assert std["learned"]["innocent_impact"]["i"] == pytest.approx(1 - 0.48 / 0.5)
    assert s["table"]["strong"]["learned"]["mitigation"] == pytest.approx(0.25)
    assert s["survival"]["strong"] == pytest.approx(0.25 / 0.75)
    # std: learned .75 is above both random masks (.25, .5). strong: random masks remove .25 and .5
    # of the full gain .8, learned .25: a tie counts against it, so it beats none.
    assert std["learned"]["random_rank"] == {"beats": 2, "n": 2, "p": pytest.approx(1 / 3)}
    assert s["table"]["strong"]["learned"]["random_rank"] == {"beats": 0, "n": 2, "p": 1.0}


def test_mask_reliability_separates_reproducible_gaps_from_draw_noise():
    # masks 0.4 apart, draws 0.1 apart: the gaps are the masks'
    steady = mask_reliability({"a": [0.1, 0.2, 0.15], "b": [0.5, 0.6, 0.55], "c": [0.9, 1.0, 0.95]})
    assert steady["single_draw"] > 0.9 and steady["mean_of_draws"] > 0.95
    assert (steady["masks"], steady["draws"]) == (3, 3)
    # the same spread per draw, but the order flips between draws: nothing reproducible
    flips = mask_reliability({"a": [0.1, 0.9], "b": [0.9, 0.1], "c": [0.5, 0.5]})
    assert flips["single_draw"] == 0.0 and flips["mean_of_draws"] == 0.0
    # hand-computed: mask means .15/.55, MSB = 2 * var([.15, .55]) = .16, MSW = var([.1, .2]) = .005
    r = mask_reliability({"a": [0.1, 0.2], "b": [0.5, 0.6]})
    assert r["mean_of_draws"] == pytest.approx((0.16 - 0.005) / 0.16)
    assert r["single_draw"] == pytest.approx((0.16 - 0.005) / (0.16 + 0.005))
    assert mask_reliability({"a": [0.1], "b": [0.2]}) is None           # one draw: nothing to compare
    assert mask_reliability({"a": [0.1, 0.2]}) is None                  # one mask
    assert mask_reliability({"a": [0.1, None], "b": [0.2, 0.3], "c": [0.4, 0.5]})["masks"] == 2


def test_summary_reports_reliability_of_masks_over_attack_seeds():
    """Per attacker and target: masks only (a baseline is left out), one value per attack seed."""
    runs = []
    # full gains .4 on every seed; mask gains: random#0 .3/.1, random#1 .1/.3 (flip), learned .2/.2
    for seed, gains in ((0, {"random#0": 0.3, "random#1": 0.1, "learned": 0.2, "uce": 0.0}),
                        (1, {"random#0": 0.1, "random#1": 0.3, "learned": 0.2, "uce": 0.0})):
        for name, g in [("full", 0.4)] + list(gains.items()):
            run = _run("std", name, "t", "target", 1.0, 1.0 - g)
            run.seed = seed
            runs.append(run)
    kinds = {"full": "full", "random#0": "mask", "random#1": "mask", "learned": "mask", "uce": "weights"}
    res = EvalResult(runs=runs, masks={m: {"ratio_tensors": .5, "ratio_params": .5, "kind": k} for m, k in kinds.items()},
                     attackers=[Attacker("std", 1e-3, 10)])
    s = summarize(res)
    rel = s["reliability"]["std"]["t"]["loss"]
    assert rel["masks"] == 3 and rel["draws"] == 2
    assert rel["mean_of_draws"] == 0.0          # all three masks have the same mean: nothing to tell apart
    by_draw = s["removed_by_draw"]["std"]["loss"]["t"]
    assert by_draw["random#0"] == pytest.approx([1 - 0.3 / 0.4, 1 - 0.1 / 0.4])   # seed order
    assert by_draw["uce"] == pytest.approx([1.0, 1.0]) and "full" not in by_draw
    assert any("reliability of the differences between masks over 2 draws" in line and "loss 0.00 (0.00)" in line
               for line in headline(s))
    one_draw = summarize(EvalResult(runs=[r for r in runs if r.seed == 0], masks=res.masks, attackers=res.attackers))
    assert "reliability" not in one_draw
    assert any(line.startswith("caution: these figures come from one draw") for line in headline(one_draw))


def test_random_rank_ties_count_against_the_learned_mask():
    assert random_rank(0.5, [0.5, 0.1]) == {"beats": 1, "n": 2, "p": pytest.approx(2 / 3)}
    assert random_rank(0.5, [None, 0.9]) == {"beats": 0, "n": 1, "p": 1.0}
    assert random_rank(None, [0.1]) is None and random_rank(0.3, [None]) is None


def _tiny_setup():
    model = toy.build_model(TINY, seed=0)
    loss_fn = toy.make_loss_fn(TINY)
    domains = toy_domains(heldout_n=8, batch_size=4)
    masks = {"full": None, "random#0": fg.FreezeMask.random(model, 0.5, by="params", seed=0),
             "learned": fg.FreezeMask.random(model, 0.5, by="params", seed=1)}
    return model, loss_fn, domains, masks


def test_evaluate_masks_runs_every_combination_deterministically():
    model, loss_fn, domains, masks = _tiny_setup()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    attackers = [Attacker("std", 1e-3, 3), Attacker("strong", 1e-2, 4)]
    a = evaluate_masks(model, masks, domains, loss_fn, attackers, curve_points=2, progress=False)
    b = evaluate_masks(model, masks, domains, loss_fn, attackers, curve_points=2, progress=False)
    assert len(a.runs) == 2 * 3 * 2
    assert [(r.before, r.after, r.curve) for r in a.runs] == [(r.before, r.after, r.curve) for r in b.runs]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ref.items()), "the released model was modified"
    run = a.runs[0]
    assert run.curve[0][0] == 0 and run.curve[-1][0] == 3 and set(run.before) == {"loss", "prompt_gain"}
    full = [r for r in a.runs if r.mask == "full" and r.attacker == "std"]
    assert all(r.after["loss"] != r.before["loss"] for r in full)
    s = a.summary()
    assert set(s["table"]) == {"std", "strong"} and set(s["table"]["std"]) == {"full", "random", "learned"}
    assert s["primary_metric"] == "loss"


def test_several_attack_seeds_average_each_mask_over_its_own_seed_references():
    """attack_seeds=2 is the mean of two single-seed evaluations (each scored against its own full run)."""
    model, loss_fn, domains, masks = _tiny_setup()
    attackers = [Attacker("std", 1e-3, 3)]
    kw = dict(curve_points=2, progress=False)
    both = evaluate_masks(model, masks, domains, loss_fn, attackers, seed=5, attack_seeds=2, **kw)
    assert sorted({r.seed for r in both.runs}) == [5, 6] and len(both.runs) == 2 * 3 * 2
    single = [evaluate_masks(model, masks, domains, loss_fn, attackers, seed=s, **kw).summary() for s in (5, 6)]
    summary = both.summary()
    assert summary["attack_seeds"] == [5, 6]
    for group in ("random", "learned"):
        per_seed = [s["table"]["std"][group]["mitigation"] for s in single]
        assert per_seed[0] != per_seed[1]  # the draws differ, so the average is a real one
        assert summary["table"]["std"][group]["mitigation"] == pytest.approx(sum(per_seed) / 2)
    with pytest.raises(ValueError, match="attack_seeds"):
        evaluate_masks(model, masks, domains, loss_fn, attackers, attack_seeds=0, **kw)


def test_masked_finetune_leaves_frozen_tensors_untouched():
    model, loss_fn, domains, masks = _tiny_setup()
    import copy

    from freezeguard.apps.evaluate.harness import attack_finetune
    tuned = copy.deepcopy(model)
    attack_finetune(tuned, masks["learned"], domains[0], loss_fn, Attacker("a", 1e-2, 2), curve_points=1)
    before, after = dict(model.named_parameters()), dict(tuned.named_parameters())
    for name in masks["learned"].frozen_names:
        assert torch.equal(before[name], after[name]), name
    changed = [n for n in masks["learned"].trainable_names if not torch.equal(before[n], after[n])]
    assert changed, "trainable tensors should move"


def test_validation_errors():
    model, loss_fn, domains, masks = _tiny_setup()
    with pytest.raises(ValueError, match='"full"'):
        evaluate_masks(model, {"learned": masks["learned"]}, domains, loss_fn, [Attacker("a", 1e-3, 1)])
    with pytest.raises(ValueError, match="target domain"):
        evaluate_masks(model, masks, domains[1:], loss_fn, [Attacker("a", 1e-3, 1)])
    with pytest.raises(ValueError, match="lr"):
        Attacker("a", 0.0, 1)
    with pytest.raises(ValueError, match="role"):
        Domain("x", "illegal", lambda s: iter(()), heldout_batch("disc", 2, 0))
    with pytest.raises(ValueError, match="fixed 'noise'"):
        Domain("x", "target", lambda s: iter(()), toy.make_batch(["disc"], 2, 0))
    other = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="different model"):
        evaluate_masks(model, {"full": None, "m": fg.FreezeMask.from_names(other, [])}, domains, loss_fn,
                       [Attacker("a", 1e-3, 1)])


def test_report_files(tmp_path):
    from freezeguard.apps.evaluate.report import write_report
    from freezeguard.integrations.diffusers import judge
    model, loss_fn, _, masks = _tiny_setup()
    j = judge.train_judge(steps=5, cache_dir=False, progress=False)
    domains = toy_domains(judge=j, heldout_n=4, sample_n=2, sample_steps=2, batch_size=4)
    res = evaluate_masks(model, masks, domains, loss_fn, [Attacker("std", 1e-3, 2)], curve_points=1, progress=False)
    assert res.primary_metric == "recognisability"
    s = res.summary()
    out = write_report(res, s, tmp_path / "rep", mask=masks["learned"])
    for f in ("report.md", "summary.json", "runs.json", "loss_curves.png", "samples.png", "learned_mask.safetensors"):
        assert (out / f).stat().st_size > 0, f
    data = json.loads((out / "summary.json").read_text())
    assert data["primary_metric"] == "recognisability" and "learned" in data["table"]["std"]
    assert "mitigation" in (out / "report.md").read_text()


def test_primary_metric_is_chosen_and_checked_before_any_fine_tune():
    model, loss_fn, _, masks = _tiny_setup()
    domains = toy_domains(heldout_n=4, sample_n=2, sample_steps=2, batch_size=4)   # no judge: no recognisability
    with pytest.raises(ValueError, match="primary_metric 'recognisability' is not measured"):
        evaluate_masks(model, masks, domains, loss_fn, [Attacker("std", 1e-3, 10**6)], curve_points=1,
                       progress=False, primary_metric="recognisability")   # 10**6 steps: would not return
    res = evaluate_masks(model, masks, domains, loss_fn, [Attacker("std", 1e-3, 2)], curve_points=1, progress=False,
                         primary_metric="prompt_gain")
    assert res.primary_metric == "prompt_gain" and res.summary()["primary_metric"] == "prompt_gain"


def test_cli_evaluate_toy(tmp_path, capsys):
    """The CLI plumbing on the toy model; the cache is pre-filled with untrained weights (speed)."""
    from safetensors.torch import save_file

    from freezeguard.cli import main
    from freezeguard.integrations.diffusers import judge
    model = toy.build_model()
    save_file(model.state_dict(), str(tmp_path / f"toy-{toy.PretrainConfig().key()}.safetensors"))
    save_file(judge.Judge().state_dict(), str(judge.cache_path(tmp_path)))
    fg.FreezeMask.random(model, 0.3, by="params", seed=4).save(str(tmp_path / "m.safetensors"))
    rc = main(["evaluate", "--mask", str(tmp_path / "m.safetensors"), "--cache-dir", str(tmp_path), "--steps", "1",
               "--no-strong", "--random-seeds", "1", "--heldout", "4", "--samples", "2", "--sample-steps", "2",
               "--quiet", "--json", "--out", str(tmp_path / "rep")])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["table"]["standard"]) == {"full", "random", "learned"}
    assert data["masks"]["random#0"]["ratio_params"] == pytest.approx(data["masks"]["learned"]["ratio_params"], abs=0.05)
    assert (tmp_path / "rep" / "report.md").exists()


def test_cli_evaluate_real_pipeline(tmp_path, capsys):
    """--pretrained path on the tiny SD pipeline fixture: loss and prompt gain, CLIP/FID skipped."""
    from support.tiny_models import build_tiny_sd_pipeline, write_tiny_imagefolder

    from freezeguard.cli import main
    from freezeguard.integrations.diffusers import load_components
    pipe = build_tiny_sd_pipeline(tmp_path / "sd")
    write_tiny_imagefolder(tmp_path / "t", n=4, caption="a photo of sks", seed=0, style="checker")
    write_tiny_imagefolder(tmp_path / "i", n=4, caption="a photo of stripes", seed=1, style="stripes")
    unet = load_components(pipe).unet
    fg.FreezeMask.random(unet, 0.5, by="tensors", seed=0).save(str(tmp_path / "m.safetensors"))
    rc = main(["evaluate", "--mask", str(tmp_path / "m.safetensors"), "--pretrained", str(pipe),
               "--target-data", str(tmp_path / "t"), "--innocent-data", str(tmp_path / "i"), "--heldout", "2",
               "--batch-size", "2", "--steps", "1", "--no-strong", "--random-seeds", "1", "--budget-by", "tensors",
               "--quiet", "--json", "--device", "cpu", "--out", str(tmp_path / "rep")])
    assert rc == 0
    captured = capsys.readouterr()
    assert "CLIP score / FID skipped" in captured.err
    data = json.loads(captured.out)
    assert data["primary_metric"] == "loss" and "prompt_gain" in data["metrics"]
    assert set(data["domains"].values()) == {"target", "innocent"}


def _benchmark_module(name: str):
    """A development tool from benchmarks/ (not part of the installed package)."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module(name)


def test_sweep_of_learner_settings_runs_and_tabulates(tmp_path, capsys):
    """`python benchmarks/demo_sweep.py --quick`: learned variants against shared baselines."""
    sweep = _benchmark_module("demo_sweep")

    out = tmp_path / "sweep.json"
    assert sweep.main(["--quick", "--ratios", "0.5", "--random-seeds", "2", "--variants", "demo; c 50 mask_lr 1e3",
                       "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    table = res["ratios"]["0.5"]["table"]
    assert list(table) == ["standard", "10x lr", "3x steps"]
    assert set(table["standard"]) == {"full", "random", "demo", "c 50 mask_lr 1e3"}
    assert table["standard"]["random"]["n_masks"] == 2
    printed = capsys.readouterr().out
    assert printed.count("| 0.5 |") == 3  # random, then one row per variant
    assert sweep.main(["--markdown", str(out)]) == 0
    assert capsys.readouterr().out.strip() == printed.strip()
    with pytest.raises(SystemExit):
        sweep.main(["--variants", "no such variant"])


def test_learner_sweep_caches_fine_tunes_and_tabulates(tmp_path, capsys):
    """`python benchmarks/learner_sweep.py --quick`: references, random and learner seeds, one cache."""
    sweep = _benchmark_module("learner_sweep")
    argv = ["--quick", "--random-seeds", "2", "--learner-seeds", "2", "--attackers", "standard",
            "--variants", "projected, rms 0.05, 4 signal batches", "--cache", str(tmp_path / "c.json"),
            "--model-cache", str(tmp_path / "models"), "--json", str(tmp_path / "r.json")]
    assert sweep.main(argv) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res["per_mask"]) == {"full", "random#0", "random#1", "ref: delta", "ref: cross-attention",
                                    "ref: saliency", "projected, rms 0.05, 4 signal batches#0",
                                    "projected, rms 0.05, 4 signal batches#1"}
    assert list(res["table"]) == ["standard"]
    assert "| projected, rms 0.05, 4 signal batches | 2 |" in capsys.readouterr().out
    cached = json.loads((tmp_path / "c.json").read_text())
    assert all("|standard|" in k for k in cached)
    assert len(cached) == 2 * len({k.split("|")[0] for k in cached})  # one entry per distinct mask x domain
    # A second run takes every fine-tune from the cache and gives the same table.
    first = res["per_mask"]
    assert sweep.main(argv) == 0
    assert json.loads((tmp_path / "r.json").read_text())["per_mask"] == first


def test_learner_sweep_combines_replicates_with_paired_differences(tmp_path, capsys):
    """`learner_sweep.py --combine a.json b.json`: per-replicate group means, then paired differences."""
    sweep = _benchmark_module("learner_sweep")

    def result(seed, rnd, learned):
        per = {"full": {"standard": {"mitigation": 0.0, "innocent": [0.0]}}}
        per.update({f"random#{k}": {"standard": {"mitigation": v, "innocent": [0.0]}} for k, v in enumerate(rnd)})
        per.update({f"L#{k}": {"standard": {"mitigation": v, "innocent": [0.01]}} for k, v in enumerate(learned)})
        return {"attack_seed": seed, "table": {"standard": {}}, "per_mask": per}

    # replicate 1: random .1, .3 (mean .2), learned .5 -> +.3; replicate 2: random -.2, 0 (-.1), learned -.2 -> -.1
    files = []
    for seed, rnd, learned in ((31, [0.1, 0.3], [0.5]), (32, [-0.2, 0.0], [-0.2])):
        files.append(str(tmp_path / f"{seed}.json"))
        with open(files[-1], "w") as fh:
            json.dump(result(seed, rnd, learned), fh)
    assert sweep.main(["--combine", *files]) == 0
    out = capsys.readouterr().out
    assert "| L | 1 | +15.0% ± 35.0 | +10.0% ± 20.0 (1 of 2) | +1.0% ± 0.0 |" in out, out
    assert "| random | 2 | +5.0% ± 15.0 |  |" in out
    with pytest.raises(SystemExit, match="distinct attack seeds"):
        sweep.main(["--combine", files[0], files[0]])


def test_eval_power_groups_selectivity_and_paired_differences():
    """benchmarks/eval_power.py's arithmetic: group means per draw, selectivity, paired gap to random."""
    power = _benchmark_module("eval_power")
    draws = {"t": {"random#0": [0.1, 0.3], "random#1": [0.3, 0.1], "learned#0": [0.4, 0.1], "ref: x": [None, 0.2]},
             "i": {"random#0": [0.0, 0.0], "random#1": [0.2, 0.2], "learned#0": [0.1, 0.1], "ref: x": [0.0, 0.0]}}
    rows = {r["group"]: r for r in power.group_rows(draws, "t", "i")}
    assert rows["random"]["masks"] == 2 and rows["random"]["target"] == pytest.approx(0.2)
    assert rows["random"]["selectivity"] == pytest.approx(0.1)
    # learned: per draw .4 - .2 = +.2 and .1 - .2 = -.1, ahead once
    assert rows["learned"]["vs_random"] == pytest.approx(0.05)
    assert rows["learned"]["vs_random_std"] == pytest.approx(0.3 / 2 ** 0.5)
    assert (rows["learned"]["ahead"], rows["learned"]["draws"]) == (1, 2)
    assert rows["learned"]["selectivity"] == pytest.approx(0.25 - 0.1)
    # the paper's learned/random: the group's mean target share over random's (.25 / .2)
    assert rows["learned"]["times_random"] == pytest.approx(1.25) and rows["random"]["times_random"] is None
    helped = {"t": {"random#0": [-0.2], "learned#0": [-0.1]}, "i": {"random#0": [0.0], "learned#0": [0.0]}}
    helped_rows = {r["group"]: r for r in power.group_rows(helped, "t", "i")}
    assert helped_rows["learned"]["times_random"] is None   # random masks help the attacker: no multiple
    # an undefined draw (None: the full fine-tune gained nothing) is left out, not counted as 0
    assert rows["ref: x"]["target"] == pytest.approx(0.2) and rows["ref: x"]["draws"] == 1
    # masks' means: target .2, .2, .25, .2 against innocent 0, .2, .1, 0
    import statistics
    assert power.target_innocent_correlation(draws, "t", "i") == pytest.approx(
        statistics.correlation([0.2, 0.2, 0.25, 0.2], [0.0, 0.2, 0.1, 0.0]))
    same = {"t": {"a": [0.1], "b": [0.2], "c": [0.4]}, "i": {"a": [0.2], "b": [0.4], "c": [0.8]}}
    assert power.target_innocent_correlation(same, "t", "i") == pytest.approx(1.0)
    assert power.target_innocent_correlation({"t": {"a": [0.1]}, "i": {"a": [0.1]}}, "t", "i") is None


def test_equal_harm_against_random_masks_at_every_ratio():
    """apps.evaluate.equal_harm (eval_power --random-ratios, the demo's harm_ratios): random's target
    share interpolated at a group's innocent share, draw by draw."""
    assert equal_harm.interpolate_frontier([(0.1, 0.05), (0.3, 0.15)], 0.2) == pytest.approx(0.1)
    assert equal_harm.interpolate_frontier([(0.1, 0.05)], 0.05) == pytest.approx(0.025)   # toward (0, 0): nothing frozen
    assert equal_harm.interpolate_frontier([(0.1, 0.05)], -0.02) == 0.0
    assert equal_harm.interpolate_frontier([(0.1, 0.05)], 0.2) is None                   # no extrapolation
    # random (ratio .9): innocent .4, target .2 in both draws; random@0.5: innocent .1, target .1
    draws = {"t": {"random#0": [0.2, 0.2], "random@0.5#0": [0.05, 0.15], "random@0.5#1": [0.15, 0.05],
                   "learned#0": [0.2, 0.1], "ref: x": [0.5, 0.5]},
             "i": {"random#0": [0.4, 0.4], "random@0.5#0": [0.1, 0.1], "random@0.5#1": [0.1, 0.1],
                   "learned#0": [0.1, 0.25], "ref: x": [0.6, 0.6]}}
    rows = {r["group"]: r for r in equal_harm.equal_harm_rows(draws, "t", "i")}
    assert set(rows) == {"learned", "ref: x"}
    # draw 1: at innocent .1 random blocks .1 -> +.1; draw 2: at .25, halfway from (.1, .1) to (.4, .2): .15 -> -.05
    assert rows["learned"]["vs_random"] == pytest.approx(0.025)
    # as a multiple: the mean target share (.2 + .1) / 2 over random's at the same harm (.1 + .15) / 2
    assert rows["learned"]["times_random"] == pytest.approx(0.15 / 0.125)
    assert (rows["learned"]["ahead"], rows["learned"]["draws"]) == (1, 2)
    assert rows["ref: x"]["vs_random"] is None and rows["ref: x"]["beyond_random"] == 2
    assert rows["ref: x"]["times_random"] is None
    assert rows["learned"]["per_mask"] == []          # one mask: the group's figure is the mask's
    draws["t"]["learned#1"], draws["i"]["learned#1"] = [0.0, 0.0], [0.1, 0.1]     # -.1 in both draws
    rows = {r["group"]: r for r in equal_harm.equal_harm_rows(draws, "t", "i")}
    assert rows["learned"]["per_mask"] == pytest.approx([0.025, -0.1])
    assert rows["learned"]["no_curve"] == 0
    # An attacker that freezing helps: random masks block less than nothing even where they harm the
    # legal user most, so there is no price curve (the demo's 10x-lr attacker at ratio 0.9).
    helped = {"t": {"random#0": [-0.3], "random@0.7#0": [-0.4], "learned": [-0.2]},
              "i": {"random#0": [0.12], "random@0.7#0": [-0.03], "learned": [-0.02]}}
    (row,) = equal_harm.equal_harm_rows(helped, "t", "i")
    assert (row["vs_random"], row["draws"], row["no_curve"], row["times_random"]) == (None, 0, 1, None)


def test_toy_domains_prior_share_mixes_base_classes_into_every_fine_tune_batch():
    """prior_share: the domain's own images first, then base-class ones under their own prompts."""
    doms = toy_domains(heldout_n=2, batch_size=8, prior_share=0.25)
    batch = next(doms[1].train_batches(3))               # the innocent domain: 6 checkers, 2 base images
    own = toy.class_embedding(toy.INNOCENT_CLASSES[0])
    is_own = [bool(torch.equal(e, own)) for e in batch["encoder_hidden_states"]]
    assert is_own == [True] * 6 + [False] * 2 and batch["pixel_values"].shape[0] == 8
    assert all(any(torch.equal(e, toy.class_embedding(c)) for c in toy.BASE_CLASSES)
               for e in batch["encoder_hidden_states"][6:])
    plain = next(toy_domains(heldout_n=2, batch_size=8)[1].train_batches(3))
    assert torch.equal(plain["encoder_hidden_states"], own.expand(8, -1, -1))
    assert torch.equal(doms[1].heldout["pixel_values"], toy_domains(heldout_n=2, batch_size=8)[1].heldout["pixel_values"])
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="prior_share"):
            toy_domains(heldout_n=2, batch_size=8, prior_share=bad)
    with pytest.raises(ValueError, match="no room"):
        toy_domains(heldout_n=2, batch_size=2, prior_share=0.1)


def test_equal_harm_lines_put_the_learned_mask_first_and_say_when_undefined():
    from freezeguard.apps.evaluate.report import equal_harm_lines

    rows = [{"group": "ref: x", "vs_random": None, "vs_random_std": None, "ahead": 0, "draws": 0},
            {"group": "learned", "vs_random": 0.047, "vs_random_std": 0.006, "times_random": 2.2, "ahead": 3,
             "draws": 3}]
    (line,) = equal_harm_lines({"equal_harm": {"std": {"target": "t", "innocent": "i", "metric": "loss",
                                                        "rows": rows}}})
    assert line.startswith("std, at equal harm to i (loss;")
    assert line.index("learned +4.7 ± 0.6 pts, 2.20x random (ahead in 3 of 3 draws)") < line.index("ref: x n/a (more harm")
    assert equal_harm_lines({}) == []
    helped = [dict(r, vs_random=None, draws=0, no_curve=1) for r in rows]
    (line,) = equal_harm_lines({"equal_harm": {"10x": {"target": "t", "innocent": "i", "metric": "loss",
                                                        "rows": helped}}})
    assert line.startswith("10x: no comparison at equal harm: random masks block nothing")


def test_eval_power_part_masks_freeze_exactly_each_part():
    """`--parts`: each mask freezes every tensor of its part of the UNet and nothing else."""
    power = _benchmark_module("eval_power")
    model = toy.build_model(toy.ToyModelConfig(block_out_channels=(8, 16), attention_head_dim=4, norm_num_groups=4))
    parts = power.part_masks(model)
    names = [n for n, _ in model.named_parameters()]
    assert set(parts["part: cross-attention"].frozen_names) == {n for n in names if ".attn2." in n}
    high, low = set(parts["part: high-res path"].frozen_names), set(parts["part: low-res path"].frozen_names)
    assert not high & low and high | low == {n for n in names if not n.startswith("time_embedding.")}
    assert "conv_in.weight" in high and "up_blocks.1.resnets.0.conv1.weight" in high
    assert "mid_block.attentions.0.proj_in.weight" in low
    assert all(0.0 < m.ratio("params") < 1.0 for m in parts.values())


def test_eval_power_learner_variants_are_learned_side_by_side(tmp_path):
    """`--variants constant,delta+density+w0.5`: one group of learned masks per variant, each built with
    its own start and signal, everything else the run's."""
    power = _benchmark_module("eval_power")
    cfg = power.DemoConfig.quick()
    def learner(**changes):
        return cfg.learner.replace(**changes)

    assert power.variant_config(cfg, "delta+density") == cfg.replace(init="delta", learner=learner(signal_density=True))
    assert power.variant_config(cfg, "constant") == cfg.replace(init="constant", learner=learner(signal_density=False))
    assert power.variant_config(cfg, "constant+w0.5+density") == cfg.replace(
        init="constant", learner=learner(signal_density=True, innocent_weight=0.5))
    assert power.variant_config(cfg, "uniform+steps600+lr0.1") == cfg.replace(
        init="uniform", learner_steps=600, learner=learner(signal_density=False, innocent_weight=1.0, mask_lr=0.1))
    for bad in ("best", "delta+rms", "+density", "constant+w", "constant+w-1", "constant+steps1.5", "constant+x1"):
        with pytest.raises(ValueError, match="learner variant"):
            power.variant_config(cfg, bad)
    with pytest.raises(SystemExit):     # checked before any model is built
        power.main(["--variants", "uniform,best"])
    model = toy.pretrained_model(cfg.pretrain, cache_dir=tmp_path, progress=False)
    loss_fn = toy.make_loss_fn(cfg.pretrain.model)
    masks = power.build_masks(cfg, model, loss_fn, random_masks=1, learner_seeds=1,
                              variants=("constant", "delta+density"), log=lambda *_: None)
    assert sorted(masks) == ["full", "learned constant#0", "learned delta+density#0", "random#0",
                             "ref: cross-attention", "ref: delta", "ref: saliency"]
    for name in ("learned constant#0", "learned delta+density#0"):
        assert masks[name].ratio("params") == pytest.approx(cfg.learner.freeze_ratio, abs=0.1)


def test_eval_power_quick_run_reports_reliability_per_metric(tmp_path, capsys):
    """`python benchmarks/eval_power.py --quick`: every mask under two draws, tables and JSON agree."""
    power = _benchmark_module("eval_power")
    out = tmp_path / "p.json"
    assert power.main(["--quick", "--attack-seeds", "2", "--random-masks", "2", "--learner-seeds", "1", "--prior-share", "0.5",
                       "--channels", "8,16",   # the quick config's own widths: the option's path, same model
                       "--init", "delta",
                       "--heldout-n", "8", "--sample-n", "4", "--workers", "1", "--model-cache", str(tmp_path / "m"),
                       "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(res["attack_seeds"]) == 2
    rel = res["reliability"]["standard"]["frame"]
    assert set(rel) == {"loss", "prompt_gain", "recognisability"}
    assert (rel["loss"]["masks"], rel["loss"]["draws"]) == (6, 2)    # 2 random, 3 references, 1 learned
    assert 0.0 <= rel["loss"]["single_draw"] <= rel["loss"]["mean_of_draws"] <= 1.0
    groups = {r["group"] for r in res["groups"]["standard"]["loss"]}
    assert groups == {"random", "ref: delta", "ref: cross-attention", "ref: saliency", "learned"}
    printed = capsys.readouterr().out
    assert "**standard, loss** (reliability" in printed
    assert "50% of every fine-tune's batch from the base classes; UNet widths 8,16." in printed
    assert power.main(["--markdown", str(out)]) == 0
    assert capsys.readouterr().out.strip() in printed
    with pytest.raises(SystemExit):
        power.main(["--attack-seeds", "1"])
    with pytest.raises(SystemExit):    # checked before any model is built
        power.main(["--attackers", "standard;20x lr"])
    with pytest.raises(SystemExit):
        power.main(["--innocent", "dog"])
    own = f"{power.DemoConfig().learner.freeze_ratio:g}"
    for bad in ("0.5,1.2", "0.7,x", own):      # own: the freeze ratio itself
        with pytest.raises(SystemExit):
            power.main(["--random-ratios", bad])
    with pytest.raises(SystemExit):
        power.main(["--prior-share", "1"])
    for bad in ("16", "8,12", "8,x"):
        with pytest.raises(SystemExit):
            power.main(["--channels", bad])
    with pytest.raises(SystemExit):
        power.main(["--init", "best"])
