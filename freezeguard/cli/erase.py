"""`freezeguard erase`: erase a concept from a local SD pipeline and write the erased release.

The first step of FreezeAsGuard as its authors run it (docs/evaluation.md): erase -> relearn
fine-tune (``freezeguard finetune``) -> ``freezeguard learn`` between the erased and the relearned
model -> release the erased model with the mask (``freezeguard evaluate`` attacks it).
"""
from __future__ import annotations

import argparse
import json
import sys

HELP = "erase a concept (UCE or Concept Ablation) from a local SD pipeline; write the erased release"
DESCRIPTION = (HELP + ". UCE (the FreezeAsGuard authors' eraser) maps the target prompt onto the anchor prompt in "
               "every cross-attention key/value projection, in closed form; Concept Ablation fine-tunes those "
               "projections so the target prompt denoises like the anchor. The output is the same pipeline with "
               "its UNet replaced (safetensors, written to a temporary folder and renamed).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained", required=True, help="local diffusers SD folder that knows the concept")
    parser.add_argument("--out", required=True, help="folder to write the erased pipeline to")
    parser.add_argument("--target-prompt", required=True, help="the concept to erase, e.g. 'a photo of Ann Smith'")
    parser.add_argument("--anchor-prompt", required=True,
                        help="what the target is mapped onto, e.g. 'a photo of a person' (the authors: 'celebrity')")
    parser.add_argument("--preserve-prompt", action="append", default=[], metavar="PROMPT",
                        help="a prompt whose cross-attention keys/values must not change (repeatable; UCE)")
    parser.add_argument("--eraser", choices=("uce", "ablation"), default="uce",
                        help="uce (closed form, the authors') or ablation (Concept Ablation, a fine-tune)")
    parser.add_argument("--anchor-data", default=None,
                        help="imagefolder whose images Concept Ablation noises (required with --eraser ablation)")
    parser.add_argument("--lr", type=float, default=1e-5,
                        help="the lr a user fine-tunes this model with; Concept Ablation trains at 1.6x it")
    parser.add_argument("--steps", type=int, default=None, help="Concept Ablation's steps (default: the authors' 100)")
    parser.add_argument("--resolution", type=int, default=None, help="resize + centre-crop anchor images to this size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def _error(msg: str) -> int:
    print(f"freezeguard erase: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.eraser == "ablation" and not args.anchor_data:
        return _error("--eraser ablation needs --anchor-data (an imagefolder of images to noise)")
    if args.steps is not None and args.steps < 1:
        return _error(f"--steps must be >= 1, got {args.steps}")
    if not args.lr > 0:
        return _error(f"--lr must be > 0, got {args.lr}")
    if Path(args.out).exists() and Path(args.out).resolve() == Path(args.pretrained).resolve():
        return _error("--out is the --pretrained folder; the release is never overwritten")
    import torch

    from freezeguard.apps.erase import erase_pipeline
    from freezeguard.integrations.diffusers.data import DatasetError
    from freezeguard.integrations.diffusers.pipeline import PipelineError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        summary = erase_pipeline(args.pretrained, args.out, target_prompt=args.target_prompt,
                                 anchor_prompt=args.anchor_prompt, preserve_prompts=args.preserve_prompt,
                                 eraser=args.eraser, anchor_data=args.anchor_data, reference_lr=args.lr,
                                 steps=args.steps, resolution=args.resolution, seed=args.seed, device=device)
    except (ValueError, DatasetError, PipelineError) as exc:
        return _error(str(exc))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"erased {args.target_prompt!r} -> {args.anchor_prompt!r} with {summary['eraser']}: "
              f"{len(summary['edited'])} tensors changed; erased pipeline written to {summary['out']}")
    return 0
