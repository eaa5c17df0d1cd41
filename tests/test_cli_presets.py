"""`learn --preset`, `--threads` and `example-pipeline`: the walkthrough's ergonomics."""
from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from freezeguard.cli import build_parser, main  # noqa: E402
from freezeguard.cli.learn import LEARNER_FLAGS, as_flags, resolve_preset  # noqa: E402

LEARN = ["learn", "--pretrained", "p", "--finetuned", "f", "--target-data", "t", "--innocent-data", "i",
         "--freeze-ratio", "0.5", "--out", "m.safetensors"]


def _learner_config(args):
    from freezeguard.apps.learn.config import LearnerConfig

    return LearnerConfig(freeze_ratio=0.5, budget_by=args.budget_by, temperature=args.temperature,
                         c_sparsity=args.c_sparsity, mask_lr=args.mask_lr, user_lr=args.user_lr,
                         user_interval=args.user_interval, user_optimizer=args.user_optimizer, seed=0,
                         budget=args.budget, signal_batches=args.signal_batches,
                         signal_norm=None if args.signal_norm == "none" else args.signal_norm,
                         signal_density=args.signal_density == "on", innocent_weight=args.innocent_weight,
                         init=args.init if args.init in ("uniform", "constant") else "scores")


def test_the_demo_preset_is_the_demos_learner_and_the_default():
    from freezeguard.apps.demo import DemoConfig

    args = resolve_preset(build_parser().parse_args(LEARN))
    assert args.preset == "demo"
    demo = DemoConfig()
    assert _learner_config(args).to_json() == demo.replace(freeze_ratio=0.5, seed=0).learner_config().to_json()
    assert args.init == demo.init


def test_the_authors_preset_and_a_flag_overriding_it():
    args = resolve_preset(build_parser().parse_args(LEARN + ["--preset", "authors", "--mask-lr", "3"]))
    assert (args.budget_by, args.budget, args.c_sparsity, args.user_optimizer, args.init) == (
        "tensors", "penalty", 5e3, "sgd", "uniform")
    assert args.mask_lr == 3.0 and all(getattr(args, f) is not None for f in LEARNER_FLAGS)
    help_text = build_parser()._subparsers._group_actions[0].choices["learn"].format_help()
    assert "--preset" in help_text and "recommendation" in help_text


def test_the_learners_warning_speaks_cli_flags():
    assert as_flags("use c_sparsity='auto' or budget='projected', or raise mask_lr (watch mask_moved)") == (
        "use --c-sparsity auto or --budget projected, or raise --mask-lr (watch mask_moved)")
    assert as_flags("signal_norm='rms'") == "--signal-norm rms"


def test_auto_threads_is_one_for_a_small_model_and_restored(monkeypatch):
    import torch

    from freezeguard.cli import threads

    seen = []
    before = torch.get_num_threads()
    with threads.apply_threads("auto", 53_284):
        seen.append(torch.get_num_threads())
    with threads.apply_threads(3, None):
        seen.append(torch.get_num_threads())
    assert seen == [1, 3] and torch.get_num_threads() == before
    assert threads.threads_for(None) is None and threads.threads_for(10**9) is None
    commands = build_parser()._subparsers._group_actions[0].choices
    for command in ("finetune", "learn", "evaluate"):
        option = next(a for a in commands[command]._actions if "--threads" in a.option_strings)
        assert option.default == "auto" and option.type("2") == 2, command
    with pytest.raises(SystemExit):
        build_parser().parse_args(LEARN + ["--threads", "0"])


def test_example_pipeline_writes_a_loadable_pipeline_and_two_folders(tmp_path, capsys):
    from freezeguard.integrations.diffusers import ImageFolderDataset, load_components

    out = tmp_path / "example"
    assert main(["example-pipeline", str(out), "--images", "3"]) == 0
    comps = load_components(out / "sd")
    assert len(list(comps.unet.parameters())) == 208
    for name in ("target", "legal"):
        assert len(ImageFolderDataset(out / name, role="target", tokenizer=comps.tokenizer)) == 3
    assert "freezeguard finetune --model" in capsys.readouterr().out
    # never over anything: a non-empty folder is refused, and nothing is left half-written
    assert main(["example-pipeline", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example"]
