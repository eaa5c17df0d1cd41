"""`freezeguard learn`: learn a freeze mask for a local Stable Diffusion folder (FreezeAsGuard)."""
from __future__ import annotations

import argparse
import json
import re
import sys

from freezeguard.apps.learn.config import BUDGETS, USER_OPTIMIZERS, LearnerConfig
from freezeguard.apps.learn.logits import BUDGET_BASES
from freezeguard.apps.learn.mask_rules import HARD_MASK_RULES, check_rule
from freezeguard.apps.learn.reference_masks import RANKINGS
from freezeguard.cli.flags import number_or_auto, ratio
from freezeguard.cli.threads import add_threads_argument, apply_threads, denoiser_params


def _none_or(text: str) -> str | None:
    return None if text == "none" else text


def _hard_mask_rule(text: str) -> str:
    # argparse's "invalid choice" would not say that "round" is now "threshold"
    try:
        return check_rule(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"must be on or off, got {text!r}")
    return text == "on"


#: LearnerConfig fields a --preset fills, each with a flag of its name; a flag given overrides its
#: preset's value. The help of each is the field's own documentation (LearnerConfig.doc).
LEARNER_FLAGS: dict[str, dict] = {
    "budget_by": dict(choices=BUDGET_BASES),
    "user_optimizer": dict(choices=USER_OPTIMIZERS),
    "user_lr": dict(type=float),
    "user_interval": dict(type=int),
    "mask_lr": dict(type=float),
    "temperature": dict(type=float),
    "c_sparsity": dict(type=number_or_auto(float, 0)),
    "budget": dict(choices=BUDGETS),
    "signal_batches": dict(type=int),
    "signal_norm": dict(type=_none_or, choices=(None, "rms"), metavar="{none,rms}"),
    "signal_density": dict(type=_on_off, metavar="{on,off}"),
    "innocent_weight": dict(type=float),
    "init": dict(choices=("uniform", "constant", *RANKINGS)),
}
#: Every LearnerConfig field with a flag of its name (as_flags speaks of them as flags).
FLAG_FIELDS = ("freeze_ratio", "seed", *LEARNER_FLAGS)


def _demo_preset() -> LearnerConfig:
    """The demo's learner (freezeguard.apps.demo_config.DEMO_LEARNER), read at run time: one source of truth."""
    from freezeguard.apps.demo_config import DEMO_LEARNER

    return DEMO_LEARNER


#: The authors' loop: LearnerConfig's defaults, with their c_sparsity.
PRESETS = {"demo": _demo_preset, "authors": lambda: LearnerConfig(c_sparsity=5e3)}


def learner_config(args: argparse.Namespace) -> tuple[LearnerConfig, str | None]:
    """The run's LearnerConfig: the --preset's, each learner flag given overriding its own; and the
    ranking the logits start from (--init delta / cross-attention; None otherwise).

    A bad value raises ValueError (the LearnerConfig's check), in this command's flags.
    """
    given = {name: getattr(args, name) for name in LEARNER_FLAGS if hasattr(args, name)}  # (None: --signal-norm none)
    ranking = given.get("init") if given.get("init") in RANKINGS else None
    if ranking is not None:
        given["init"] = "scores"
    try:
        config = PRESETS[args.preset]().replace(freeze_ratio=args.freeze_ratio, seed=args.seed, **given)
    except ValueError as exc:
        raise ValueError(as_flags(str(exc))) from None
    return config, ranking


def _learner_help(name: str) -> str:
    """The field's documentation in this command's flags, and how --init names a ranking."""
    text = re.sub(r"``(\w+)``", lambda m: "--" + m.group(1).replace("_", "-") if m.group(1) in FLAG_FIELDS
                  else m.group(1), LearnerConfig.doc(name))
    if name == "init":
        text += ("; here a ranking's name starts from it (init scores): delta, largest mean |pretrained - finetuned| "
                 "first; cross-attention, the cross-attention projections first")
    return text


