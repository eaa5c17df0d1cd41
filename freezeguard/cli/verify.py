"""`freezeguard verify`: check a fine-tuned checkpoint against a released model and its mask."""
from __future__ import annotations

import argparse
import json
import sys

HELP = "check that a fine-tuned checkpoint left every frozen tensor of the mask unchanged"
DESCRIPTION = (HELP + ". PATHs may be .safetensors files, diffusers model folders or pipeline folders "
               "(unet/ is used), or adapter files (LoRA). Exit status: 0 ok, 1 violations, 2 bad input.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--released", required=True, metavar="PATH", help="the released model")
    parser.add_argument("--finetuned", required=True, metavar="PATH", help="the fine-tuned model or adapter")
    parser.add_argument("--mask", required=True, metavar="FILE", help="the mask file (.safetensors)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from freezeguard.core.mask import FreezeMask
    from freezeguard.core.mask_files import FreezeMaskFileError
    from freezeguard.core.verify import VerifyInputError, verify

    try:
        mask = FreezeMask.load(args.mask)
        report = verify(args.released, args.finetuned, mask)
    except (FreezeMaskFileError, VerifyInputError) as exc:
        if args.json:
            print(json.dumps({"ok": None, "error": str(exc)}))
        print(f"freezeguard verify: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary())
    return 0 if report.ok else 1
