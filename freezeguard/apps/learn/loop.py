"""Driving a learner for a whole run: cycle the batches, show progress, warn when nothing moved.

``MaskLearner.fit`` is this module's :func:`fit`; the algorithm's single step stays in the learner.
After a run with releaser steps whose hard mask is still exactly the initial logits' one, a
warning names the setting that would change that (the budget penalty saturating the logits, or
data steps too small to reorder them).

Example:
    >>> fmt(float("nan")), fmt(0.5)
    ('-', '0.5000')
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Mapping

from freezeguard.apps.learn import distributed


def fit(learner: Any, batches: Iterable[Mapping[str, Any]], steps: int, *, progress: bool = True,
        desc: str = "learning mask", callback: Callable[[dict[str, Any]], None] | None = None
        ) -> list[dict[str, Any]]:
    """Run ``steps`` more steps of ``learner`` over ``batches``; see ``MaskLearner.fit``."""
    from tqdm.auto import tqdm

    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    logs: list[dict[str, Any]] = []
    it = iter(batches)
    bar = tqdm(total=steps, desc=desc, disable=not progress or not distributed.is_main_process())
    try:
        while len(logs) < steps:
            try:
                batch = next(it)
            except StopIteration:
                if iter(batches) is batches:  # a one-shot iterator cannot be cycled
                    raise ValueError(f"batches ran out after {len(logs)} of {steps} steps; pass a "
                                     "re-iterable (list, DataLoader) or a longer iterator") from None
                it = iter(batches)
                try:
                    batch = next(it)
                except StopIteration:
                    raise ValueError("batches is empty") from None
            entry = learner.step(batch)
            logs.append(entry)
            if callback is not None:
                callback(entry)
            bar.update(1)
            # "m>0.5": the share the soft mask rounds to frozen, not the hard (top-k) mask's budget
            bar.set_postfix(kind=entry["kind"][0], target=fmt(entry["target_loss"]),
                            innocent=fmt(entry["innocent_loss"]), **{"m>0.5": f"{entry['frozen_ratio']:.3f}"},
                            moved=entry["mask_moved"])
    finally:
        bar.close()
    if any(e["kind"] == "releaser" for e in logs) and learner._movement.mask_moved == 0:
        # stacklevel 3: the warning points at the caller of MaskLearner.fit
        warnings.warn(_stuck_message(learner), stacklevel=3)
    return logs


def _stuck_message(learner: Any) -> str:
    """Why the hard mask has not moved from the initial one, and what setting would change that."""
    first = next((e["data_to_budget"] for e in learner.history if e["data_to_budget"] is not None), None)
    balance = "" if first is None else f" (the first releaser step's data/budget ratio was {first:.2g})"
    # name only what would change a setting: c_sparsity='auto' is no remedy when it is in use
    if learner.budget == "penalty":
        options = ([] if learner.c_sparsity_auto else ["c_sparsity='auto'"]) + ["budget='projected'"]
        remedy = (f"The budget penalty saturates the logits before the releaser gradient can act; use "
                  f"{' or '.join(options)}, or raise mask_lr (watch mask_moved, live and data_to_budget "
                  "in the log).")
    else:
        remedy = ("The data steps are too small to reorder the logits; raise mask_lr"
                  + ("" if learner.signal_norm == "rms" else ", or use signal_norm='rms'")
                  + " (watch mask_moved and live in the log).")
    return (f"MaskLearner: after {learner.step_count} steps the hard mask is still exactly the one of the "
            f"initial logits ({learner.init}): the data has not reordered any tensor{balance}. " + remedy)


def fmt(v: float | None) -> str:
    """A loss for the progress bar: four decimals, "-" for none or NaN."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


__all__ = ["fit", "fmt"]
