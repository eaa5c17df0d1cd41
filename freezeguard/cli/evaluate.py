"""`freezeguard evaluate`: how much does a mask hold back a fine-tune, against random freezing?"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freezeguard.cli.threads import add_threads_argument, apply_threads, denoiser_params

if TYPE_CHECKING:  # run.py imports torch: the command line loads it only once the arguments are checked
    from freezeguard.apps.evaluate.run import EvaluationSettings

HELP = "simulate user fine-tunes under no mask / random masks / your mask; report mitigation and innocent impact"
DESCRIPTION = (
    HELP + ". Without --pretrained it evaluates a mask for the built-in toy model (see `freezeguard demo`), "
    "with sample recognisability judged by the built-in classifier. With --pretrained (a local diffusers "
    "Stable Diffusion folder) and imagefolder data it reports held-out denoising loss and prompt gain; "
    "CLIP score / FID are skipped (they need local judge weights, not taken by this build)."
)


def _ratio_list(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


# Options left unset take the demo's value (freezeguard.apps.demo_config.DemoConfig), so `freezeguard
# evaluate` on the demo's mask measures what the demo measured.
DEMO_DEFAULTS = {"lr": "attacker_lr", "steps": "attacker_steps", "batch_size": "batch_size",
                 "strong_lr_mult": "strong_lr_mult", "strong_steps_mult": "strong_steps_mult",
                 "random_seeds": "random_seeds", "samples": "sample_n", "sample_steps": "sample_steps"}


class UsageError(ValueError):
    """Bad command-line input, reported (exit 2) before any long work."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mask", default=None, help="mask file (.safetensors) to evaluate (optional with --baselines)")
    parser.add_argument("--baselines", default=None, metavar="LIST",
                        help="comma-separated baselines to compare: imma, ablation, uce, udp, or 'all'; they face the "
                             "same attackers, plus a rank-4 LoRA attacker where the model has attention")
    parser.add_argument("--baseline-steps", type=int, default=None, metavar="N",
                        help="cap every iterative baseline at N steps (ablation and IMMA steps; UDP: 1 round of N "
                             "surrogate and N noise steps) -- a smoke test; default: each paper's, scaled")
    parser.add_argument("--anchor", default="square",
                        help="toy model: the class UCE / Concept Ablation map the target onto (a class it knows)")
    parser.add_argument("--target-prompt", default=None, help="with --pretrained: the target concept's prompt (UCE, ablation)")
    parser.add_argument("--anchor-prompt", default=None, help="with --pretrained: the anchor concept's prompt (UCE, ablation)")
    parser.add_argument("--preserve-prompt", action="append", default=[],
                        help="with --pretrained: a prompt UCE must preserve (repeat for several)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes running the fine-tunes in parallel (CPU; the figures do not depend on it)")
    parser.add_argument("--pretrained", default=None, help="local diffusers SD folder (default: the built-in toy model)")
    parser.add_argument("--target-data", default=None, help="imagefolder of the target domain (with --pretrained)")
    parser.add_argument("--innocent-data", action="append", default=[],
                        help="imagefolder of an innocent domain (repeat for several; with --pretrained)")
    parser.add_argument("--heldout", type=int, default=None,
                        help="held-out images per domain (default: 64 generated for the toy model; "
                             "the last 4 of each imagefolder for real models)")
    parser.add_argument("--samples", type=int, default=None,
                        help="toy model: images generated per domain for the judge (default: the demo's)")
    parser.add_argument("--sample-steps", type=int, default=None,
                        help="toy model: DDIM steps per generated image (default: the demo's)")
    parser.add_argument("--resolution", type=int, default=None, help="resize + centre-crop images (real models)")
    parser.add_argument("--lr", type=float, default=None, help="simulated user's AdamW learning rate (default: the demo's)")
    parser.add_argument("--steps", type=int, default=None, help="simulated user's fine-tuning steps (default: the demo's)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: the demo's)")
    parser.add_argument("--strong-lr-mult", type=_ratio_list, default=None,
                        help="the '<k>x lr' attacker's lr multiplier (1 drops it; default: the demo's)")
    parser.add_argument("--strong-steps-mult", type=_ratio_list, default=None,
                        help="the '<k>x steps' attacker's steps multiplier (1 drops it; default: the demo's)")
    parser.add_argument("--no-strong", action="store_true", help="evaluate against the standard attacker only")
    parser.add_argument("--random-seeds", type=int, default=None,
                        help="random masks at the same ratio (default: the demo's)")
    parser.add_argument("--attack-seeds", type=int, default=1,
                        help="repeat every fine-tune under this many draws of the attack's randomness (data order, "
                             "noise) and average each contender over them; one draw can move every figure by more "
                             "than the gap between masks; with 2 or more the report says, per metric, how "
                             "much of the gaps between masks is reproducible (default 1; each adds the whole "
                             "evaluation's time)")
    parser.add_argument("--budget-by", choices=("tensors", "params"), default=None,
                        help="the random masks match the mask's share of tensors or of parameters "
                             "(default: the basis the mask was made on, as the demo)")
    parser.add_argument("--cache-dir", default=None, help="cache of the toy model and judge")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (data, masks, noise)")
    parser.add_argument("--out", default="freezeguard-report",
                        help="report folder (Markdown, PNGs, JSON), created if need be; 'none': no report")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def demo_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """The options of DEMO_DEFAULTS, each as given or, left unset, the demo's value."""
    from freezeguard.apps.demo_config import DemoConfig

    demo = DemoConfig()
    return {arg: getattr(demo, field) if getattr(args, arg) is None else getattr(args, arg)
            for arg, field in DEMO_DEFAULTS.items()}


