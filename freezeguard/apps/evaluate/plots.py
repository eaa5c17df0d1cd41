"""The evaluation's figures as PNGs: held-out loss curves and a grid of generated samples.

Both show the runs of the first attack seed (the tables average every seed) and draw with
matplotlib's Agg backend, imported only when a figure is drawn. ``report.write_report`` calls
them after the results are on disk, so a failed plot loses nothing computed.

Example:
    >>> _group_colours(["full", "random", "uce"])["uce"]
    'tab:orange'
"""
from __future__ import annotations

from pathlib import Path

import torch


def _first_seed_runs(result) -> list:
    """The runs of the first attack seed: the plots show one draw (the tables average them all)."""
    first = result.runs[0].seed if result.runs else 0
    return [r for r in result.runs if r.seed == first]


def plot_curves(result, path: Path) -> Path:
    """Held-out loss over fine-tuning steps: one panel per attacker x domain, one line per mask
    (the first attack seed's runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _first_seed_runs(result)
    attackers = list(dict.fromkeys(r.attacker for r in runs))
    domains = list(dict.fromkeys(r.domain for r in runs))
    fig, axes = plt.subplots(len(attackers), len(domains), figsize=(4.2 * len(domains), 3.2 * len(attackers)),
                             squeeze=False)
    roles = {r.domain: r.role for r in runs}
    colours = _group_colours([r.mask.split("#", 1)[0] for r in runs])
    for i, a in enumerate(attackers):
        for j, d in enumerate(domains):
            ax = axes[i][j]
            labelled: set[str] = set()
            for r in runs:
                if r.attacker == a and r.domain == d:
                    group = r.mask.split("#", 1)[0]
                    xs, ys = zip(*r.curve, strict=True)
                    # one colour and one legend entry per group (random masks of a ratio share both)
                    ax.plot(xs, ys, color=colours[group], alpha=0.5 if group.startswith("random") else 1.0,
                            label=None if group in labelled else group)
                    labelled.add(group)
            ax.set_title(f"{d} ({roles[d]}) — {a}", fontsize=9)
            ax.set_xlabel("fine-tuning step")
            ax.set_ylabel("held-out loss")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path


def _group_colours(groups) -> dict[str, str]:
    """A distinct colour per mask group: full red, random grey, learned blue, the rest from tab10
    without those three (the default cycle would repeat them)."""
    fixed = {"full": "tab:red", "random": "tab:grey", "learned": "tab:blue"}
    spare = [c for c in ("tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
                         "tab:cyan", "black", "gold", "navy", "teal", "maroon") if c not in fixed.values()]
    colours = dict(fixed)
    for group in dict.fromkeys(groups):
        if group not in colours:
            colours[group] = spare[(len(colours) - len(fixed)) % len(spare)]
    return colours


def plot_samples(result, path: Path, n: int = 8) -> Path | None:
    """Grid of generated samples: rows = before / each mask after the first attacker, per domain."""
    if not result.before_samples:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _first_seed_runs(result)
    first = runs[0].attacker
    domains = list(result.before_samples)
    masks = list(dict.fromkeys(r.mask for r in runs if r.attacker == first))
    real = getattr(result, "real_images", {}) or {}
    rows = [("real", d, real[d][:len(result.before_samples[d])]) for d in domains
            if d in real and tuple(real[d].shape[1:]) == tuple(result.before_samples[d].shape[1:])]
    rows += [("before", d, result.before_samples[d]) for d in domains]
    rows += [(m, r.domain, r.samples) for m in masks for r in runs
             if r.attacker == first and r.mask == m and r.samples is not None]
    fig, axes = plt.subplots(len(rows), 1, figsize=(n * 0.6 + 1.6, 0.75 * len(rows) + 0.6), squeeze=False)
    for ax, (label, domain, images) in zip(axes[:, 0], rows, strict=True):
        imgs = images[:n, 0]
        strip = torch.cat(list(imgs), dim=1) if len(imgs) else torch.zeros(16, 16)
        ax.imshow(((strip + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{label}\n{domain}", rotation=0, ha="right", va="center", fontsize=7)
    height = 0.75 * len(rows) + 0.6
    fig.suptitle(f"samples after the '{first}' attacker", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / height))   # the title keeps its own 0.3 inch above row 1
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path


__all__ = ["plot_curves", "plot_samples"]
