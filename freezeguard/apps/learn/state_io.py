"""The mask learner's save / resume file: one safetensors file, string-only metadata.

Layout: ``logits`` [S] fp32; for each parameter name ``theta/<name>`` (live weights) and
``delta/<name>`` (theta_pre - theta_ft); with the AdamW user also ``user_exp_avg/<name>`` and
``user_exp_avg_sq/<name>``. Metadata: ``format``, the step counters, the hyperparameters as
JSON, the parameter order as JSON and the model fingerprint. No pickle anywhere: a learner
file from someone else can be loaded safely.

Example:
    >>> import torch, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "state.safetensors")
    >>> write(path, {"logits": torch.zeros(2)}, {"format": FORMAT})
    >>> tensors, meta = read(path)
    >>> meta["format"] == FORMAT, tensors["logits"].tolist()
    (True, [0.0, 0.0])
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "freezeguard.mask_learner/1"


def write(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write atomically (a temp file renamed into place) so an interrupted save never leaves
    a truncated checkpoint where the previous good one was."""
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"metadata values must be strings: {bad}")
    path = os.fspath(path)
    tmp = path + ".tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=dict(metadata))
    os.replace(tmp, path)


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no learner state at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a freezeguard learner state (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return tensors, meta


__all__ = ["FORMAT", "write", "read"]