def check_args(args: argparse.Namespace) -> EvaluationSettings:
    """Validate every input before anything is pretrained or loaded; returns the run's settings.

    ``args`` is left as parsed: the demo's defaults, the baselines, the attackers, the report
    folder and the random masks' basis are filled in the returned settings only.
    Raises UsageError (or FreezeMaskFileError) naming the bad input.
    """
    from freezeguard.apps.baselines.harness import resolve_methods, step_overrides
    from freezeguard.core.mask import FreezeMask, describe_layout_mismatch

    given = demo_defaults(args)
    if not args.mask and not args.baselines:
        raise UsageError("give --mask, --baselines, or both")
    try:
        methods = resolve_methods(args.baselines) if args.baselines else []
        overrides = step_overrides(args.baseline_steps)
    except ValueError as exc:
        raise UsageError(f"--baselines: {exc}") from None
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    prompts = {"uce", "ablation"} & set(methods)
    if args.pretrained and prompts and not (args.target_prompt and args.anchor_prompt):
        raise UsageError(f"{', '.join(sorted(prompts))} need --target-prompt and --anchor-prompt "
                         "(the concept to erase and the one to map it onto)")
    if not (given["lr"] > 0 and math.isfinite(given["lr"])):
        raise UsageError(f"--lr must be a positive number, got {given['lr']}")
    for flag, value, low in (("--steps", given["steps"], 1), ("--batch-size", given["batch_size"], 1),
                             ("--random-seeds", given["random_seeds"], 0), ("--samples", given["samples"], 1),
                             ("--attack-seeds", args.attack_seeds, 1),
                             ("--sample-steps", given["sample_steps"], 1),
                             ("--heldout", args.heldout if args.heldout is not None else 1, 1),
                             ("--resolution", args.resolution if args.resolution is not None else 1, 1)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    from freezeguard.apps.evaluate.run import EvaluationSettings, attackers_for

    try:
        attackers = attackers_for(given["lr"], given["steps"], strong=not args.no_strong,
                                  lr_mult=given["strong_lr_mult"], steps_mult=given["strong_steps_mult"],
                                  lora=bool(args.baselines))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out = None if args.out == "none" else args.out
    if out is not None:
        from freezeguard.core import files

        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--out {folder} exists and is not a folder")
        inputs = {"--mask": args.mask, "--pretrained": args.pretrained, "--target-data": args.target_data,
                  **{f"--innocent-data {p}": p for p in args.innocent_data}}
        try:
            files.check_outputs({"--out": folder}, inputs, parents=True)
        except files.OutputError as exc:
            raise UsageError(str(exc)) from None
    mask = FreezeMask.load(args.mask) if args.mask else None  # the file itself: header first, checksum, version
    budget_by = args.budget_by
    if budget_by is None:
        by = mask.metadata.get("budget_by", "tensors") if mask is not None else "tensors"
        budget_by = by if by in ("tensors", "params") else "tensors"
    from freezeguard.apps.demo_config import DemoConfig

    if args.pretrained:
        from freezeguard.core.weights import WeightsError, weights_layout
        from freezeguard.integrations.diffusers.pipeline import PipelineError, check_pipeline_folder

        if not args.target_data:
            raise UsageError("--pretrained needs --target-data (and usually --innocent-data)")
        for flag, path in [("--target-data", args.target_data)] + [("--innocent-data", p) for p in args.innocent_data]:
            if not Path(path).is_dir():
                raise UsageError(f"{flag} {path} does not exist (or is not a folder)")
        try:
            root = check_pipeline_folder(args.pretrained)
            layout = weights_layout(root / "unet", "--pretrained unet")
        except (PipelineError, WeightsError) as exc:
            raise UsageError(str(exc)) from None
    else:
        if args.target_data or args.innocent_data:
            raise UsageError("--target-data / --innocent-data need --pretrained (the toy model has its own data)")
        from freezeguard.integrations.diffusers import toy

        layout = {n: tuple(p.shape) for n, p in toy.build_model(DemoConfig().pretrain.model).named_parameters()}
    if mask is not None:
        mismatch = describe_layout_mismatch(mask.layout, layout, missing="missing from the model",
                                            extra="not in the mask", reshaped="reshaped")
        if mismatch:
            what = args.pretrained or "the built-in toy model"
            raise UsageError(f"--mask {args.mask} was made for a different model than {what} ({mismatch})")
    return EvaluationSettings(
        attackers=tuple(attackers), lr=given["lr"], steps=given["steps"], batch_size=given["batch_size"],
        random_seeds=given["random_seeds"], mask=args.mask, methods=tuple(methods), overrides=overrides,
        pretrained=args.pretrained, target_data=args.target_data, innocent_data=tuple(args.innocent_data),
        heldout=args.heldout, samples=given["samples"], sample_steps=given["sample_steps"],
        resolution=args.resolution, anchor=args.anchor, target_prompt=args.target_prompt,
        anchor_prompt=args.anchor_prompt, preserve_prompt=tuple(args.preserve_prompt), budget_by=budget_by,
        attack_seeds=args.attack_seeds, workers=args.workers, seed=args.seed, out=out, cache_dir=args.cache_dir,
        device=args.device, toy_world=None if args.pretrained else DemoConfig())


def _error(msg: str) -> int:
    print(f"freezeguard evaluate: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    # the built-in toy model is small (one thread); a pipeline's denoiser is sized from its headers
    with apply_threads(args.threads, denoiser_params(args.pretrained) if args.pretrained else 0):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from freezeguard.core.mask_files import FreezeMaskFileError

    try:
        settings = check_args(args)
    except (UsageError, FreezeMaskFileError) as exc:
        return _error(str(exc))
    from freezeguard.apps.plots import plots_available

    if settings.out and not plots_available():
        print("freezeguard evaluate: warning: matplotlib is not installed, so the report will have no PNGs "
              "(pip install matplotlib); its tables and JSON are written", file=sys.stderr)

    from freezeguard.apps.evaluate.report import format_table, headline, jsonable, table_rows
    from freezeguard.apps.evaluate.run import EvaluationInputError, run_evaluation

    try:
        summary = run_evaluation(settings, progress=not args.quiet,
                                 on_note=lambda msg: print(f"freezeguard evaluate: {msg}", file=sys.stderr))
    except EvaluationInputError as exc:
        return _error(str(exc))
    if args.json:
        print(json.dumps(jsonable(summary), indent=2))
        return 0
    print(format_table(*table_rows(summary)))
    print()
    print("\n".join(headline(summary)))
    if settings.out:
        print(f"report written to {summary['report_dir']}/report.md")
    return 0
