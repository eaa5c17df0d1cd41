"""``--threads`` for the commands that train: how many CPU threads torch may use.

Measured (2026-12-07, 2-core shared CPU, the walkthrough's tiny pipeline from ``freezeguard
example-pipeline``; ``freezeguard finetune --steps 20``): one thread ran the 20 steps in 1.9-2.5 s,
two threads in 27-83 s. A tiny model's ops are too small to share across threads and the threads
spin waiting for each other. So the default ("auto") is one thread for a small denoiser and torch's
own default (every core) for a large one, whose matrix products are big enough to share (that
side was not measured here).

Example:
    >>> threads_for(2_000_000), threads_for(860_000_000) is None
    (1, True)
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Iterator

from freezeguard.cli.flags import number_or_auto

__all__ = ["SMALL_MODEL_PARAMS", "add_threads_argument", "threads_for", "apply_threads", "denoiser_params"]

#: Denoisers below this many parameters get one thread by default (the walkthrough's has 53 thousand).
SMALL_MODEL_PARAMS = 50_000_000


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=number_or_auto(int, 1, "a number of threads"), default="auto",
                        help="torch CPU threads. auto (default): 1 for a denoiser under 50M parameters (measured "
                             "on the example pipeline, 2-core CPU: 20 fine-tune steps took 1.9 s on 1 thread, "
                             "27 s on 2), torch's default (all cores) for larger ones")


def threads_for(n_params: int | None) -> int | None:
    """The "auto" choice: 1 thread for a small model, None (torch's default) for a large or unknown one."""
    return 1 if n_params is not None and n_params < SMALL_MODEL_PARAMS else None


@contextlib.contextmanager
def apply_threads(setting: int | str, n_params: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op threads from ``--threads``, restored after.

    ``"auto"``: :func:`threads_for` ``(n_params)``; a number >= 1: that many; 0: torch's own
    default, left as it is (``freezeguard demo --threads 0``).
    """
    import torch

    n = threads_for(n_params) if setting == "auto" else int(setting)
    if n is not None and n < 0:
        raise ValueError(f"--threads must be >= 0 or 'auto', got {setting}")
    n = n or None  # 0: torch's default
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def denoiser_params(pipeline_folder) -> int | None:
    """Parameters of a local pipeline's denoiser, from its safetensors headers (None: unreadable)."""
    import math
    from pathlib import Path

    from freezeguard.core.weights import WeightsError, weights_layout
    from freezeguard.integrations.diffusers.pipeline import PipelineError, denoiser_subfolder

    try:
        root = Path(pipeline_folder)
        layout = weights_layout(root / denoiser_subfolder(root), "--model")
    except (PipelineError, WeightsError, OSError):
        return None
    return sum(math.prod(shape) for shape in layout.values())
