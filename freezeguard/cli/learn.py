"""`freezeguard learn`: learn a freeze mask for a local Stable Diffusion folder (FreezeAsGuard)."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

HELP = "learn which UNet tensors to freeze so fine-tunes on the target data fail (bilevel MaskLearner)"
DESCRIPTION = (
    "Learn a FreezeAsGuard mask for the UNet of a local diffusers Stable Diffusion folder. "
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
                             "(SD folder or unet/ folder)")
    parser.add_argument("--target-data", required=True, help="imagefolder of the target (illegal) domain")
    parser.add_argument("--innocent-data", required=True, help="imagefolder of innocent data to keep working")
    parser.add_argument("--freeze-ratio", type=_ratio, required=True, help="share of tensors (or params) to freeze")
    parser.add_argument("--out", required=True, help="mask file to write (.safetensors)")
    parser.add_argument("--steps", type=int, default=100, help="total learner steps (releaser + user)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per step, half target, half innocent")
    parser.add_argument("--budget-by", choices=("tensors", "params"), default="tensors",
                        help="the budget counts tensors or parameters")
    parser.add_argument("--user-optimizer", choices=("sgd", "adamw"), default="sgd",
                        help="simulated user: SGD (the reference) or AdamW (a stronger attacker)")
    parser.add_argument("--user-lr", type=float, default=1e-5, help="simulated user's learning rate")
    parser.add_argument("--user-interval", type=int, default=5, help="one releaser step every N steps")
    parser.add_argument("--mask-lr", type=float, default=10.0, help="learning rate of the mask logits")
    parser.add_argument("--temperature", type=float, default=0.2, help="soft mask m = sigmoid(x / T)")
    parser.add_argument("--c-sparsity", type=float, default=5e3, help="weight of the budget penalty")
    parser.add_argument("--hard-mask", choices=("topk", "round"), default="topk",
                        help="topk: meet the ratio exactly; round: m > 0.5 as the reference")
    parser.add_argument("--seed", type=int, default=0, help="seed of the logits, batch order, noise, timesteps")
    parser.add_argument("--resolution", type=int, default=None, help="resize + centre-crop images to this size")
    parser.add_argument("--caption-column", default="text", help="caption column of metadata.jsonl")
    parser.add_argument("--state", default=None, help="learner state file to write (resumable with --resume)")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="with --state: also save every N steps (0: only at the end)")
    parser.add_argument("--resume", default=None, help="learner state file to continue from (see --state)")
    parser.add_argument("--plot", default=None, help="PNG of the soft mask (default: <out>.png)")
    parser.add_argument("--log", default=None, help="per-step JSONL log (default: <out>.log.jsonl)")
    parser.add_argument("--backend", default="auto", help="fused-op backend: auto, torch, cpp, triton, cuda")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


class UsageError(ValueError):
    """Bad command-line input, reported before any long work."""


def _error(msg: str) -> int:
    print(f"freezeguard learn: error: {msg}", file=sys.stderr)
    return 2


def _unet_dir(path: str, flag: str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"{flag} {root} does not exist (a local diffusers folder is needed; nothing is downloaded)")
    for cand in (root / "unet", root):
        if (cand / "config.json").is_file():
            return cand
    raise UsageError(f"{flag} {root} is neither a diffusers pipeline folder (unet/config.json) nor a unet folder")


def _unet_layout(unet_dir: Path, flag: str) -> dict[str, tuple[int, ...]]:
    """name -> shape from the safetensors headers, without loading any weight (pickles refused)."""
    from freezeguard.core.weights import WeightsError, weights_layout

    try:
        return weights_layout(unet_dir, flag)
    except WeightsError as exc:
        raise UsageError(str(exc)) from None


def _check_same_model(pre: dict, ft: dict) -> None:
    from freezeguard.core.mask import describe_layout_mismatch

    mismatch = describe_layout_mismatch(pre, ft, missing="missing from --finetuned", extra="not in --pretrained",
                                        reshaped="shapes differ", arrow="vs", limit=5)
    if mismatch:
        raise UsageError(f"--finetuned is not a fine-tune of --pretrained ({mismatch})")


def _check_cheap(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """Every check that needs no model loaded: options, paths, model match (from file headers)."""
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 2:
        raise UsageError(f"--batch-size must be >= 2 (each batch mixes target and innocent images), "
                         f"got {args.batch_size}")
    if args.user_interval < 1:
        raise UsageError(f"--user-interval must be >= 1, got {args.user_interval}")
    for flag, value in (("--user-lr", args.user_lr), ("--mask-lr", args.mask_lr), ("--c-sparsity", args.c_sparsity)):
        if not value >= 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.checkpoint_every < 0 or (args.checkpoint_every and not args.state):
        raise UsageError("--checkpoint-every needs --state and must be >= 0")
    for flag, path in (("--target-data", args.target_data), ("--innocent-data", args.innocent_data)):
        if not Path(path).is_dir():
            raise UsageError(f"{flag} {path} does not exist (or is not a folder)")
    if args.resume and not Path(args.resume).is_file():
        raise UsageError(f"--resume {args.resume} does not exist")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as mask.safetensors")
    if not out.parent.exists():
        raise UsageError(f"--out: folder {out.parent} does not exist")
    pre_dir = _unet_dir(args.pretrained, "--pretrained")
    ft_dir = _unet_dir(args.finetuned, "--finetuned")
    _check_same_model(_unet_layout(pre_dir, "--pretrained"), _unet_layout(ft_dir, "--finetuned"))
    return Path(args.pretrained), ft_dir, out


def run(args: argparse.Namespace) -> int:
    try:
        pre_root, ft_dir, out = _check_cheap(args)
    except UsageError as exc:
        return _error(str(exc))

    import torch

    from freezeguard.apps.learn.learner import MaskLearner
    from freezeguard.apps.learn.plot import plot_soft_mask
    from freezeguard.integrations.diffusers.data import DatasetError, ImageFolderDataset, mixed_batches
    from freezeguard.integrations.diffusers.pipeline import PipelineError, load_components

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        comps = load_components(pre_root, dtype=torch.float32)
        data_kwargs = {"resolution": args.resolution, "tokenizer": comps.tokenizer,
                       "caption_column": args.caption_column}
        target = ImageFolderDataset(args.target_data, role="target", **data_kwargs)
        innocent = ImageFolderDataset(args.innocent_data, role="innocent", **data_kwargs)
        if target.image_size != innocent.image_size:
            raise DatasetError(f"target images are {target.image_size} but innocent images are "
                               f"{innocent.image_size}; pass --resolution")
        unet = comps.unet
        unet_cls = type(unet)
        comps.to(device)
        loss_fn = comps.loss_fn()
        if args.resume:
            learner = MaskLearner.load(args.resume, unet, loss_fn, backend=args.backend)
        else:
            pre_state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
            ft_state = unet_cls.from_pretrained(str(ft_dir), torch_dtype=torch.float32,
                                                local_files_only=True).state_dict()
            learner = MaskLearner(unet, pre_state, ft_state, loss_fn, freeze_ratio=args.freeze_ratio,
                                  temperature=args.temperature, c_sparsity=args.c_sparsity, mask_lr=args.mask_lr,
                                  user_lr=args.user_lr, user_interval=args.user_interval, budget_by=args.budget_by,
                                  user_optimizer=args.user_optimizer, seed=args.seed, backend=args.backend)
            del pre_state, ft_state
    except (ValueError, KeyError, TypeError, DatasetError, PipelineError) as exc:
        return _error(str(exc).strip("'\""))
    if args.resume and learner.freeze_ratio != args.freeze_ratio:
        return _error(f"--resume state was learned with ratio {learner.freeze_ratio}, not --freeze-ratio "
                      f"{args.freeze_ratio}")

    unet.train()
    done = learner.step_count
    remaining = max(0, args.steps - done)
    batches = mixed_batches(target, innocent, args.batch_size, seed=args.seed)

    def with_generator(stream):
        # Per-step generators make noise and timesteps a function of (seed, step): a resumed run
        # continues exactly as an uninterrupted one.
        step = 0
        for batch in stream:
            if step >= done:
                gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)
                yield dict(batch, generator=gen)
            step += 1

    log_path = Path(args.log) if args.log else out.with_name(out.name + ".log.jsonl")
    plot_path = Path(args.plot) if args.plot else out.with_name(out.name + ".png")
    started = time.perf_counter()
    with open(log_path, "a" if args.resume else "w", encoding="utf-8") as log_file:
        def on_step(entry: dict) -> None:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()
            if args.checkpoint_every and learner.step_count % args.checkpoint_every == 0:
                learner.save(args.state)

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                learner.fit(with_generator(batches), remaining, progress=not args.quiet, callback=on_step)
        except (ValueError, FloatingPointError) as exc:
            return _error(str(exc))
    for w in caught:  # said once, plainly, after the progress bar (not as a Python source line)
        print(f"freezeguard learn: warning: {w.message}", file=sys.stderr)
    seconds = time.perf_counter() - started

    if args.state:
        learner.save(args.state)
    mask = learner.hard_mask(args.hard_mask)
    unet.to("cpu")
    mask.save(str(out), model=unet)
    soft = learner.soft_mask()
    plot_soft_mask(soft, plot_path, frozen=mask.frozen_names,
                   title=f"soft mask after {learner.step_count} steps (target ratio {args.freeze_ratio} "
                         f"by {args.budget_by})")
    last = learner.history[-1] if learner.history else {}
    summary = {
        "out": str(out), "plot": str(plot_path), "log": str(log_path), "state": args.state,
        "steps": learner.step_count, "steps_this_run": remaining, "seconds": round(seconds, 3),
        "device": str(device), "budget_by": args.budget_by, "target_ratio": args.freeze_ratio,
        "realised_ratio": mask.ratio(args.budget_by), "ratio_tensors": mask.ratio("tensors"),
        "ratio_params": mask.ratio("params"), "frozen_tensors": len(mask.frozen_names),
        "tensors": len(mask.names), "hard_mask": args.hard_mask,
        "final_target_loss": last.get("target_loss"), "final_innocent_loss": last.get("innocent_loss"),
        "soft_ratio": last.get("soft_ratio"),
        # tensors the data moved in or out of the mask, against the random initial logits' mask
        "mask_moved": last.get("mask_moved"),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"mask written to {out}: {summary['frozen_tensors']}/{summary['tensors']} tensors frozen "
              f"({summary['ratio_tensors']:.1%} of tensors, {summary['ratio_params']:.1%} of parameters) "
              f"after {summary['steps']} steps in {seconds:.1f}s on {device}; {summary['mask_moved']} tensors moved "
              f"by the data from the random initial mask; plot {plot_path}, log {log_path}")
    return 0
