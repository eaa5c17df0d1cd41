"""Input checks for the optimizers: hyperparameters, options, parameters, names.

Every check runs *before* the optimizer changes anything, so bad input leaves parameters,
state and param groups exactly as they were.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

from freezeguard.backends import BACKEND_NAMES
from freezeguard.ops import SUPPORTED_DTYPES

# torch.optim.AdamW options that the fused masked update does not implement. Raising beats
# silently running plain AdamW when a script asks for a variant.
UNSUPPORTED_OPTIONS = ("amsgrad", "maximize", "differentiable")


def _scalar(name: str, value: Any) -> float:
    """A python float from a float or a 1-element tensor (torch accepts both)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def check_hyperparameters(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> tuple[float, float]:
    """Validate like torch.optim.AdamW (same messages); return betas as two floats."""
    if not 0.0 <= _scalar("lr", lr):  # `not <=` also rejects NaN
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= _scalar("eps", eps):
        raise ValueError(f"Invalid epsilon value: {eps}")
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    beta1, beta2 = _scalar("betas[0]", beta1), _scalar("betas[1]", beta2)
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
    if not 0.0 <= _scalar("weight_decay", weight_decay):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    return beta1, beta2


def check_options(options: Mapping[str, Any], where: str = "fg.optim.AdamW") -> None:
    """NotImplementedError for torch.optim.AdamW variants the fused update does not do."""
    asked = [k for k in UNSUPPORTED_OPTIONS if options.get(k)]
    if asked:
        raise NotImplementedError(
            f"{where}: {', '.join(f'{k}=True' for k in asked)} is not supported by freezeguard's "
            "masked AdamW; use torch.optim.AdamW for these variants (fg.wrap can still enforce a mask)")


def check_backend_name(backend: str) -> str:
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(('auto',) + BACKEND_NAMES)}")
    return backend


def split_named(params: Iterable[Any]) -> tuple[list[Any], list[str] | None]:
    """Tensors and names from a group's "params" (tensors, or (name, tensor) pairs)."""
    if isinstance(params, torch.Tensor):
        return [params], None
    if isinstance(params, set):
        raise TypeError("optimizer parameters need an ordered collection (a list), not a set")
    items = list(params)
    named = [isinstance(x, tuple) for x in items]
    if any(named) and not all(named):
        raise ValueError("all optimizer params should be with/without names. Some param names are missing")
    if items and all(named):
        return [t for _, t in items], [str(n) for n, _ in items]
    return items, None


def check_param_tensor(p: Any, label: str) -> None:
    """A parameter the fused update can own: a dense fp32/bf16/fp16 tensor."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"optimizer can only optimize Tensors, but {label} is a {type(p).__name__}")
    if p.layout != torch.strided:
        raise TypeError(f"{label} is a {p.layout} tensor; fg.optim.AdamW supports dense (strided) parameters only")
    if p.dtype not in SUPPORTED_DTYPES:
        kind = "an integer" if not (p.is_floating_point() or p.is_complex()) else "a"
        raise TypeError(f"{label} is {kind} {p.dtype} tensor; fg.optim.AdamW supports fp32, bf16 and fp16 "
                        "parameters (integer tensors cannot be trained)")


def check_grad(p: torch.Tensor, g: torch.Tensor, label: str) -> None:
    """The gradient must match its parameter; torch's AdamW refuses sparse gradients too."""
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(f"fg.optim.AdamW does not support sparse gradients ({label} has a {g.layout} grad); "
                           "consider torch.optim.SparseAdam")
    check_param_tensor(p, label)
    if g.dtype != p.dtype:
        raise TypeError(f"{label}: grad is {g.dtype} but the parameter is {p.dtype}")
    if g.shape != p.shape:
        raise ValueError(f"{label}: grad has shape {tuple(g.shape)} but the parameter has {tuple(p.shape)}")
    if g.device != p.device:
        raise ValueError(f"{label}: grad is on {g.device} but the parameter is on {p.device}")


def _fits(t: Any, p: torch.Tensor) -> bool:
    return (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.dtype == p.dtype
            and t.shape == p.shape and t.device == p.device)


def check_grad_and_state(p: torch.Tensor, g: torch.Tensor, state: Mapping[str, Any], label: str) -> None:
    """Everything one update of ``p`` needs, checked up front (a fast path: it runs every step)."""
    if p.dtype in SUPPORTED_DTYPES and _fits(g, p) and (
            not state or (_fits(state.get("exp_avg"), p) and _fits(state.get("exp_avg_sq"), p)
                          and isinstance(state.get("step"), torch.Tensor))):
        return
    check_grad(p, g, label)
    check_state(p, state, label)


def check_state(p: torch.Tensor, state: Mapping[str, Any], label: str) -> None:
    """Existing AdamW state must fit its parameter (e.g. after model.to(dtype))."""
    if not state:
        return
    missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in state]
    if missing:
        raise KeyError(f"{label}: optimizer state lacks {missing}; was it made by another optimizer?")
    for key in ("exp_avg", "exp_avg_sq"):
        s = state[key]
        if not _fits(s, p):
            raise ValueError(f"{label}: state {key!r} is {getattr(s, 'dtype', type(s).__name__)} "
                             f"{tuple(getattr(s, 'shape', ()))} on {getattr(s, 'device', '?')} but the parameter "
                             f"is {p.dtype} {tuple(p.shape)} on {p.device}; was the model moved or cast after the "
                             "optimizer state was created?")
    check_step(state["step"], label)


def check_step(step: Any, label: str) -> float:
    """A step count: a finite number >= 0 (a tensor or a python number)."""
    if not isinstance(step, (torch.Tensor, int, float)) or isinstance(step, bool) or (
            isinstance(step, torch.Tensor) and step.numel() != 1):
        raise TypeError(f"{label}: state 'step' must be a number or a 1-element tensor, got {step!r}")
    value = float(step)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{label}: state 'step' is {value}")
    return value


def name_index(groups: Iterable[Mapping[str, Any]]) -> dict[str, torch.Tensor] | None:
    """name -> tensor over all groups, or None when the params are unnamed.

    Two different tensors under one name would make the mask ambiguous, so that raises.
    """
    index: dict[str, torch.Tensor] = {}
    named = None
    for group in groups:
        names = group.get("param_names")
        if names is None:
            named = False
            continue
        named = True if named is None else named
        for name, p in zip(names, group["params"], strict=True):
            if name in index and index[name] is not p:
                raise ValueError(f"two different parameters are both named {name!r}")
            index[name] = p
    return index if named else None


__all__ = ["UNSUPPORTED_OPTIONS", "check_hyperparameters", "check_options", "check_backend_name", "split_named",
           "check_param_tensor", "check_grad", "check_grad_and_state", "check_state", "check_step", "name_index"]
