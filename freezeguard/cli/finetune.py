"""`freezeguard finetune`: full fine-tune (the publisher's θ_ft) or guarded fine-tune (--mask)."""
from __future__ import annotations

import argparse
import json
import sys

from freezeguard.cli.threads import add_threads_argument, apply_threads, denoiser_params

HELP = "fine-tune a local diffusers pipeline's denoiser on image folders (full, or guarded by --mask)"
DESCRIPTION = (
    "Fine-tune the denoiser (unet/ of SD-1.x, SD-2.x, SDXL; transformer/ of SD3, Flux) of a local diffusers "
    "pipeline folder on imagefolder data "
    "(metadata.jsonl with file_name + caption). Without --mask this is the publisher's full "
    "fine-tune on target (+ innocent) data that produces the fine-tuned weights `freezeguard learn` "
    "needs; with --mask the masked tensors stay frozen (fused AdamW via freezeguard.guard). The "
    "result is a copy of the pipeline folder with the fine-tuned denoiser (safetensors) and "
    "finetune_log.jsonl (per-step losses). Nothing is downloaded."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local diffusers Stable Diffusion folder")
    parser.add_argument("--train-data", required=True,
                        help="imagefolder of the data to learn (the target domain for the publisher's run)")
    parser.add_argument("--innocent-data", default=None, help="imagefolder of innocent data mixed into each batch")
    parser.add_argument("--out", required=True, help="output pipeline folder (a copy with the fine-tuned UNet)")
    parser.add_argument("--mask", default=None, help="FreezeMask .safetensors: guarded fine-tune")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW decoupled weight decay")
    parser.add_argument("--batch-size", type=int, default=4, help="images per step (split half/half with --innocent-data)")
    parser.add_argument("--seed", type=int, default=0, help="seed for batch order, noise and timesteps")
    parser.add_argument("--resolution", type=int, default=None,
                        help="resize + centre-crop images to this size (needed when sizes differ)")
    parser.add_argument("--caption-column", default="text", help="caption column of metadata.jsonl")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                        help="bf16 autocast for forward/backward (weights stay fp32)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    parser.add_argument("--lean-frozen-convs", action="store_true",
                        help="with --mask: frozen Conv2d layers keep no input for backward (less activation "
                             "memory, same gradients)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_threads_argument(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-step log")


def _error(msg: str) -> int:
    print(f"freezeguard finetune: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from freezeguard.apps.finetune import FinetuneError, finetune_folder

    show = not args.quiet

    def print_step(record: dict) -> None:
        if show:
            from tqdm.auto import tqdm

            parts = [f"step {record['step']:>5}/{args.steps}", f"loss {record['loss']:.5f}"]
            if args.innocent_data:  # otherwise every sample is from --train-data
                parts += [f"target {record['target_loss']:.5f}", f"innocent {record['innocent_loss']:.5f}"]
            tqdm.write("  ".join(parts), file=sys.stderr)

    try:
        with apply_threads(args.threads, denoiser_params(args.model)):
            summary = finetune_folder(
                args.model, args.train_data, args.out, innocent_data=args.innocent_data, mask=args.mask,
                steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                seed=args.seed, resolution=args.resolution, caption_column=args.caption_column,
                mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                lean_frozen_convs=args.lean_frozen_convs, device=args.device, progress=show, on_step=print_step)
    except FinetuneError as exc:
        return _error(str(exc))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"fine-tuned UNet written to {summary['out']} ({summary['steps']} steps, final loss "
              f"{summary['final_loss']}, {summary['seconds']:.1f}s on {summary['device']}; "
              f"{summary['frozen_tensors']} frozen / {summary['trainable_tensors']} trainable tensors)")
    return 0
