"""Masks compared at equal harm to the legal user, against random masks at several freeze ratios.

A mask that freezes more blocks more of both domains, so comparing masks at one freeze ratio mixes
how much they freeze with how well they choose. Random masks at several ratios trace what blocking
costs: each gives one point (innocent share removed, target share removed) per draw of the attack.
A mask's **gain at equal harm** is the target share it blocks minus random's target share
interpolated at the mask's own innocent share (linear, anchored at (0, 0): freezing nothing), draw
by draw. Positive: it buys its target share more cheaply than random masks do. Its **multiple of
random at equal harm** is the same comparison as a ratio (the mask's mean target share over
random's at the same harm, over the same draws): the "learned/random" of the paper, with the harm
held equal instead of the freeze ratio. Points favour masks that harm more (a mask with twice
random's selectivity gains twice the points at twice the harm); the multiple does not.

Shares are the removed shares of ``metrics`` (1 - gain(mask) / gain(full)), per draw; masks named
``random#k`` and ``random@R#k`` are the random groups (``mask_group``).

Example:
    >>> draws = {"frame": {"random#0": [0.2], "random@0.7#0": [0.05], "learned": [0.09]},
    ...          "checker": {"random#0": [0.3], "random@0.7#0": [0.06], "learned": [0.05]}}
    >>> row = equal_harm_rows(draws, "frame", "checker")[0]
    >>> row["group"], round(row["vs_random"], 4), round(row["times_random"], 2)
    ('learned', 0.0483, 2.16)
"""
from __future__ import annotations

import itertools
from statistics import mean, stdev
from typing import Any

from freezeguard.apps.evaluate.metrics import mask_group, times_random

Draws = dict[str, list[float | None]]      # mask -> removed share per draw (None: undefined)


def is_random_group(group: str, curve: str = "random") -> bool:
    """"random" and "random@R" (random masks at another freeze ratio); with ``curve="channels"``,
    "channels@R" (random output channels, :mod:`~freezeguard.apps.evaluate.channel_masks`)."""
    return group.split("@")[0] == curve


def group_draws(draws: Draws) -> Draws:
    """mask -> share per draw  =>  group -> the mean of its masks per draw (None where all are undefined)."""
    groups: dict[str, list[list[float | None]]] = {}
    for mask, vals in draws.items():
        groups.setdefault(mask_group(mask), []).append(vals)
    out = {}
    for g, rows in groups.items():
        cols = [[v for v in col if v is not None] for col in zip(*rows, strict=True)]
        out[g] = [mean(c) if c else None for c in cols]
    return out


def interpolate_frontier(points: list[tuple[float, float]], innocent: float) -> float | None:
    """The target share random masks block at innocent share ``innocent``, linear between their
    (innocent, target) ``points`` and anchored at (0, 0), freezing nothing. At or below 0, 0 (no random
    mask harms the innocent domain less than freezing nothing); past the most harmful point, None (no
    extrapolation).

    >>> interpolate_frontier([(0.1, 0.05), (0.3, 0.15)], 0.2)
    0.1
    """
    pts = sorted([(0.0, 0.0)] + [p for p in points if p[0] > 0.0])
    if innocent <= 0.0:
        return 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= innocent <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (innocent - x0) / (x1 - x0)
    return None


def equal_harm_rows(draws: dict[str, Draws], target: str, innocent: str, curve: str = "random") -> list[dict[str, Any]]:
    """Per non-random group: the target share it blocks minus what random masks (every random
    group, one point each) block at the same innocent share, draw by draw. ``curve``: which random
    masks trace the price curve, whole tensors ("random") or output channels ("channels").

    ``draws``: domain -> mask -> share per draw. Each row: group, vs_random (mean over draws),
    times_random (the group's mean target share over random's at the same harm, the same draws;
    None without draws or where random blocks nothing there), vs_random_std, ahead (draws above
    random), draws, beyond_random (draws past random's most harmful point, left out), no_curve
    (draws left out because there random masks block nothing of the target even at their most
    harmful point: the attacker gains more with them), per_mask (the mean for each of the group's
    masks alone, e.g. one per learner seed; empty for a single mask).
    """
    t, i = group_draws(draws[target]), group_draws(draws[innocent])
    randoms = [g for g in t if is_random_group(g, curve)]

    def paired(t_vals, i_vals):   # -> (mask, random) per draw, draws past random's most harmful point, no curve
        pairs, beyond, no_curve = [], 0, 0
        for d, (tg, ig) in enumerate(zip(t_vals, i_vals, strict=True)):
            if tg is None or ig is None:
                continue
            points = [(i[r][d], t[r][d]) for r in randoms if i[r][d] is not None and t[r][d] is not None]
            if not points or max(points)[1] <= 0.0:
                # Random masks block nothing of the target even where they cost the legal user most
                # (an attacker that freezing *helps*): there is no price curve to compare against.
                no_curve += 1
                continue
            at = interpolate_frontier(points, ig)
            if at is None:
                beyond += 1
            else:
                pairs.append((tg, at))
        return pairs, beyond, no_curve

    rows = []
    for g in t:
        if g in randoms:
            continue
        pairs, beyond, no_curve = paired(t[g], i[g])
        diffs = [tg - at for tg, at in pairs]
        members = [m for m in draws[target] if mask_group(m) == g]
        per_mask = [[tg - at for tg, at in paired(draws[target][m], draws[innocent][m])[0]] for m in members] \
            if len(members) > 1 else []
        rows.append({"group": g, "vs_random": mean(diffs) if diffs else None,
                     "times_random": times_random(mean(tg for tg, _ in pairs), mean(at for _, at in pairs))
                     if pairs else None,
                     "vs_random_std": stdev(diffs) if len(diffs) > 1 else None,
                     "ahead": sum(x > 0 for x in diffs), "draws": len(diffs), "beyond_random": beyond,
                     "no_curve": no_curve, "per_mask": [mean(x) if x else None for x in per_mask]})
    return rows


__all__ = ["equal_harm_rows", "group_draws", "interpolate_frontier", "is_random_group"]
