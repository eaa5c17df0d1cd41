"""A stable identity for a model's parameter layout, stored in mask files."""
from __future__ import annotations

import hashlib
from typing import Mapping

import torch


def _named_tensors(model_or_state) -> list[tuple[str, torch.Tensor]]:
    if isinstance(model_or_state, torch.nn.Module):
        return list(model_or_state.named_parameters())
    if isinstance(model_or_state, Mapping):
        return list(model_or_state.items())
    raise TypeError(f"expected an nn.Module or a name -> tensor mapping, got {type(model_or_state).__name__}")


def model_fingerprint(model_or_state) -> str:
    """sha256 over the sorted (name, shape, dtype) of every parameter.

    Example:
        >>> import torch, freezeguard as fg
        >>> fg.model_fingerprint(torch.nn.Linear(2, 3)) == fg.model_fingerprint(torch.nn.Linear(2, 3))
        True
    """
    h = hashlib.sha256()
    for name, t in sorted(_named_tensors(model_or_state), key=lambda kv: kv[0]):
        h.update(f"{name}|{tuple(t.shape)}|{str(t.dtype).removeprefix('torch.')}\n".encode())
    return h.hexdigest()


def release_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted (name, dtype, shape, bytes) of ``tensors``: binds a mask to one release.

    Two releases of one architecture share :func:`model_fingerprint`; their frozen tensors' bytes
    differ. Mask files record this hash over the release's frozen tensors (``release_hash``).

    Example:
        >>> import torch
        >>> release_hash({"w": torch.zeros(2)}) == release_hash({"w": torch.zeros(2)}) != release_hash({"w": torch.ones(2)})
        True
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
