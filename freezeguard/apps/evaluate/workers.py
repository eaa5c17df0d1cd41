"""Running the evaluation's fine-tunes: one after another here, or in forked worker processes.

Each fine-tune is seeded on its own, so the figures do not depend on the number of workers.
Forking is used (not spawn) so that models, closures and data streams need no pickling: the
workers inherit the work's state, and only the job keys and the results cross between
processes. Each worker runs one torch thread. Forking is skipped where it cannot work: for
CUDA models (a CUDA context does not survive fork) and where fork is unavailable.

Example:
    >>> def square(job, state):
    ...     return job * job + state
    >>> run_jobs(square, [1, 2, 3], 10, workers=1)
    [11, 14, 19]
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

import torch

# What forked workers inherit: (the job function, its state), set just before the pool starts
# (fork copies it; nothing is pickled but the jobs and the results), cleared after.
_INHERITED: tuple[Callable[[Any, Any], Any], Any] | None = None


def _call_inherited(job: Any) -> Any:
    fn, state = _INHERITED
    return fn(job, state)


def _one_thread() -> None:
    torch.set_num_threads(1)


def run_jobs(fn: Callable[[Any, Any], Any], jobs: Sequence[Hashable], state: Any, workers: int, *,
             can_fork: bool = True, on_done: Callable[[Any], None] | None = None) -> list:
    """``[fn(job, state) for job in jobs]``, in order: in this process, or in ``workers`` forked
    processes when there is more than one job and ``can_fork`` (False for CUDA models).
    ``on_done(job)`` runs here after each job, in order (a progress bar)."""
    global _INHERITED
    import multiprocessing as mp

    out = []
    if workers <= 1 or len(jobs) <= 1 or not can_fork or "fork" not in mp.get_all_start_methods():
        for job in jobs:
            out.append(fn(job, state))
            if on_done is not None:
                on_done(job)
        return out
    _INHERITED = (fn, state)
    try:
        with mp.get_context("fork").Pool(min(workers, len(jobs)), initializer=_one_thread) as pool:
            for job, res in zip(jobs, pool.imap(_call_inherited, jobs), strict=True):
                out.append(res)
                if on_done is not None:
                    on_done(job)
    finally:
        _INHERITED = None
    return out


__all__ = ["run_jobs"]
