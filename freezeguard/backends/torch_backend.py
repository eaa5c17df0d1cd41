"""The `torch` backend: the reference ops, usable on any device."""
from __future__ import annotations

import torch

from freezeguard.backends.reference import mask_shift_, masked_adamw_, segment_dot, user_update_  # noqa: F401

NAME = "torch"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def availability() -> tuple[bool, str]:
    return True, "pure PyTorch reference (always available)"


def supports(device: torch.device) -> tuple[bool, str]:
    return True, ""
