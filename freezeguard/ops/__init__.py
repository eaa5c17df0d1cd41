"""The fused ops: one Python entry point per op, validating input once and dispatching.

Each op works on a whole *list* of tensors (one model) in one pass over memory; compiled
backends cover the list in one or a few kernel launches. All math is in fp32; tensors may
be fp32, bf16 or fp16 (each tensor's companions share its dtype). Per-tensor scalars
(``dm``, ``m``) are fp32 tensors of length S on the tensors' device.

Example:
    >>> import torch, freezeguard as fg
    >>> a = [torch.ones(3), torch.ones(2)]
    >>> fg.ops.segment_dot(a, a, backend="torch")
    tensor([3., 2.])
"""
from __future__ import annotations

from typing import Sequence

import torch

from freezeguard.backends import resolve
from freezeguard.ops import bookkeeping as _bookkeeping

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
Tensors = Sequence[torch.Tensor]


def _check_lists(op: str, **lists: Tensors) -> int:
    """Same lengths, shapes, device; floating dense tensors; a clear error otherwise."""
    names = list(lists)
    n = len(lists[names[0]])
    for k in names[1:]:
        if len(lists[k]) != n:
            raise ValueError(f"{op}: list lengths differ: "
                             + ", ".join(f"{name}={len(lists[name])}" for name in names))
    device = None
    for k in names:
        for i, t in enumerate(lists[k]):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {k}[{i}] is a {type(t).__name__}, not a torch.Tensor")
            if t.layout != torch.strided:
                raise TypeError(f"{op}: {k}[{i}] is a {t.layout} tensor; only dense (strided) tensors are supported")
            if t.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{op}: {k}[{i}] has dtype {t.dtype}; supported: fp32, bf16, fp16")
            if device is None:
                device = t.device
            elif t.device != device:
                raise ValueError(f"{op}: {k}[{i}] is on {t.device} but other tensors are on {device}")
    first = lists[names[0]]
    for k in names[1:]:
        for i, (a, b) in enumerate(zip(first, lists[k], strict=True)):
            if a.shape != b.shape:
                raise ValueError(f"{op}: {names[0]}[{i}] has shape {tuple(a.shape)} "
                                 f"but {k}[{i}] has shape {tuple(b.shape)}")
    return n


def _check_same_dtype(op: str, first: str, **lists: Tensors) -> None:
    ref = lists[first]
    for k, ts in lists.items():
        for i, (a, b) in enumerate(zip(ref, ts, strict=True)):
            if a.dtype != b.dtype:
                raise TypeError(f"{op}: {k}[{i}] is {b.dtype} but {first}[{i}] is {a.dtype}")


def _validate(op: str, **lists: Tensors) -> tuple[int, bool]:
    """(list length, whether every tensor is contiguous) after every check of this module.

    The native shortcut (``_bookkeeping.fast_check``) answers for valid input; anything it
    refuses goes through the Python checks above, which raise the error naming the tensor.
    """
    first = next(iter(lists))
    fast = _bookkeeping.fast_check(list(lists.values()))
    if fast is not None and fast[0]:
        return len(lists[first]), fast[1]
    n = _check_lists(op, **lists)
    _check_same_dtype(op, first, **lists)
    return n, all(t.is_contiguous() for ts in lists.values() for t in ts)


def _per_tensor_scalars(op: str, name: str, x: torch.Tensor | Sequence[float], n: int,
                        device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float32)
    if t.dim() != 1 or t.numel() != n:
        raise ValueError(f"{op}: {name} must hold one value per tensor ({n}), got shape {tuple(t.shape)}")
    if t.device != device:
        t = t.to(device)
    return t.contiguous()


def _device_of(*lists: Tensors) -> torch.device:
    for ts in lists:
        if len(ts):
            return ts[0].device
    return torch.device("cpu")


