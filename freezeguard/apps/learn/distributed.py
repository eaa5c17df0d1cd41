"""Several processes, one mask: average gradients, keep logits identical on every rank.

Under DDP (or accelerate, which wraps the model in DDP) backward already averages gradients.
A plain model under an initialized process group gets them averaged here, in buckets, before
the fused updates, so every rank applies the same update and stays identical.

Example:
    >>> import torch
    >>> world_size()
    1
    >>> unwrap(torch.nn.Linear(2, 2)).__class__.__name__
    'Linear'
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_BUCKET_BYTES = 64 << 20  # bounds the temporary flat copy made for each all-reduce


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return dist.get_rank() == 0 if world_size() > 1 else True


def is_ddp(model: torch.nn.Module) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameter names are the model's own (no "module." / "_orig_mod." prefix)."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


@torch.no_grad()
def average_(tensors: list[torch.Tensor]) -> None:
    """All-reduce (mean) the tensors across ranks, in place, one flat bucket at a time."""
    ws = world_size()
    if ws == 1 or not tensors:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in group + [None]:
            if t is not None:
                bucket.append(t)
                size += t.numel() * t.element_size()
            if bucket and (t is None or size >= _BUCKET_BYTES):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat)
                flat.div_(ws)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = [], 0


@torch.no_grad()
def broadcast_(tensor: torch.Tensor, src: int = 0) -> None:
    if world_size() > 1:
        dist.broadcast(tensor, src)


__all__ = ["world_size", "is_main_process", "is_ddp", "unwrap", "average_", "broadcast_"]
