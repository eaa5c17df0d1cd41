"""Names and shapes of the SD-1.5 UNet's 686 parameters, without downloading anything.

``diffusers.UNet2DConditionModel()`` with its default config *is* the SD-1.5 UNet; built
under ``torch.device("meta")`` it allocates nothing. The channel-scaled variant keeps all
686 tensors (same names, same count, same mix of large and tiny) at ~1/10 the parameters,
which is what a CPU can step in well under a second.

Example:
    >>> from _shapes import unet_shapes, frozen_split   # benchmarks/ is on sys.path (conftest.py)
    >>> shapes = unet_shapes("scaled")                        # doctest: +SKIP
    >>> len(shapes)                                           # doctest: +SKIP
    686
    >>> trainable = frozen_split(shapes, 0.5, by="params")    # doctest: +SKIP
"""
from __future__ import annotations

import functools
import math
import random

import torch

from freezeguard.core.mask import select_budget

SCALED_CHANNELS = (96, 192, 384, 384)  # SD-1.5 uses (320, 640, 1280, 1280)
FROZEN_RATIOS = (0.0, 0.2, 0.5, 0.8)
BUDGETS = ("tensors", "params")

Shapes = list[tuple[str, tuple[int, ...]]]


@functools.lru_cache(maxsize=None)
def _unet_shapes(size: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    from diffusers import UNet2DConditionModel

    if size not in ("full", "scaled"):
        raise ValueError(f"size must be 'full' or 'scaled', not {size!r}")
    kwargs = {} if size == "full" else {"block_out_channels": SCALED_CHANNELS}
    with torch.device("meta"):
        model = UNet2DConditionModel(**kwargs)
    return tuple((name, tuple(p.shape)) for name, p in model.named_parameters())


def unet_shapes(size: str = "scaled") -> Shapes:
    """[(name, shape)] of the SD-1.5 UNet ("full", ~860M params) or its scaled variant."""
    return list(_unet_shapes(size))


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def frozen_split(shapes: Shapes, ratio: float, by: str = "tensors", seed: int = 0) -> list[int]:
    """Indices of the *trainable* tensors after freezing ``ratio`` of them (by tensors or params).

    A fixed random order feeds ``freezeguard.core.mask.select_budget``, the same rule
    FreezeMask.random uses, so every implementation in a run steps the same tensors.
    """
    names = [n for n, _ in shapes]
    order = names[:]
    random.Random(seed).shuffle(order)
    frozen = set(select_budget(order, {n: numel(s) for n, s in shapes}, ratio, by))
    return [i for i, n in enumerate(names) if n not in frozen]


def frozen_cases() -> list[tuple[str, float]]:
    """(by, ratio) pairs to measure: 0% once, then 20/50/80% by tensors and by params."""
    cases = [("tensors", 0.0)]
    cases += [(by, r) for by in BUDGETS for r in FROZEN_RATIOS if r > 0]
    return cases
