"""Shared pieces of the tests that spawn gloo process groups on 127.0.0.1 (DDP, FSDP2, learner).

Example:
    >>> 0 < free_port() < 65536
    True
    >>> [b["x"].shape[0] for b in global_batches(2)], half(global_batches(1)[0], 1)["x"].shape[0]
    ([8, 8], 4)
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Callable

import torch


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_worker() -> None:
    """Leave a spawned gloo worker at once, flushed, with status 0, skipping interpreter teardown.

    Call it after ``destroy_process_group`` once the worker's results are written. gloo's background
    threads can still be joinable when the C++ static destructors run at a normal exit, and the worker
    then dies with "terminate called without an active exception" (SIGABRT): measured about 1 run in 8
    of tests/test_learner_ddp.py with OMP_NUM_THREADS unset, as CI runs it, and 0 in 16 with this exit
    (2026-12-07). A worker that raised never gets here: spawn reports its exception as usual.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def linear_stack() -> torch.nn.Module:
    """Four seeded Linear(8, 8) layers: the optimizer tests' model (each layer one FSDP2 unit)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])


def regression_pair(step: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s inputs and targets [rows, 8] for ``linear_stack``, the same in every process."""
    gen = torch.Generator().manual_seed(step)
    return torch.randn(rows, 8, generator=gen), torch.randn(rows, 8, generator=gen)


def learner_states(make_model: Callable[[], torch.nn.Module]) -> tuple[dict, dict]:
    """(theta_pre, theta_ft) for a learner test: the model's weights and a seeded perturbation of them."""
    pre = {k: v.detach().clone() for k, v in make_model().state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    ft = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in pre.items()}
    return pre, ft


def regression_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Per-sample squared error of a model mapping x [B, 5] to one output."""
    return (model(batch["x"]).squeeze(1) - batch["y"]) ** 2


def global_batches(steps: int) -> list[dict]:
    """Global batches of 8 for 2 ranks; each rank's half holds 2 target and 2 innocent samples, so
    the average of the per-rank gradients is the gradient of the whole batch."""
    gen = torch.Generator().manual_seed(2)
    flags = torch.tensor([True, False, True, False] * 2)
    return [{"x": torch.randn(8, 5, generator=gen), "y": torch.randn(8, generator=gen), "is_target": flags}
            for _ in range(steps)]


def half(batch: dict, rank: int) -> dict:
    """Rank ``rank``'s half of a global batch of 8 (2 ranks)."""
    return {k: v[rank * 4:(rank + 1) * 4] for k, v in batch.items()}
