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

import json
import os
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from freezeguard.core.files import atomic_path

FORMAT = "freezeguard.mask_learner/1"


def write(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write atomically (a uniquely named temp file, fsync, rename into place) so an interrupted
    save never leaves a truncated checkpoint where the previous good one was, and two writers
    never share a temporary file."""
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"metadata values must be strings: {bad}")
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.fspath(tmp),
                  metadata=dict(metadata))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a learner state (step counters, hyperparameters...) without reading a tensor."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no learner state at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a freezeguard learner state (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return meta


def saved_hparams(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """(hyperparameters, step count) a learner state was saved with, from its metadata alone."""
    meta = read_metadata(path)
    try:
        return dict(json.loads(meta["hparams"])), int(meta["step_count"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: incomplete learner metadata ({exc})") from None


def hparam_changes(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """name -> (saved, wanted) for every hyperparameter in ``wanted`` that differs from the saved one.

    Numbers compare as floats (``10`` equals ``10.0``); names absent from the state are ignored.

    Example:
        >>> hparam_changes({"mask_lr": 10.0, "seed": 0}, {"mask_lr": 10, "seed": 1})
        {'seed': (0, 1)}
    """
    out = {}
    for key, new in wanted.items():
        if key not in saved:
            continue
        old = saved[key]
        same = (float(old) == float(new)) if _is_number(old) and _is_number(new) else old == new
        if not same:
            out[key] = (old, new)
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


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


__all__ = ["FORMAT", "write", "read", "read_metadata", "saved_hparams", "hparam_changes"]