class _Contiguous:
    """Give kernels contiguous tensors; copy results back into non-contiguous outputs.

    Parameters and their states are contiguous in practice; this keeps rare strided views
    correct without asking every backend to handle strides.
    """

    def __init__(self, inputs: dict[str, Tensors], outputs: dict[str, Tensors], *, all_contiguous: bool = False):
        self._writeback: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.lists: dict[str, list[torch.Tensor]] = {}
        if all_contiguous:  # the common case, known from _validate: nothing to copy or check
            self.lists = {k: list(ts) for k, ts in (*inputs.items(), *outputs.items())}
            return
        for k, ts in inputs.items():
            self.lists[k] = [t if t.is_contiguous() else t.contiguous() for t in ts]
        for k, ts in outputs.items():
            out = []
            for t in ts:
                if t.is_contiguous():
                    out.append(t)
                else:
                    c = t.contiguous()
                    self._writeback.append((t, c))
                    out.append(c)
            self.lists[k] = out

    def write_back(self) -> None:
        for original, compact in self._writeback:
            original.copy_(compact)


@torch.no_grad()
def masked_adamw_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                  steps: Sequence[float] | torch.Tensor, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                  eps: float = 1e-8, weight_decay: float = 1e-2, backend: str = "auto") -> None:
    """One AdamW update, in place, of every listed (trainable) tensor.

    Frozen tensors are simply not listed: the op never touches them. ``steps[i]`` is
    tensor i's step count including this update. Non-finite gradients propagate into the
    parameters exactly as in ``torch.optim.AdamW`` (skipping is the grad scaler's job).
    """
    n, contiguous = _validate("masked_adamw_", params=params, grads=grads, exp_avgs=exp_avgs,
                              exp_avg_sqs=exp_avg_sqs)
    steps = [float(s) for s in (steps.tolist() if isinstance(steps, torch.Tensor) else steps)]
    if len(steps) != n:
        raise ValueError(f"masked_adamw_: steps has {len(steps)} entries for {n} tensors")
    if any(s < 1 for s in steps):
        raise ValueError("masked_adamw_: step counts must be >= 1 (they include the current update)")
    beta1, beta2 = (float(b) for b in betas)
    if n == 0:
        return
    be = resolve(backend, _device_of(params))
    c = _Contiguous({"grads": grads}, {"params": params, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
                    all_contiguous=contiguous)
    be.masked_adamw_(c.lists["params"], c.lists["grads"], c.lists["exp_avgs"], c.lists["exp_avg_sqs"], steps,
                     lr=float(lr), beta1=beta1, beta2=beta2, eps=float(eps), weight_decay=float(weight_decay))
    c.write_back()


@torch.no_grad()
def segment_dot(a: Tensors, b: Tensors, *, backend: str = "auto") -> torch.Tensor:
    """fp32 tensor [S]: the dot product <a_i, b_i> of each pair, accumulated in fp32."""
    n, contiguous = _validate("segment_dot", a=a, b=b)
    device = _device_of(a)
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    be = resolve(backend, device)
    c = _Contiguous({"a": a, "b": b}, {}, all_contiguous=contiguous)
    return be.segment_dot(c.lists["a"], c.lists["b"])


@torch.no_grad()
def mask_shift_(theta: Tensors, delta: Tensors, dm: torch.Tensor | Sequence[float], *,
                backend: str = "auto") -> None:
    """theta_i += delta_i * dm[i] for every tensor i, in place."""
    n, contiguous = _validate("mask_shift_", theta=theta, delta=delta)
    device = _device_of(theta)
    dm = _per_tensor_scalars("mask_shift_", "dm", dm, n, device)
    if n == 0:
        return
    be = resolve(backend, device)
    c = _Contiguous({"delta": delta}, {"theta": theta}, all_contiguous=contiguous)
    be.mask_shift_(c.lists["theta"], c.lists["delta"], dm)
    c.write_back()


@torch.no_grad()
def user_update_(theta: Tensors, delta: Tensors, grad: Tensors, m: torch.Tensor | Sequence[float],
                 lr: float, *, backend: str = "auto") -> None:
    """The simulated user's step: u = -lr (1-m_i) g_i; theta_i += (1-m_i) u; delta_i -= u."""
    n, contiguous = _validate("user_update_", theta=theta, delta=delta, grad=grad)
    device = _device_of(theta)
    m = _per_tensor_scalars("user_update_", "m", m, n, device)
    if n == 0:
        return
    be = resolve(backend, device)
    c = _Contiguous({"grad": grad}, {"theta": theta, "delta": delta}, all_contiguous=contiguous)
    be.user_update_(c.lists["theta"], c.lists["delta"], c.lists["grad"], m, float(lr))
    c.write_back()


__all__ = ["masked_adamw_", "segment_dot", "mask_shift_", "user_update_", "SUPPORTED_DTYPES"]
