"""`freezeguard learn`: learn a freeze mask for a local Stable Diffusion folder (FreezeAsGuard)."""
from __future__ import annotations

import argparse
import json
import math
import re
import sys

from freezeguard.cli.flags import number_or_auto
from freezeguard.cli.threads import add_threads_argument, apply_threads, denoiser_params

#: The learner settings a preset fills; a flag given on the command line overrides its own.
LEARNER_FLAGS = ("budget_by", "user_optimizer", "user_lr", "user_interval", "mask_lr", "temperature",
                 "c_sparsity", "budget", "signal_batches", "signal_norm", "signal_density", "innocent_weight",
                 "init")
AUTHORS = dict(budget_by="tensors", user_optimizer="sgd", user_lr=1e-5, user_interval=5, mask_lr=10.0,
               temperature=0.2, c_sparsity=5e3, budget="penalty", signal_batches=1, signal_norm="none",
               signal_density="off", innocent_weight=1.0, init="uniform")


def _demo_preset() -> dict:
    """The demo's learner (freezeguard.apps.demo.DemoConfig), read at run time: one source of truth."""
    from freezeguard.apps.demo import DemoConfig

    demo = DemoConfig()
    values = {name: getattr(demo, name) for name in LEARNER_FLAGS}
    values["signal_norm"] = values["signal_norm"] or "none"
    values["signal_density"] = "on" if values["signal_density"] else "off"
    return values


PRESETS = {"demo": _demo_preset, "authors": lambda: dict(AUTHORS)}


def resolve_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every learner flag left unset with the preset's value (in place; returns ``args``)."""
    preset = PRESETS[args.preset]()
    for name in LEARNER_FLAGS:
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    return args

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


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained", required=True, help="local diffusers SD folder: the model you release")
    parser.add_argument("--finetuned", required=True,
                        help="your full fine-tune of --pretrained on target + innocent data "
                             "(pipeline folder, or its unet/ or transformer/ folder)")
    parser.add_argument("--target-data", required=True, help="imagefolder of the target (illegal) domain")
    parser.add_argument("--innocent-data", required=True, help="imagefolder of innocent data to keep working")
    parser.add_argument("--freeze-ratio", type=_ratio, required=True, help="share of tensors (or params) to freeze")
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
    parser.add_argument("--budget-by", choices=("tensors", "params"), default=None,
                        help="the budget counts tensors or parameters (default: the preset's)")
    parser.add_argument("--user-optimizer", choices=("sgd", "adamw"), default=None,
                        help="simulated user: SGD (the authors') or AdamW (a stronger attacker)")
    parser.add_argument("--user-lr", type=float, default=None, help="simulated user's learning rate")
    parser.add_argument("--user-interval", type=int, default=None, help="one releaser step every N steps")
    parser.add_argument("--mask-lr", type=float, default=None, help="learning rate of the mask logits")
    parser.add_argument("--temperature", type=float, default=None, help="soft mask m = sigmoid(x / T)")
    parser.add_argument("--c-sparsity", type=number_or_auto(float, 0), default=None,
                        help="weight of the budget penalty: a number (the authors': 5e3) or 'auto' (the c whose "
                             "first step lands the soft ratio on --freeze-ratio)")
    parser.add_argument("--budget", choices=("penalty", "projected"), default=None,
                        help="penalty (the authors') or projected (one common logit shift holds the soft ratio "
                             "at --freeze-ratio after every releaser step)")
    parser.add_argument("--signal-batches", type=int, default=None,
                        help="releaser batches averaged into one logit step (1: the authors')")
    parser.add_argument("--signal-norm", choices=("none", "rms"), default=None,
                        help="rms: divide the data signal by its RMS over tensors (then --mask-lr ~ 0.01-0.1)")
    parser.add_argument("--signal-density", choices=("on", "off"), default=None,
                        help="on: rank tensors by the data signal per unit of budget (per parameter with "
                             "--budget-by params; no change by tensors)")
    parser.add_argument("--innocent-weight", type=float, default=None,
                        help="weight of the innocent (legal) loss against the target's in the releaser's "
                             "objective (1: the authors'; 0: the legal domain does not count)")
    parser.add_argument("--init", choices=("uniform", "constant", "delta", "cross-attention"), default=None,
                        help="initial logits: uniform U[0,1) (the authors'), constant, or a reference ranking "
                             "(largest mean |pretrained - finetuned| first; cross-attention projections first)")
    parser.add_argument("--hard-mask", choices=("topk", "threshold", "round"), default="topk",
                        help="topk: meet the ratio exactly; round: m > 0.5 as the reference")
    parser.add_argument("--seed", type=int, default=0, help="seed of the logits, batch order, noise, timesteps")
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
    names = "|".join(LEARNER_FLAGS)
    msg = re.sub(rf"\b({names})='([^']*)'", lambda m: f"--{m.group(1).replace('_', '-')} {m.group(2)}", msg)
    return re.sub(rf"(?<![-\w])({names})\b", lambda m: "--" + m.group(1).replace("_", "-"), msg)


def _warn(msg: str) -> None:
    # said once, plainly, after the progress bar (not as a Python source line), in this command's flags
    print(f"freezeguard learn: warning: {as_flags(msg)}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:

    resolve_preset(args)
    with apply_threads(args.threads, denoiser_params(args.pretrained)):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from freezeguard.apps.learn.run import LearnInputError, learn

    try:
        summary = learn(args.pretrained, args.finetuned, args.target_data, args.innocent_data, args.out,
                        freeze_ratio=args.freeze_ratio, steps=args.steps, batch_size=args.batch_size,
                        budget_by=args.budget_by, user_optimizer=args.user_optimizer, user_lr=args.user_lr,
                        user_interval=args.user_interval, mask_lr=args.mask_lr, temperature=args.temperature,
                        c_sparsity=args.c_sparsity, hard_mask=args.hard_mask, seed=args.seed,
                        budget=args.budget, signal_batches=args.signal_batches,
                        signal_norm=None if args.signal_norm == "none" else args.signal_norm,
                        signal_density=args.signal_density == "on", innocent_weight=args.innocent_weight, init=args.init,
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
