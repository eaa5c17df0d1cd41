"""``freezeguard.optim``: the public name of the guarded optimizers (they live in ``freezeguard.core.optim``).

Example:
    >>> import torch, freezeguard as fg
    >>> model = torch.nn.Linear(4, 4)
    >>> opt = fg.optim.AdamW(model.named_parameters(), lr=1e-3)
"""
from freezeguard.core.optim import AdamW

__all__ = ["AdamW"]
