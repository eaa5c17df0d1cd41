"""`freezeguard bench`: time and memory of guarded fine-tuning against full fine-tuning."""
from __future__ import annotations

import argparse

HELP = "measure step time and memory of guarded vs full fine-tuning of a diffusers UNet"
DESCRIPTION = (HELP + ". Peak memory: torch.cuda.max_memory_allocated on CUDA; peak RSS delta of a "
               "fresh subprocess per configuration on CPU.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..bench import add_arguments as add

    add(parser)


def run(args: argparse.Namespace) -> int:
    from ..bench import run_from_args

    return run_from_args(args)
