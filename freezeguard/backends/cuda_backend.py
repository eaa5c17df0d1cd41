"""The `cuda` backend: hand-written multi-tensor CUDA kernels (csrc/cuda, module freezeguard._cuda).

Each op covers a whole tensor list in one persistent launch per storage dtype, walking a
device-side table of tensor pointers (cached, keyed on the pointers), with 128-bit loads
where the tensors are 16-byte aligned. Math is fp32 and follows ``reference.py``.

On CUDA tensors ``backend="auto"`` tries it first (``AUTO_ORDER`` in ``freezeguard.backends``,
from the measurements in benchmarks/RESULTS.md); ``backend="cuda"`` or ``FREEZEGUARD_BACKEND=cuda``
forces it.

Example:
    >>> import torch, freezeguard as fg                                  # doctest: +SKIP
    >>> a = [torch.ones(3, device="cuda"), torch.ones(2, device="cuda")]  # doctest: +SKIP
    >>> fg.ops.segment_dot(a, a, backend="cuda")                          # doctest: +SKIP
    tensor([3., 2.], device='cuda:0')
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Sequence

import torch

from freezeguard.backends.record import ALL_DTYPES, BackendRecord


def hardware_note() -> str:
    """What `freezeguard info` says about hardware verification.

    Read from ``verified_hardware.json`` (data, not code: whoever records a GPU run of the
    reference grid and compute-sanitizer in benchmarks/RESULTS.md updates that file).
    """
    try:
        rec = json.loads(resources.files("freezeguard.backends").joinpath("verified_hardware.json").read_text())["cuda"]
    except (OSError, KeyError, ValueError):
        return "no recorded hardware verification"
    note = f"verified on an {rec['device']}, {rec['date']}"
    if rec.get("commit"):
        note += f", commit {rec['commit']}"
    note += f" ({rec['checks']}; see {rec['record']})"
    if rec.get("not_reverified"):  # the code moved on since: say so rather than imply it is covered
        note += f"; not re-verified since: {rec['not_reverified']}"
    return note


HARDWARE_NOTE = hardware_note()

Tensors = Sequence[torch.Tensor]


def _ext():
    from freezeguard.backends._build import load_extension

    return load_extension("cuda")


def availability() -> tuple[bool, str]:
    """(ok, reason): the extension is prebuilt or JIT-buildable and a CUDA GPU is visible."""
    try:
        from freezeguard.backends._build import extension_status
    except ImportError as exc:  # pragma: no cover - a broken install
        return False, f"extension builder unavailable: {exc}"
    ok, reason = extension_status("cuda")
    if not ok:
        return False, reason
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    return True, f"{reason}; {HARDWARE_NOTE}"


def supports(device: torch.device) -> tuple[bool, str]:
    """CUDA devices only (the record checks it too; kept for direct callers)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the cuda backend runs on CUDA devices only, not {device.type}"
    return True, ""


def prepare() -> tuple[bool, str]:
    from freezeguard.backends._build import ExtensionBuildError

    try:
        _ext()
    except ExtensionBuildError as exc:
        return False, str(exc)
    return True, ""


def _device_vector(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Pinned + non_blocking: no host sync per step (torch keeps the pinned block alive until the
    # copy has run).
    host = torch.tensor(list(values), dtype=dtype, pin_memory=True)
    return host.to(device, non_blocking=True)


def masked_adamw_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                  steps: Sequence[float], *, lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float) -> None:
    """AdamW over the list, in place; ``steps[i]`` includes this update (see reference.py)."""
    device = params[0].device
    steps_t = _device_vector(steps, torch.float64, device)
    _ext().masked_adamw_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), steps_t,
                         float(lr), float(beta1), float(beta2), float(eps), float(weight_decay))


def masked_adamw_capturable_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                             steps: torch.Tensor, *, lr: float | torch.Tensor, beta1: float = 0.9,
                             beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
    """AdamW with the step counts and the learning rate read on the device, for CUDA graphs.

    ``steps`` is a float32/float64 CUDA tensor [S] (each tensor's count including this update),
    ``lr`` a float or a one-element CUDA tensor; neither is read on the host, so the call can be
    captured and replayed while you update them in place. Reached through
    ``fg.ops.masked_adamw_step_`` (``fg.optim.AdamW(capturable=True)``). Run it once on the same
    tensors before capturing, so the pointer table is already on the device.
    """
    lr_t = lr if isinstance(lr, torch.Tensor) else None
    _ext().masked_adamw_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), steps,
                         0.0 if lr_t is not None else float(lr), float(beta1), float(beta2), float(eps),
                         float(weight_decay), lr_t)


def segment_dot(a: Tensors, b: Tensors) -> torch.Tensor:
    """fp32 tensor [S] with <a_i, b_i>; deterministic (no atomics)."""
    return _ext().segment_dot(list(a), list(b))


def mask_shift_(theta: Tensors, delta: Tensors, dm: torch.Tensor) -> None:
    """theta_i += delta_i * dm[i], in place."""
    _ext().mask_shift_(list(theta), list(delta), dm)


def user_update_(theta: Tensors, delta: Tensors, grad: Tensors, m: torch.Tensor, lr: float) -> None:
    """u = -lr (1 - m_i) g_i; theta_i += (1 - m_i) u; delta_i -= u, in place."""
    _ext().user_update_(list(theta), list(delta), list(grad), m, float(lr))


def masked_sgd_momentum_(params: Tensors, grads: Tensors, momentum_buffers: Tensors, *, lr: float, momentum: float,
                         dampening: float, weight_decay: float, nesterov: bool) -> None:
    """SGD with momentum over the list, in place (see reference.py)."""
    _ext().masked_sgd_momentum_(list(params), list(grads), list(momentum_buffers), float(lr), float(momentum),
                                float(dampening), float(weight_decay), bool(nesterov))


def clear_table_cache() -> None:
    """Drop the cached device tables (only when no captured graph that used them will replay)."""
    _ext().clear_table_cache()


BACKEND = BackendRecord(
    name="cuda", devices=frozenset(("cuda",)), dtypes=ALL_DTYPES,
    availability=availability, supports_device=supports, prepare=prepare,
    kernels={"masked_adamw_": masked_adamw_, "masked_adamw_capturable_": masked_adamw_capturable_,
             "segment_dot": segment_dot, "mask_shift_": mask_shift_, "user_update_": user_update_,
             "masked_sgd_momentum_": masked_sgd_momentum_},
)

__all__ = ["BACKEND", "HARDWARE_NOTE", "hardware_note", "availability", "supports", "prepare", "masked_adamw_",
           "masked_adamw_capturable_", "segment_dot", "mask_shift_", "user_update_", "masked_sgd_momentum_",
           "clear_table_cache"]
