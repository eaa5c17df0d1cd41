"""`freezeguard finetune`: full fine-tune (the publisher's θ_ft) or guarded fine-tune (--mask)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from freezeguard.cli.threads import add_threads_argument, apply_threads, denoiser_params

LOG_NAME = "finetune_log.jsonl"
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


class _Failed(Exception):
    """The fine-tune failed; the temporary log is discarded and the old result kept."""


def run(args: argparse.Namespace) -> int:
    try:
        with apply_threads(args.threads, denoiser_params(args.model)):
            return _run(args)
    except _Failed as exc:
        return _error(str(exc))


def _run(args: argparse.Namespace) -> int:
    from freezeguard.apps.finetune import _check_options
    from freezeguard.core import files
    from freezeguard.integrations.diffusers.data import DatasetError
    from freezeguard.integrations.diffusers.pipeline import PipelineError, check_pipeline_folder, denoiser_subfolder

    # Everything that can be checked cheaply is checked before any model is loaded.
    try:
        _check_options(args.steps, args.lr, args.batch_size, args.mixed_precision)
        if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
            raise ValueError(f"--weight-decay must be a number >= 0, got {args.weight_decay}")
        if args.resolution is not None and args.resolution < 1:
            raise ValueError(f"--resolution must be >= 1, got {args.resolution}")
        src = check_pipeline_folder(args.model)
        out = Path(args.out)
        if args.lean_frozen_convs and not args.mask:
            raise ValueError("--lean-frozen-convs needs --mask (only frozen convs can drop their saved input)")
        if out.resolve() == src.resolve():
            raise ValueError("--out must differ from --model (the released model is never overwritten)")
        for flag, path in (("--train-data", args.train_data), ("--innocent-data", args.innocent_data)):
            if path is not None and not Path(path).is_dir():
                raise DatasetError(f"{flag} {path} does not exist (or is not a folder)")
        if args.mask is not None and not Path(args.mask).is_file():
            raise ValueError(f"--mask {args.mask} does not exist")
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not (out / LOG_NAME).is_file():
            # the new output replaces the folder whole: only an earlier run's output may go
            raise ValueError(f"--out {out} is a folder that no earlier `freezeguard finetune` wrote (it has no "
                             f"{LOG_NAME}); give a new or empty folder, so nothing of yours is replaced")
        files.check_outputs({"--out": out}, {"--model": src, "--train-data": args.train_data,
                                             "--innocent-data": args.innocent_data, "--mask": args.mask})
        if args.mask is not None:  # the mask file and its fit, from file headers, before any model loads
            from freezeguard.core.mask import FreezeMask, describe_layout_mismatch
            from freezeguard.core.weights import weights_layout

            early = FreezeMask.load(args.mask)
            sub = denoiser_subfolder(src)
            unet_layout = weights_layout(src / sub, f"--model {sub}")
            mismatch = describe_layout_mismatch(early.layout, {k: v for k, v in unet_layout.items() if k in early.layout},
                                                missing="missing from the model", extra="", reshaped="reshaped")
            if mismatch:
                raise ValueError(f"--mask {args.mask}: mask was made for a different model ({mismatch})")
    except (ValueError, DatasetError, PipelineError) as exc:
        return _error(str(exc))

    import torch

    from freezeguard.apps.finetune import finetune
    from freezeguard.integrations.diffusers.data import ImageFolderDataset
    from freezeguard.integrations.diffusers.pipeline import load_components, save_pipeline_with_unet

    try:
        comps = load_components(src, dtype=torch.float32)
        data_kwargs = {"resolution": args.resolution, "tokenizer": comps.tokenizer,
                       "caption_column": args.caption_column}
        target = ImageFolderDataset(args.train_data, role="target", **data_kwargs)
        innocent = (ImageFolderDataset(args.innocent_data, role="innocent", **data_kwargs)
                    if args.innocent_data else None)
        mask = None
        if args.mask is not None:
            from freezeguard.core.mask import FreezeMask

            mask = FreezeMask.load(args.mask, model=comps.unet)
    except (ValueError, KeyError, DatasetError, PipelineError) as exc:
        return _error(str(exc).strip("'\""))

    show = not args.quiet
    # The log is written beside --out while the model trains; the finished output (pipeline copy,
    # fine-tuned denoiser, log) is built in a temporary sibling folder and swapped in whole, so a
    # failed or interrupted run leaves an earlier output exactly as it was.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.{LOG_NAME}.", suffix=".tmp", dir=out.parent)
    tmp_log = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as log_file:
            def log(record: dict) -> None:
                # NaN (a batch without target or innocent samples) is not JSON: write null.
                log_file.write(json.dumps({k: (None if v != v else v) for k, v in record.items()}) + "\n")
                if show:
                    from tqdm.auto import tqdm

                    parts = [f"step {record['step']:>5}/{args.steps}", f"loss {record['loss']:.5f}"]
                    if args.innocent_data:  # otherwise every sample is from --train-data
                        parts += [f"target {record['target_loss']:.5f}", f"innocent {record['innocent_loss']:.5f}"]
                    tqdm.write("  ".join(parts), file=sys.stderr)

            try:
                result = finetune(comps, target, innocent, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                  seed=args.seed, mask=mask, weight_decay=args.weight_decay,
                                  mixed_precision=args.mixed_precision,
                                  gradient_checkpointing=args.gradient_checkpointing,
                                  lean_frozen_convs=args.lean_frozen_convs, device=args.device,
                                  progress=show, log=log)
            except (ValueError, FloatingPointError) as exc:
                raise _Failed(str(exc)) from None
        comps.unet.to("cpu")
        try:
            save_pipeline_with_unet(src, out, comps.unet, extra=lambda folder: os.replace(tmp_log, folder / LOG_NAME))
        except OSError as exc:
            raise _Failed(f"could not write {out} ({exc}); an earlier output there is unchanged") from None
    finally:
        tmp_log.unlink(missing_ok=True)
    log_path = out / LOG_NAME
    summary = {"out": str(out), "model": str(src), "mask": args.mask, "guarded": mask is not None,
               "train_images": len(target), "innocent_images": len(innocent) if innocent else 0,
               "log": str(log_path), **result.summary()}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"fine-tuned UNet written to {out} ({summary['steps']} steps, final loss "
              f"{summary['final_loss']}, {result.seconds:.1f}s on {result.device}; "
              f"{result.frozen_tensors} frozen / {result.trainable_tensors} trainable tensors)")
    return 0
