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
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from freezeguard.backends import resolve
from freezeguard.backends.protocol import ALL_DTYPES
from freezeguard.ops import bookkeeping as _bookkeeping

SUPPORTED_DTYPES = tuple(d for d in (torch.float32, torch.bfloat16, torch.float16) if d in ALL_DTYPES)
Tensors = Sequence[torch.Tensor]


def _tracing() -> bool:
    """Under torch.compile the ops are the registered torch.library ops (``ops/library.py``):
    opaque nodes with fake implementations, so a compiled step does not break its graph here."""
    return torch.compiler.is_compiling()


def _library():
    return torch.ops.freezeguard  # registered by freezeguard/ops/library.py, imported below


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
            if is_traceable_wrapper_subclass(t):
                raise TypeError(f"{op}: {k}[{i}] is a {type(t).__name__} (a tensor subclass); the fused kernels "
                                "take plain tensors: pass local shards (DTensor.to_local()) or use fg.optim.AdamW, "
                                "which does")
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


def check_backend(backend: str, device: torch.device) -> None:
    """Raise ``BackendUnavailable`` (saying why) when ``backend`` cannot run the ops on ``device``."""
    resolve(backend, torch.device(device))


def _run_masked_adamw(be, params, grads, exp_avgs, exp_avg_sqs, steps: list[float], contiguous: bool, *,
                      lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    c = _Contiguous({"grads": grads}, {"params": params, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
                    all_contiguous=contiguous)
    be.masked_adamw_(c.lists["params"], c.lists["grads"], c.lists["exp_avgs"], c.lists["exp_avg_sqs"], steps,
                     lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    c.write_back()


@torch.no_grad()
def masked_adamw_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                  steps: Sequence[float] | torch.Tensor, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                  eps: float = 1e-8, weight_decay: float = 1e-2, backend: str = "auto") -> None:
    """One AdamW update, in place, of every listed (trainable) tensor.

    Frozen tensors are simply not listed: the op never touches them. ``steps[i]`` is
    tensor i's step count including this update. Non-finite gradients propagate into the
    parameters exactly as in ``torch.optim.AdamW`` (skipping is the grad scaler's job).
    """
    beta1, beta2 = (float(b) for b in betas)
    if _tracing():
        steps = [float(s) for s in steps]
        return _library().masked_adamw_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), steps,
                                        float(lr), beta1, beta2, float(eps), float(weight_decay), backend)
    n, contiguous = _validate("masked_adamw_", params=params, grads=grads, exp_avgs=exp_avgs,
                              exp_avg_sqs=exp_avg_sqs)
    steps = [float(s) for s in (steps.tolist() if isinstance(steps, torch.Tensor) else steps)]
    if len(steps) != n:
        raise ValueError(f"masked_adamw_: steps has {len(steps)} entries for {n} tensors")
    if any(s < 1 for s in steps):
        raise ValueError("masked_adamw_: step counts must be >= 1 (they include the current update)")
    if n == 0:
        return
    be = resolve(backend, _device_of(params), op="masked_adamw_", tensors=params)
    _run_masked_adamw(be, params, grads, exp_avgs, exp_avg_sqs, steps, contiguous, lr=float(lr), beta1=beta1,
                      beta2=beta2, eps=float(eps), weight_decay=float(weight_decay))


def _check_step_counters(op: str, counters: Tensors, n: int, device: torch.device) -> bool:
    """Counters are one-element float tensors; True when they live on the host (CPU)."""
    if len(counters) != n:
        raise ValueError(f"{op}: step_counters has {len(counters)} entries for {n} tensors")
    on_host = None
    for i, c in enumerate(counters):
        if not isinstance(c, torch.Tensor) or c.numel() != 1 or not c.is_floating_point():
            raise TypeError(f"{op}: step_counters[{i}] must be a one-element float tensor, got {c!r}")
        here = c.device.type == "cpu"
        if on_host is None:
            on_host = here
        elif here != on_host or (not here and c.device != device):
            raise ValueError(f"{op}: step counters must all be CPU tensors or all on {device} (the params' device); "
                             f"step_counters[{i}] is on {c.device}")
    return bool(on_host) if n else True


