"""The `triton` backend: the fused ops as multi-tensor Triton kernels (``freezeguard.kernels``).

Each op covers the whole tensor list in one launch per dtype group (segment_dot adds one
reduction launch). Runs on CUDA tensors; on CPU tensors only under ``TRITON_INTERPRET=1``
(the Triton interpreter), which is how the kernels are tested without a GPU. Triton itself is
imported lazily: ``import freezeguard`` never imports it.

Example:
    >>> import torch
    >>> from freezeguard.backends import triton_backend as tb
    >>> ok, why = tb.availability()
    >>> isinstance(ok, bool) and isinstance(why, str)
    True
"""
from __future__ import annotations

import importlib.util
import os

import torch

from freezeguard.backends.record import ALL_DTYPES, BackendRecord


def _interpreting() -> bool:
    """Whether the kernels run (or, once imported, will run) under the Triton interpreter."""
    # triton.jit decides when a kernel is decorated, i.e. when freezeguard.kernels is first
    # imported; kernels/triton/launch.py records triton's own setting at that moment. Before that, the
    # environment variable triton will read is the answer.
    import sys

    launch = sys.modules.get("freezeguard.kernels.launch")
    if launch is not None:
        return launch.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def availability() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'freezeguard[triton]')"
    try:
        import triton
    except Exception as exc:  # a broken install must say so, not crash the registry
        return False, f"triton fails to import: {type(exc).__name__}: {exc}"
    if _interpreting():
        return True, f"triton {triton.__version__} under TRITON_INTERPRET=1 (CPU interpreter, slow; for tests)"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on CUDA ({torch.cuda.get_device_name()})"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)"


def supports(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda" and _interpreting():
        # Interpreted kernels dereference the host addresses in the pointer tables.
        return False, "TRITON_INTERPRET=1 runs kernels on the CPU; CUDA tensors need compiled kernels"
    if device.type == "cpu" and not _interpreting():
        return False, "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
    return True, ""


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay) -> None:
    from freezeguard.kernels.adamw import masked_adamw_ as run

    run(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay)


def masked_adamw_capturable_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
                             weight_decay) -> None:
    from freezeguard.kernels.adamw import masked_adamw_capturable_ as run

    run(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay)


def segment_dot(a, b) -> torch.Tensor:
    from freezeguard.kernels.mask_updates import segment_dot as run

    return run(a, b)


def mask_shift_(theta, delta, dm) -> None:
    from freezeguard.kernels.mask_updates import mask_shift_ as run

    run(theta, delta, dm)


def user_update_(theta, delta, grad, m, lr) -> None:
    from freezeguard.kernels.mask_updates import user_update_ as run

    run(theta, delta, grad, m, lr)


BACKEND = BackendRecord(
    name="triton", devices=frozenset(("cpu", "cuda")), dtypes=ALL_DTYPES,
    availability=availability, supports_device=supports,  # kernels compile per launch configuration, in triton
    kernels={"masked_adamw_": masked_adamw_, "masked_adamw_capturable_": masked_adamw_capturable_,
             "segment_dot": segment_dot, "mask_shift_": mask_shift_, "user_update_": user_update_},
)
