"""The `cpp` backend: the fused ops as one OpenMP pass over the whole tensor list (CPU tensors).

The kernels live in ``csrc/cpu`` and load through ``_build.load_extension("cpu")``:
prebuilt ``freezeguard._C`` when ``pip install`` compiled it, else JIT-built on first use.

Registry contract: ``availability()`` never compiles (it is what ``freezeguard info`` and
``fg.available_backends()`` show). ``supports(device)`` is asked right before an op runs,
so that is where the extension is loaded or built; if the build fails it answers False
with the reason (``auto`` then falls back to the reference) and ``availability()``
reports the failure from then on.

Example:
    >>> import torch, freezeguard as fg
    >>> a = [torch.ones(3), torch.ones(2)]
    >>> fg.ops.segment_dot(a, a, backend="cpp")   # doctest: +SKIP
    tensor([3., 2.])
"""
from __future__ import annotations

from typing import Sequence

import torch

from freezeguard.backends import _build

NAME = "cpp"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
Tensors = Sequence[torch.Tensor]


def availability() -> tuple[bool, str]:
    return _build.extension_status("cpu")


def supports(device: torch.device) -> tuple[bool, str]:
    if torch.device(device).type != "cpu":
        return False, f"the cpp backend runs on CPU tensors only, not {torch.device(device).type}"
    try:
        _build.load_extension("cpu")
    except _build.ExtensionBuildError as exc:
        return False, str(exc)
    return True, ""


def _ext():
    return _build.load_extension("cpu")


def masked_adamw_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                  steps: Sequence[float], *, lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float) -> None:
    _ext().masked_adamw_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                         [float(s) for s in steps], lr, beta1, beta2, eps, weight_decay)


def segment_dot(a: Tensors, b: Tensors) -> torch.Tensor:
    return _ext().segment_dot(list(a), list(b))


def mask_shift_(theta: Tensors, delta: Tensors, dm: torch.Tensor) -> None:
    _ext().mask_shift_(list(theta), list(delta), dm)


def user_update_(theta: Tensors, delta: Tensors, grad: Tensors, m: torch.Tensor, lr: float) -> None:
    _ext().user_update_(list(theta), list(delta), list(grad), m, float(lr))