HELP = "learn which denoiser tensors to freeze so fine-tunes on the target data fail (bilevel MaskLearner)"
DESCRIPTION = (
    "Learn a FreezeAsGuard mask for the denoiser (UNet of SD-1.x/2.x/SDXL, transformer of SD3/Flux) of a "
    "local diffusers pipeline folder. "
    "--pretrained is the model you release, --finetuned your own full fine-tune of it on target + "
    "innocent data (`freezeguard finetune`). The learner alternates releaser steps (make the "
    "target loss rise and keep the innocent loss low through the mask) and simulated-user fine-tune "
    "steps, then writes a mask meeting --freeze-ratio exactly (--out, safetensors), a PNG of the "
    "soft mask per tensor grouped by UNet block and a per-step JSONL log. Everything is checked "
    "(folders, data, model match, ratio) before the learning starts. Nothing is downloaded."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained", required=True, help="local diffusers SD folder: the model you release")
    parser.add_argument("--finetuned", required=True,
                        help="your full fine-tune of --pretrained on target + innocent data "
                             "(pipeline folder, or its unet/ or transformer/ folder)")
    parser.add_argument("--target-data", required=True, help="imagefolder of the target (illegal) domain")
    parser.add_argument("--innocent-data", required=True, help="imagefolder of innocent data to keep working")
    parser.add_argument("--freeze-ratio", type=ratio, required=True, help=_learner_help("freeze_ratio"))
    parser.add_argument("--out", required=True, help="mask file to write (.safetensors)")
    parser.add_argument("--steps", type=int, default=100, help="total learner steps (releaser + user)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per step, half target, half innocent")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="demo",
                        help="the learner's settings in one flag (each flag below overrides its own). demo "
                             "(default, the project's recommendation): the settings `freezeguard demo` measured, "
                             "with which the data moves the mask away from its start (budget by parameters, "
                             "projected budget, 4 RMS-normalised signal batches per logit step ranked per "
                             "parameter, constant start, AdamW user at lr 1e-3). authors: the FreezeAsGuard "
                             "paper's loop (by tensors, budget penalty c=5e3, one batch per step, uniform "
                             "start, SGD user at lr 1e-5); on a small model its penalty can drown the data, "
                             "leaving the random start (the command warns)")
    for name, kind in LEARNER_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), default=argparse.SUPPRESS, **kind,
                            help=_learner_help(name) + " (default: the --preset's)")
    parser.add_argument("--hard-mask", type=_hard_mask_rule, choices=HARD_MASK_RULES, default="topk",
                        help="topk: meet the ratio exactly; threshold (formerly round): m > 0.5 as the reference")
    parser.add_argument("--seed", type=int, default=0, help=_learner_help("seed"))
    parser.add_argument("--resolution", type=int, default=None, help="resize + centre-crop images to this size")
    parser.add_argument("--caption-column", default="text", help="caption column of metadata.jsonl")
    parser.add_argument("--state", default=None, help="learner state file to write (resumable with --resume)")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="with --state: also save every N steps (0: only at the end)")
    parser.add_argument("--resume", default=None,
                        help="learner state file to continue from (see --state); the hyperparameters must be "
                             "the ones it was saved with (refused otherwise, see --override-hparams)")
    parser.add_argument("--override-hparams", action="store_true",
                        help="with --resume: continue with this run's --mask-lr, --c-sparsity, --temperature, "
                             "--user-lr and --user-interval where they differ from the state's (with a warning)")
    parser.add_argument("--plot", default=None, help="PNG of the soft mask (default: <out>.png)")
    parser.add_argument("--log", default=None, help="per-step JSONL log (default: <out>.log.jsonl)")
    parser.add_argument("--backend", default="auto", help="fused-op backend: auto, torch, cpp, triton, cuda")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_threads_argument(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _error(msg: str) -> int:
    print(f"freezeguard learn: error: {msg}", file=sys.stderr)
    return 2


def as_flags(msg: str) -> str:
    """The learner's Python spellings as this command's flags: c_sparsity='auto' -> --c-sparsity auto.

    Example:
        >>> as_flags("use c_sparsity='auto' or budget='projected', or raise mask_lr")
        'use --c-sparsity auto or --budget projected, or raise --mask-lr'
    """
    names = "|".join(FLAG_FIELDS)
    msg = re.sub(rf"\b({names})='([^']*)'", lambda m: f"--{m.group(1).replace('_', '-')} {m.group(2)}", msg)
    return re.sub(rf"(?<![-\w])({names})\b", lambda m: "--" + m.group(1).replace("_", "-"), msg)


def _warn(msg: str) -> None:
    # said once, plainly, after the progress bar (not as a Python source line), in this command's flags
    print(f"freezeguard learn: warning: {as_flags(msg)}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        config, ranking = learner_config(args)
    except ValueError as exc:
        return _error(str(exc))
    with apply_threads(args.threads, denoiser_params(args.pretrained)):
        return _run(args, config, ranking)


def _run(args: argparse.Namespace, config: LearnerConfig, ranking: str | None) -> int:
    from freezeguard.apps.learn.run import LearnInputError, learn

    try:
        summary = learn(args.pretrained, args.finetuned, args.target_data, args.innocent_data, args.out, config,
                        ranking=ranking, steps=args.steps, batch_size=args.batch_size, hard_mask=args.hard_mask,
                        resolution=args.resolution, caption_column=args.caption_column, state=args.state,
                        checkpoint_every=args.checkpoint_every, resume=args.resume, plot=args.plot, log=args.log,
                        backend=args.backend, device=args.device, progress=not args.quiet, on_warning=_warn,
                        override_hparams=args.override_hparams)
    except (LearnInputError, ValueError, FloatingPointError) as exc:
        return _error(str(exc))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"mask written to {summary['out']}: {summary['frozen_tensors']}/{summary['tensors']} tensors frozen "
              f"({summary['ratio_tensors']:.1%} of tensors, {summary['ratio_params']:.1%} of parameters) "
              f"after {summary['steps']} steps in {summary['seconds']:.1f}s on {summary['device']}; "
              f"the data moved {summary['frozen_moved']} of the frozen tensors away from the {summary['init']} "
              "initial mask; "
              f"plot {summary['plot'] or '(skipped)'}, log {summary['log']}")
    return 0
