"""Input checks of the mask learner, each failing early with a message naming the culprit.

Example:
    >>> import torch
    >>> check_targets({"is_target": torch.tensor([True, False])}, 2).tolist()
    [True, False]
"""
from __future__ import annotations

from typing import Mapping

import torch

from freezeguard.core.mask import describe_layout_mismatch


def _listing(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def check_states(params: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor],
                 finetuned: Mapping[str, torch.Tensor], buffers: frozenset[str] = frozenset()) -> None:
    """Both states hold every parameter of the model with its shape, and nothing unknown.

    Keys naming the model's buffers are allowed (a full ``state_dict()`` has them) and ignored.
    """
    expected = {n: tuple(p.shape) for n, p in params.items()}
    for label, state in (("pretrained", pretrained), ("finetuned", finetuned)):
        if not isinstance(state, Mapping):
            raise TypeError(f"{label} state must be a name -> tensor mapping (a state_dict), "
                            f"got {type(state).__name__}")
        found = {n: tuple(t.shape) for n, t in state.items() if n not in buffers}
        problem = describe_layout_mismatch(expected, found, missing="missing", extra="not parameters of the model",
                                           reshaped="shapes differ (model -> state)")
        if problem:
            raise ValueError(f"{label} state does not match the model ({problem})")
    bad = [n for n in params if not (torch.is_floating_point(pretrained[n]) and torch.is_floating_point(finetuned[n]))]
    if bad:
        raise TypeError(f"non-floating tensors in the states: {_listing(bad)}")


def check_targets(batch: object, batch_size: int | None = None) -> torch.Tensor:
    """The batch's "is_target" flags as a bool tensor [B] (0/1 integers accepted)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"a batch must be a mapping (dict) with an 'is_target' entry, got {type(batch).__name__}")
    if "is_target" not in batch:
        raise KeyError("batch has no 'is_target' entry: a bool tensor [B], True for target (illegal) samples "
                       f"and False for innocent ones (keys present: {', '.join(map(str, batch.keys()))})")
    flags = torch.as_tensor(batch["is_target"])
    if flags.dim() != 1:
        raise ValueError(f"batch['is_target'] must be 1-D [B], got shape {tuple(flags.shape)}")
    if flags.dtype != torch.bool:
        if flags.is_floating_point() or flags.is_complex() or not bool(((flags == 0) | (flags == 1)).all()):
            raise TypeError(f"batch['is_target'] must be bool (or 0/1 integers), got {flags.dtype}")
        flags = flags.bool()
    if batch_size is not None and flags.numel() != batch_size:
        raise ValueError(f"batch['is_target'] has {flags.numel()} entries but loss_fn returned {batch_size} losses")
    return flags


def check_losses(losses: object, step: int) -> torch.Tensor:
    """loss_fn's output: a floating 1-D tensor of per-sample losses."""
    if not isinstance(losses, torch.Tensor) or not losses.is_floating_point():
        raise TypeError(f"step {step}: loss_fn must return a floating tensor of per-sample losses [B], "
                        f"got {type(losses).__name__}")
    if losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(f"step {step}: loss_fn must return per-sample losses of shape [B], "
                         f"got shape {tuple(losses.shape)}")
    return losses


def raise_non_finite(step: int, what: str, names: list[str] | None = None) -> None:
    where = f" in {_listing(names, 5)}" if names else ""
    raise FloatingPointError(f"step {step}: non-finite {what}{where}; the learner stopped before updating "
                             "(lower user_lr / mask_lr, or check the data and loss_fn)")


__all__ = ["check_states", "check_targets", "check_losses", "raise_non_finite"]
