"""`freezeguard verify`: audit an upload against a released model and its mask (fails closed)."""
from __future__ import annotations

import argparse
import json
import sys

HELP = "check that an upload (fine-tune, adapter, single file) left every frozen tensor of the mask unchanged"
DESCRIPTION = (HELP + ". --finetuned may be a .safetensors file or a folder: every weights file a loader could "
               "read in it is audited (variants, shards, pipeline parts, LoRA files). Exit status: 0 every tensor "
               "of the upload is accounted for and no frozen tensor changed; 1 violations (a frozen tensor "
               "changed, or an adapter hangs on a frozen module); 2 cannot verify (keys or files it cannot map or "
               "read, a mask for another release, bad input). See docs/security.md for the --json schema.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--released", required=True, metavar="PATH", help="the released model")
    parser.add_argument("--finetuned", required=True, metavar="PATH", help="the upload: model, adapter or folder")
    parser.add_argument("--mask", required=True, metavar="FILE", help="the mask file (.safetensors)")
    parser.add_argument("--allow-lower-precision", default="", metavar="DTYPES",
                        help="comma-separated fp16,bf16: a frozen tensor saved in one of these dtypes passes when it "
                             "equals the release rounded to it (a bf16 run saved as fp16 included)")
    parser.add_argument("--allow-empty-mask", action="store_true",
                        help="accept a mask that freezes nothing (otherwise exit 2: nothing would be proven)")
    parser.add_argument("--json", action="store_true", help="machine-readable output (schema: docs/security.md)")


def run(args: argparse.Namespace) -> int:
    from freezeguard.core.verify import VerifyInputError, verify

    try:
        report = verify(args.released, args.finetuned, args.mask,
                        allow_lower_precision=args.allow_lower_precision, allow_empty_mask=args.allow_empty_mask)
    except VerifyInputError as exc:
        if args.json:
            print(json.dumps({"ok": False, "status": "cannot_verify", "exit_code": 2, "error": str(exc),
                              "cannot_verify": [{"key": "input", "reason": str(exc)}], "cannot_verify_count": 1}))
        print(f"freezeguard verify: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary())
    return report.exit_code
