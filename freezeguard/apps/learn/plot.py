"""A picture of a learned soft mask: one bar per tensor, in model order, grouped by UNet block.

Example:
    >>> block_of("down_blocks.1.attentions.0.proj_in.weight"), block_of("conv_in.weight")
    ('down_blocks.1', 'conv_in')
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from freezeguard.core.files import atomic_path

_INDEXED = ("down_blocks", "up_blocks", "blocks", "layers", "layer")


def block_of(name: str) -> str:
    """The UNet block a parameter belongs to: ``down_blocks.<i>``, ``mid_block``, ``up_blocks.<i>``,
    or the top-level module (``conv_in``, ``time_embedding``, ...)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] in _INDEXED and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def plot_soft_mask(soft: Mapping[str, float], path: str | os.PathLike, *, frozen: Sequence[str] = (),
                   title: str = "learned soft mask") -> str:
    """Write a PNG of the soft mask m (1 = frozen) per tensor; tensors in ``frozen`` (the hard
    mask) get a tick under their bar. Uses matplotlib's Agg backend (no display needed). Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = list(soft)
    values = [float(soft[n]) for n in names]
    frozen_set = set(frozen)
    groups: list[tuple[str, int, int]] = []  # (block, first index, end index)
    for i, n in enumerate(names):
        b = block_of(n)
        if groups and groups[-1][0] == b:
            groups[-1] = (b, groups[-1][1], i + 1)
        else:
            groups.append((b, i, i + 1))
    palette = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(max(8.0, min(40.0, len(names) / 25)), 4.0), dpi=100)
    for g, (block, lo, hi) in enumerate(groups):
        xs = list(range(lo, hi))
        ax.bar(xs, values[lo:hi], width=1.0, color=palette(g % 20), linewidth=0)
        ax.axvline(lo - 0.5, color="#bbbbbb", linewidth=0.5)
        ax.text((lo + hi - 1) / 2, 1.02, block, rotation=90, ha="center", va="bottom", fontsize=6)
    hard = [i for i, n in enumerate(names) if n in frozen_set]
    ax.scatter(hard, [-0.04] * len(hard), marker="|", color="black", s=30, linewidths=0.8)
    ax.axhline(0.5, color="red", linewidth=0.6, linestyle="--")
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylim(-0.08, 1.0)
    ax.set_xlabel(f"tensor index in model order (ticks below: the {len(hard)} of {len(names)} tensors "
                  "frozen by the hard mask)")
    ax.set_ylabel("soft mask m (1 = frozen)")
    ax.set_title(title, pad=55)
    fig.tight_layout()
    path = os.fspath(path)
    try:
        with atomic_path(path) as tmp:  # a temporary file, fsync, rename: never half a PNG
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path


__all__ = ["block_of", "plot_soft_mask"]
