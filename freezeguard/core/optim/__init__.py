"""Optimizers that enforce a FreezeMask: ``fg.optim.AdamW``.

Example:
    >>> import torch, freezeguard as fg
    >>> model = torch.nn.Linear(4, 4)
    >>> opt = fg.optim.AdamW(model.named_parameters(), lr=1e-3,
    ...                      mask=fg.FreezeMask.from_names(model, ["bias"]))
"""
from __future__ import annotations

from freezeguard.core.optim.adamw import AdamW

__all__ = ["AdamW"]
