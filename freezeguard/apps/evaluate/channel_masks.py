"""Random masks at output-channel granularity: a finer price curve to compare freezing against.

The library's masks (:class:`~freezeguard.core.mask.FreezeMask`) freeze whole tensors, because that is
what a guard can enforce for free (no gradient, no optimizer state). To ask whether the learned mask
beats *freezing at random* and not merely *freezing whole tensors at random*, the evaluation also
needs random masks that freeze a random share of the output channels (rows along dim 0) of every
tensor: they spread the same budget over more of the network and trace their own curve of target
share blocked against legal harm (expected to be harder to beat than whole tensors'; in none of the
evaluation's four arms is it: benchmarks/RESULTS.md, "Output-channel random masks in the other three arms").

A :class:`ChannelMask` is enforced on the attacker's plain AdamW by a step post-hook that copies the
frozen rows back from the release after every step: exact whatever the optimizer's weight decay or
state does to those rows, and the rows the mask leaves trainable train as they would unguarded.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(8, 4)
    >>> mask = ChannelMask.random(net, 0.5, seed=0)
    >>> round(mask.ratio(), 2), mask.kind
    (0.5, 'channels')
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from freezeguard.core.values import check_ratio


@dataclass(frozen=True)
class ChannelMask:
    """Frozen output channels per parameter: ``rows[name]`` is a bool vector over ``dim 0`` (True = frozen).

    A 1-D tensor's "channels" are its elements; a 0-D tensor is one channel.
    """

    rows: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    kind = "channels"

    @classmethod
    def random(cls, model: torch.nn.Module, ratio: float, seed: int = 0) -> ChannelMask:
        """Freeze random output channels of ``model``, drawn uniformly over all its channels, until
        ``ratio`` of its parameters are frozen (seeded; the last channel may overshoot by one row)."""
        ratio = check_ratio(ratio, "ratio")
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        names = sorted(shapes)
        counts = [shapes[n][0] if shapes[n] else 1 for n in names]
        row_size = [math.prod(shapes[n]) // c if c else 0 for n, c in zip(names, counts, strict=True)]
        owner = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(counts))
        index = torch.cat([torch.arange(c) for c in counts])
        order = torch.randperm(len(owner), generator=torch.Generator().manual_seed(int(seed)))
        sizes = torch.tensor(row_size)[owner[order]]
        budget = ratio * sum(math.prod(s) for s in shapes.values())
        # rows in random order, until the frozen parameters reach the budget
        take = int(torch.searchsorted(torch.cumsum(sizes, 0).double(), budget).item()) + (1 if budget > 0 else 0)
        rows = {n: torch.zeros(c, dtype=torch.bool) for n, c in zip(names, counts, strict=True)}
        for i in order[:take].tolist():
            rows[names[owner[i]]][index[i]] = True
        return cls(rows, shapes, metadata={"source": "random channels", "seed": str(int(seed)), "ratio": str(ratio)})

    def ratio(self, by: str = "params") -> float:
        """The share of parameters frozen (``by="params"``) or of tensors with any frozen row (``"tensors"``)."""
        if by == "tensors":
            return sum(bool(r.any()) for r in self.rows.values()) / max(1, len(self.rows))
        if by != "params":
            raise ValueError(f"by must be 'params' or 'tensors', got {by!r}")
        total = sum(math.prod(s) for s in self.shapes.values())
        frozen = sum(int(self.rows[n].sum()) * (math.prod(s) // max(1, len(self.rows[n])))
                     for n, s in self.shapes.items())
        return frozen / max(1, total)

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ValueError if ``model``'s parameters are not the ones this mask was drawn for."""
        live = {n: tuple(p.shape) for n, p in model.named_parameters()}
        if live != self.shapes:
            missing, extra = sorted(self.shapes.keys() - live.keys()), sorted(live.keys() - self.shapes.keys())
            reshaped = sorted(n for n in live.keys() & self.shapes.keys() if live[n] != self.shapes[n])
            raise ValueError(f"channel mask was drawn for a different model (missing {missing[:3]}, "
                             f"extra {extra[:3]}, reshaped {reshaped[:3]})")

    def enforce(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Keep ``model``'s frozen rows at their current values through every ``optimizer.step()``."""
        self.check_model(model)
        params = dict(model.named_parameters())
        kept = {n: (params[n], r.to(params[n].device), params[n].detach()[r.to(params[n].device)].clone())
                for n, r in self.rows.items() if r.any() and params[n].dim() > 0}
        scalars = {n: (params[n], params[n].detach().clone()) for n, r in self.rows.items()
                   if r.any() and params[n].dim() == 0}

        @torch.no_grad()
        def restore(*_args) -> None:
            for p, r, values in kept.values():
                p[r] = values
            for p, value in scalars.values():
                p.copy_(value)

        optimizer.register_step_post_hook(restore)


__all__ = ["ChannelMask"]
