"""The `cpp` backend: the fused ops as one OpenMP pass over the whole tensor list (CPU tensors).

The kernels live in ``csrc/cpu`` and load through ``_build.load_extension("cpu")``:
prebuilt ``freezeguard._C`` when ``pip install`` compiled it, else JIT-built on first use.

Registry contract (``record.py``): ``availability()`` and ``supports(device)`` answer from
what is known (an installed module, a toolchain, a remembered build failure) and never
compile; ``prepare()``, called by the registry right before the first op, loads the extension
or JIT-builds it once. If that build fails, ``auto`` falls back to the reference and
``availability()`` reports the failure from then on.

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
from freezeguard.backends.record import ALL_DTYPES, AdamWFastPaths, BackendRecord

Tensors = Sequence[torch.Tensor]


def availability() -> tuple[bool, str]:
    return _build.extension_status("cpu")


def supports(device: torch.device) -> tuple[bool, str]:
    ok, why = availability()
    return ok, "" if ok else why


def prepare() -> tuple[bool, str]:
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


def try_masked_adamw_step_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                           step_counters: Tensors, *, lr: float, beta1: float, beta2: float, eps: float,
                           weight_decay: float) -> bool:
    """The optimizer's whole step (checks, counters, update) in one native call.

    True when done; False, having written nothing, when the input is outside its contract
    (anything but contiguous CPU tensors, float32 CPU counters >= 0, plain tensors only).
    """
    try:
        return _ext().masked_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, step_counters, lr, beta1, beta2,
                                         eps, weight_decay)
    except (TypeError, RuntimeError):  # e.g. None or a non-tensor in a list: the Python checks say which
        return False


def adamw_lists(params: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, step_counters: Tensors):
    """The four lists held natively, for :func:`try_masked_adamw_step_prepared_`; None if they cannot be."""
    try:
        return _ext().AdamWLists(list(params), list(exp_avgs), list(exp_avg_sqs), list(step_counters))
    except (TypeError, RuntimeError):
        return None


def try_masked_adamw_step_prepared_(lists, *, lr: float, beta1: float, beta2: float, eps: float,
                                    weight_decay: float, check_only: bool = False) -> bool:
    """:func:`try_masked_adamw_step_` over native lists, each gradient read from its param's ``.grad``."""
    return _ext().masked_adamw_step_prepared_(lists, lr, beta1, beta2, eps, weight_decay, check_only)


def masked_adamw_capturable_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                             steps: torch.Tensor, *, lr: float | torch.Tensor, beta1: float, beta2: float,
                             eps: float, weight_decay: float) -> None:
    # On the CPU "the device" is the host: reading the counts and lr costs no synchronisation.
    masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps.tolist(), lr=float(lr), beta1=beta1, beta2=beta2,
                  eps=eps, weight_decay=weight_decay)


def segment_dot(a: Tensors, b: Tensors) -> torch.Tensor:
    return _ext().segment_dot(list(a), list(b))


def mask_shift_(theta: Tensors, delta: Tensors, dm: torch.Tensor) -> None:
    _ext().mask_shift_(list(theta), list(delta), dm)


def user_update_(theta: Tensors, delta: Tensors, grad: Tensors, m: torch.Tensor, lr: float) -> None:
    _ext().user_update_(list(theta), list(delta), list(grad), m, float(lr))


def user_adamw_(theta: Tensors, delta: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                m: torch.Tensor, step: int, *, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float) -> None:
    _ext().user_adamw_(list(theta), list(delta), list(grads), list(exp_avgs), list(exp_avg_sqs), m, int(step),
                       float(lr), float(beta1), float(beta2), float(eps), float(weight_decay))


def masked_sgd_momentum_(params: Tensors, grads: Tensors, momentum_buffers: Tensors, *, lr: float, momentum: float,
                         dampening: float, weight_decay: float, nesterov: bool) -> None:
    _ext().masked_sgd_momentum_(list(params), list(grads), list(momentum_buffers), float(lr), float(momentum),
                                float(dampening), float(weight_decay), bool(nesterov))


BACKEND = BackendRecord(
    name="cpp", devices=frozenset(("cpu",)), dtypes=ALL_DTYPES,
    availability=availability, supports_device=supports, prepare=prepare,
    kernels={"masked_adamw_": masked_adamw_, "masked_adamw_capturable_": masked_adamw_capturable_,
             "segment_dot": segment_dot, "mask_shift_": mask_shift_, "user_update_": user_update_,
             "user_adamw_": user_adamw_, "masked_sgd_momentum_": masked_sgd_momentum_},
    adamw_fast=AdamWFastPaths(native_step=try_masked_adamw_step_, prepare_lists=adamw_lists,
                              prepared_step=try_masked_adamw_step_prepared_),
)
