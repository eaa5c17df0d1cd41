"""The one training loop: every fine-tune in freezeguard (pretraining the toy model, the
publisher's full fine-tune, the attackers of the evaluation, ``freezeguard finetune``) runs here.

Per step: a batch from the stream (with the run's own seeded ``generator`` for noise and
timesteps, so a run is reproducible whatever else draws from the global RNG), per-sample losses,
their mean, backward, optimizer step. A non-finite loss stops the run with an error instead of
silently training on garbage (unless the caller measures divergence on purpose).

Example:
    >>> import itertools, torch
    >>> model = torch.nn.Linear(2, 1)
    >>> stream = itertools.repeat({"x": torch.ones(4, 2), "y": torch.zeros(4)})
    >>> loss_fn = lambda m, b: (m(b["x"]).squeeze(1) - b["y"]) ** 2
    >>> losses = train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), stream, loss_fn, 3)
    >>> len(losses), losses[-1] < losses[0]
    (3, True)
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager, Iterator, Mapping

import torch

from freezeguard.core.group_norm_fix import protect_group_norms

LossFn = Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor]
# on_step(step, per-sample losses (detached), batch) after the optimizer step.
StepHook = Callable[[int, torch.Tensor, Mapping[str, Any]], None]


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, stream: Iterator[Mapping[str, Any]],
                loss_fn: LossFn, steps: int, *, generator: torch.Generator | None = None,
                autocast: ContextManager | None = None, on_step: StepHook | None = None,
                progress: Any = None, stop_on_nonfinite: bool = True) -> list[float]:
    """Run ``steps`` optimizer steps on ``stream``; returns the mean loss of each step.

    ``progress`` is an optional tqdm-like bar (``update(1)`` and ``set_postfix``) the loop advances.
    ``stop_on_nonfinite=False`` keeps going after a NaN/inf loss (an evaluation measures a
    diverging attacker instead of failing).
    """
    losses: list[float] = []
    protect_group_norms(model)  # a torch CPU crash that frozen tensors bring out (see the module)
    model.train()
    for step in range(1, int(steps) + 1):
        batch = dict(next(stream))
        if generator is not None:
            batch["generator"] = generator
        with autocast if autocast is not None else contextlib.nullcontext():
            per_sample = loss_fn(model, batch)
        loss = per_sample.mean()
        value = float(loss.detach())
        if stop_on_nonfinite and not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(value)
        if on_step is not None:
            on_step(step, per_sample.detach(), batch)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{value:.4f}")
    return losses


__all__ = ["train_steps", "LossFn", "StepHook"]