@torch.no_grad()
def masked_adamw_step_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                       step_counters: Tensors, *, lr: float | torch.Tensor, betas: tuple[float, float] = (0.9, 0.999),
                       eps: float = 1e-8, weight_decay: float = 1e-2, backend: str = "auto") -> None:
    """An optimizer's AdamW step: :func:`masked_adamw_` with the step counts kept in tensors.

    ``step_counters[i]`` is a one-element float32 tensor holding tensor i's count *before* this
    update (``fg.optim.AdamW``'s ``state["step"]``); the op adds one to each, in place, and uses
    the new count. Counters on the CPU are read on the host (in one native call on the cpp
    backend, together with every check and the update). Counters on the parameters' device,
    with ``lr`` a one-element tensor there too, make the step *capturable*: nothing is read on
    the host, so it can be recorded in a CUDA graph and replayed while ``lr`` changes in place.

    Example:
        >>> import torch, freezeguard as fg
        >>> p, g = [torch.ones(2)], [torch.ones(2)]
        >>> m, v, count = [torch.zeros(2)], [torch.zeros(2)], [torch.tensor(0.0)]
        >>> fg.ops.masked_adamw_step_(p, g, m, v, count, lr=0.1, weight_decay=0.0)
        >>> p[0], count[0]
        (tensor([0.9000, 0.9000]), tensor(1.))
    """
    beta1, beta2 = (float(b) for b in betas)
    lr_t = lr if isinstance(lr, torch.Tensor) else None
    lr_f = 0.0 if lr_t is not None else float(lr)
    hp = dict(beta1=beta1, beta2=beta2, eps=float(eps), weight_decay=float(weight_decay))
    if _tracing():
        return _library().masked_adamw_step_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                                             list(step_counters), lr_f, lr_t, *hp.values(), backend)
    if params:
        be = resolve(backend, params[0].device, op="masked_adamw_", tensors=params)
        native = getattr(be, "try_masked_adamw_step_", None)
        # The common case in one native call; it refuses (writing nothing) whatever it does not
        # handle, and everything below then runs as if it were not there.
        if native is not None and lr_t is None and native(params, grads, exp_avgs, exp_avg_sqs, step_counters,
                                                          lr=lr_f, **hp):
            return
    n, contiguous = _validate("masked_adamw_step_", params=params, grads=grads, exp_avgs=exp_avgs,
                              exp_avg_sqs=exp_avg_sqs)
    device = _device_of(params)
    on_host = _check_step_counters("masked_adamw_step_", step_counters, n, device)
    if lr_t is not None and lr_t.numel() != 1:
        raise ValueError(f"masked_adamw_step_: a tensor lr must hold one value, got shape {tuple(lr_t.shape)}")
    if n == 0:
        return
    capturable = not (on_host and lr_t is None)
    be = resolve(backend, device, op="masked_adamw_capturable_" if capturable else "masked_adamw_", tensors=params)
    if not capturable:
        counts = _bookkeeping.read_steps(step_counters)
        if not all(c >= 0 for c in counts):  # also NaN
            raise ValueError("masked_adamw_step_: step counters must be >= 0")
        _run_masked_adamw(be, params, grads, exp_avgs, exp_avg_sqs, [c + 1.0 for c in counts], contiguous,
                          lr=lr_f, **hp)
        _bookkeeping.add_to_steps_(step_counters, 1.0)
        return
    # capturable: the counts and lr stay tensors; backends read them where the math runs
    if lr_t is not None and lr_t.device != device and not (lr_t.device.type == "cpu" and device.type == "cpu"):
        raise ValueError(f"masked_adamw_step_: lr is on {lr_t.device} but the params are on {device}")
    torch._foreach_add_(list(step_counters), 1.0)
    steps = torch.stack([c.reshape(()) for c in step_counters]).to(device=device, dtype=torch.float32)
    c = _Contiguous({"grads": grads}, {"params": params, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
                    all_contiguous=contiguous)
    be.masked_adamw_capturable_(c.lists["params"], c.lists["grads"], c.lists["exp_avgs"], c.lists["exp_avg_sqs"],
                                steps, lr=lr_t if lr_t is not None else lr_f, **hp)
    c.write_back()


class PreparedAdamW:
    """The lists an optimizer passes to every step, prepared once for :func:`try_masked_adamw_step_`.

    ``params`` and their ``exp_avgs``, ``exp_avg_sqs`` and ``step_counters`` (as for
    :func:`masked_adamw_step_`). A backend with a prepared path (cpp) keeps them natively, so a
    step converts no list: gradients are read from each parameter's ``.grad``. The lists must
    not change afterwards; prepare new ones when they do.
    """

    __slots__ = ("params", "exp_avgs", "exp_avg_sqs", "step_counters", "_native")

    def __init__(self, params: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, step_counters: Tensors):
        self.params, self.exp_avgs = list(params), list(exp_avgs)
        self.exp_avg_sqs, self.step_counters = list(exp_avg_sqs), list(step_counters)
        self._native: dict[str, object] = {}

    def native_for(self, be) -> object | None:
        if be.name not in self._native:
            make = getattr(be, "adamw_lists", None)
            self._native[be.name] = make(self.params, self.exp_avgs, self.exp_avg_sqs, self.step_counters) \
                if make is not None else None
        return self._native[be.name]


def try_masked_adamw_step_(prepared: PreparedAdamW, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                           eps: float = 1e-8, weight_decay: float = 1e-2, backend: str = "auto",
                           check_only: bool = False) -> bool:
    """:func:`masked_adamw_step_` over prepared lists with ``grads[i] = params[i].grad``, if it can.

    The optimizer's fast path: True when the step is done; False, having written nothing, when
    it cannot run here (a ``.grad`` is None, the backend has no prepared path, a tensor lr, or
    any input the full op would check does not fit). The caller then runs
    :func:`masked_adamw_step_`, which takes every case and names any problem.
    ``check_only=True`` answers whether the step would run, writing nothing.
    """
    if not prepared.params or isinstance(lr, torch.Tensor) or _tracing():
        return False
    be = resolve(backend, prepared.params[0].device, op="masked_adamw_", tensors=prepared.params)
    run = getattr(be, "try_masked_adamw_step_prepared_", None)
    native = prepared.native_for(be) if run is not None else None
    if native is None:
        return False
    beta1, beta2 = betas
    return run(native, lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
               weight_decay=float(weight_decay), check_only=check_only)


@torch.no_grad()
def segment_dot(a: Tensors, b: Tensors, *, backend: str = "auto") -> torch.Tensor:
    """fp32 tensor [S]: the dot product <a_i, b_i> of each pair, accumulated in fp32."""
    if _tracing():
        return _library().segment_dot(list(a), list(b), backend)
    n, contiguous = _validate("segment_dot", a=a, b=b)
    device = _device_of(a)
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    be = resolve(backend, device, op="segment_dot", tensors=a)
    c = _Contiguous({"a": a, "b": b}, {}, all_contiguous=contiguous)
    return be.segment_dot(c.lists["a"], c.lists["b"])


@torch.no_grad()
def mask_shift_(theta: Tensors, delta: Tensors, dm: torch.Tensor | Sequence[float], *,
                backend: str = "auto") -> None:
    """theta_i += delta_i * dm[i] for every tensor i, in place."""
    if _tracing():
        return _library().mask_shift_(list(theta), list(delta), torch.as_tensor(dm, dtype=torch.float32), backend)
    n, contiguous = _validate("mask_shift_", theta=theta, delta=delta)
    device = _device_of(theta)
    dm = _per_tensor_scalars("mask_shift_", "dm", dm, n, device)
    if n == 0:
        return
    be = resolve(backend, device, op="mask_shift_", tensors=theta)
    c = _Contiguous({"delta": delta}, {"theta": theta}, all_contiguous=contiguous)
    be.mask_shift_(c.lists["theta"], c.lists["delta"], dm)
    c.write_back()


@torch.no_grad()
def user_update_(theta: Tensors, delta: Tensors, grad: Tensors, m: torch.Tensor | Sequence[float],
                 lr: float, *, backend: str = "auto") -> None:
    """The simulated user's step: u = -lr (1-m_i) g_i; theta_i += (1-m_i) u; delta_i -= u."""
    if _tracing():
        return _library().user_update_(list(theta), list(delta), list(grad), torch.as_tensor(m, dtype=torch.float32),
                                       float(lr), backend)
    n, contiguous = _validate("user_update_", theta=theta, delta=delta, grad=grad)
    device = _device_of(theta)
    m = _per_tensor_scalars("user_update_", "m", m, n, device)
    if n == 0:
        return
    be = resolve(backend, device, op="user_update_", tensors=theta)
    c = _Contiguous({"grad": grad}, {"theta": theta, "delta": delta}, all_contiguous=contiguous)
    be.user_update_(c.lists["theta"], c.lists["delta"], c.lists["grad"], m, float(lr))
    c.write_back()


@torch.no_grad()
def user_adamw_(theta: Tensors, delta: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                m: torch.Tensor | Sequence[float], step: int, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                eps: float = 1e-8, weight_decay: float = 0.0, backend: str = "auto") -> None:
    """The AdamW simulated user's step (the learner's stronger attacker), in place.

    torch.optim.AdamW on theta_ft = theta - m_i Delta with gradient (1 - m_i) g, landed on the
    live weights: theta += (1 - m_i) u, Delta -= u (see ``reference.user_adamw_`` for the math).
    ``step`` counts user steps including this one (>= 1; m is constant between releaser steps,
    so one count serves every tensor). ``grads`` may be used as scratch: their values after the
    call are unspecified.

    Example:
        >>> import torch, freezeguard as fg
        >>> th, de, g = [torch.ones(3)], [torch.ones(3)], [torch.ones(3)]
        >>> fg.ops.user_adamw_(th, de, g, [torch.zeros(3)], [torch.zeros(3)], [0.5], 1, lr=0.1)
        >>> [round(v, 4) for v in th[0].tolist()], [round(v, 4) for v in de[0].tolist()]
        ([0.95, 0.95, 0.95], [1.1, 1.1, 1.1])
    """
    beta1, beta2 = (float(b) for b in betas)
    if _tracing():
        return _library().user_adamw_(list(theta), list(delta), list(grads), list(exp_avgs), list(exp_avg_sqs),
                                      torch.as_tensor(m, dtype=torch.float32), int(step), float(lr), beta1, beta2,
                                      float(eps), float(weight_decay),
                                      backend)
    n, contiguous = _validate("user_adamw_", theta=theta, delta=delta, grads=grads, exp_avgs=exp_avgs,
                              exp_avg_sqs=exp_avg_sqs)
    if isinstance(step, bool) or int(step) != step or step < 1:
        raise ValueError(f"user_adamw_: step counts the current update and must be an integer >= 1, got {step!r}")
    device = _device_of(theta)
    m = _per_tensor_scalars("user_adamw_", "m", m, n, device)
    if n == 0:
        return
    be = resolve(backend, device, op="user_adamw_", tensors=theta)
    c = _Contiguous({"grads": grads}, {"theta": theta, "delta": delta, "exp_avgs": exp_avgs,
                                       "exp_avg_sqs": exp_avg_sqs}, all_contiguous=contiguous)
    be.user_adamw_(c.lists["theta"], c.lists["delta"], c.lists["grads"], c.lists["exp_avgs"], c.lists["exp_avg_sqs"],
                   m, int(step), lr=float(lr), beta1=beta1, beta2=beta2, eps=float(eps),
                   weight_decay=float(weight_decay))
    c.write_back()


__all__ = ["check_backend", "masked_adamw_", "masked_adamw_step_", "PreparedAdamW", "try_masked_adamw_step_", "segment_dot", "mask_shift_", "user_update_", "user_adamw_",
           "SUPPORTED_DTYPES"]

# Registers the ops above with torch.library (needs them defined, hence last).
from freezeguard.ops import library as _library_registration  # noqa: E402,F401
