"""`learn --preset`, `--threads` and `example-pipeline`: the walkthrough's ergonomics."""
from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from freezeguard.cli import build_parser, main  # noqa: E402
from freezeguard.cli.learn import as_flags, learner_config  # noqa: E402

LEARN = ["learn", "--pretrained", "p", "--finetuned", "f", "--target-data", "t", "--innocent-data", "i",
         "--freeze-ratio", "0.5", "--out", "m.safetensors"]


def test_the_demo_preset_is_the_demos_learner_and_the_default():
    from freezeguard.apps.demo import DemoConfig

    args = build_parser().parse_args(LEARN)
    config, ranking = learner_config(args)
    assert args.preset == "demo" and ranking is None
    demo = DemoConfig()
    assert config == demo.learner.replace(freeze_ratio=0.5, seed=0)
    assert config.init == demo.init


def test_the_authors_preset_and_a_flag_overriding_it():
    config, ranking = learner_config(build_parser().parse_args(LEARN + ["--preset", "authors", "--mask-lr", "3"]))
    assert (config.budget_by, config.budget, config.c_sparsity, config.user_optimizer, config.init) == (
        "tensors", "penalty", 5e3, "sgd", "uniform")
    assert config.mask_lr == 3.0 and config.freeze_ratio == 0.5 and ranking is None
    config, ranking = learner_config(build_parser().parse_args(LEARN + ["--init", "delta", "--signal-norm", "none",
                                                                        "--signal-density", "off"]))
    assert (config.init, ranking, config.signal_norm, config.signal_density) == ("scores", "delta", None, False)
    with pytest.raises(ValueError, match="--signal-batches must be >= 1"):  # the config's check, in flags
        learner_config(build_parser().parse_args(LEARN + ["--signal-batches", "0"]))
    help_text = build_parser()._subparsers._group_actions[0].choices["learn"].format_help()
    assert "--preset" in help_text and "recommendation" in help_text
    assert "one releaser step every --user-interval steps" in help_text  # the field's own documentation


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
