"""The report's plots: one colour and one legend entry per mask group; the samples' title clear of row 1."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("matplotlib")

from freezeguard.apps.evaluate import report  # noqa: E402

GROUPS = ["full", "random#0", "random#1", "random@0.7#0", "random@0.7#1", "learned", "uce", "ref: delta",
          "ref: cross-attention", "ablation"]


def _result(samples: bool = False):
    runs = [SimpleNamespace(attacker=a, domain=d, role=role, mask=m, seed=0, curve=[(0, 1.0), (5, 0.5)],
                            samples=torch.zeros(3, 1, 16, 16) if samples else None)
            for a in ("standard", "10x lr") for d, role in (("frame", "target"), ("checker", "innocent"))
            for m in GROUPS]
    return SimpleNamespace(runs=runs, before_samples={"frame": torch.zeros(3, 1, 16, 16)} if samples else {})


def test_loss_curves_give_each_group_its_own_colour_and_one_legend_entry(tmp_path, monkeypatch):
    import matplotlib.axes

    calls = []
    real = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        calls.append((id(self), kwargs.get("color"), kwargs.get("label")))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    report.plot_curves(_result(), tmp_path / "c.png")
    groups = [m.split("#")[0] for m in GROUPS]
    colour = {}
    for axis in dict.fromkeys(a for a, _, _ in calls):
        lines = [(c, lb) for a, c, lb in calls if a == axis]
        assert sorted(lb for _, lb in lines if lb) == sorted(set(groups))      # every group, once
        for (c, _), g in zip(lines, groups, strict=True):
            assert colour.setdefault(g, c) == c                                # a group keeps its colour
    assert len(set(colour.values())) == len(colour)                           # no two groups share one


def test_samples_title_does_not_overlap_the_first_row(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    try:
        report.plot_samples(_result(samples=True), tmp_path / "s.png")
    finally:
        monkeypatch.setattr(plt, "close", real_close)
    fig = figures[0]
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    first_row = fig.axes[0].get_tightbbox(renderer)
    assert title.y0 >= first_row.y1, (title, first_row)
    real_close(fig)
