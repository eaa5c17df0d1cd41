"""`freezeguard example-pipeline OUT`: a tiny local pipeline and image folders to try the workflow on."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "write a tiny local diffusers pipeline and target / legal image folders to try the workflow on"
DESCRIPTION = (
    HELP + ". OUT/sd is an SD-1.x-shaped pipeline folder built from configs with random weights (a "
    "208-tensor UNet, tiny VAE and CLIP; safetensors), OUT/target and OUT/legal are Hugging Face "
    "imagefolders of generated 16x16 images with captions. Every other command runs on them in seconds "
    "to minutes on a laptop CPU (see the README's walkthrough); the weights are random, so the figures "
    "show the plumbing, not FreezeAsGuard's effect (`freezeguard demo` shows that). Nothing is downloaded."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="folder to create (must not exist, or be empty)")
    parser.add_argument("--images", type=int, default=8, help="images per folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the images")


def run(args: argparse.Namespace) -> int:
    import importlib.util

    from freezeguard.core import files

    out = Path(args.out)
    missing = [m for m in ("diffusers", "transformers", "PIL") if importlib.util.find_spec(m) is None]
    problem = None
    if missing:
        problem = f"needs {', '.join(missing)}: pip install 'freezeguard[diffusion]'"
    elif args.images < 1:
        problem = f"--images must be >= 1, got {args.images}"
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        problem = f"OUT {out} exists and is not an empty folder; give a new one"
    else:
        try:
            files.check_outputs({"OUT": out}, parents=True)
        except files.OutputError as exc:
            problem = str(exc)
    if problem:
        print(f"freezeguard example-pipeline: error: {problem}", file=sys.stderr)
        return 2
    from freezeguard.integrations.diffusers.example import write_example

    out.parent.mkdir(parents=True, exist_ok=True)
    # built whole in a temporary sibling, then renamed into place: never half an example
    files.replace_dir(out, lambda tmp: write_example(tmp, images=args.images, seed=args.seed))
    print(f"wrote {out}/sd (a tiny SD-1.x pipeline, random weights), {out}/target and {out}/legal "
          f"({args.images} images each); next: the README's walkthrough, e.g.\n"
          f"  freezeguard finetune --model {out}/sd --train-data {out}/target --innocent-data {out}/legal "
          f"--out {out}/sd-ft")
    return 0
