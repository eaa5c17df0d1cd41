"""The optimizer's AdamW step: ``masked_adamw_`` with the step counts kept in tensors.

``fg.optim.AdamW`` keeps each tensor's count in ``state["step"]``; this op reads and bumps them
and runs the declared kernels (``masked_adamw_``, or ``masked_adamw_capturable_`` when the counts
and ``lr`` stay on the device). A backend may offer fast paths for it, declared in its record
(``AdamWFastPaths``): the whole step in one native call, and the same over lists prepared once
(``PreparedAdamW``). Each refuses, writing nothing, whatever it does not handle; the full path
then runs and names any problem.
"""
from __future__ import annotations

from typing import Sequence

import torch

from freezeguard.backends import resolve
from freezeguard.ops import native_shortcuts
from freezeguard.ops.validation import Contiguous, device_of, validate

Tensors = Sequence[torch.Tensor]


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
    if torch.compiler.is_compiling():
        return torch.ops.freezeguard.masked_adamw_step_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                                                        list(step_counters), lr_f, lr_t, *hp.values(), backend)
    if params:
        be = resolve(backend, params[0].device, op="masked_adamw_", tensors=params)
        native = be.adamw_fast.native_step
        # The common case in one native call; it refuses (writing nothing) whatever it does not
        # handle, and everything below then runs as if it were not there.
        if native is not None and lr_t is None and native(params, grads, exp_avgs, exp_avg_sqs, step_counters,
                                                          lr=lr_f, **hp):
            return
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    n, contiguous = validate("masked_adamw_step_", lists)
    device = device_of(params)
    on_host = _check_step_counters("masked_adamw_step_", step_counters, n, device)
    if lr_t is not None and lr_t.numel() != 1:
        raise ValueError(f"masked_adamw_step_: a tensor lr must hold one value, got shape {tuple(lr_t.shape)}")
    if n == 0:
        return
    capturable = not (on_host and lr_t is None)
    op = "masked_adamw_capturable_" if capturable else "masked_adamw_"
    be = resolve(backend, device, op=op, tensors=params)
    if not capturable:
        counts = native_shortcuts.read_steps(step_counters)
        if not all(c >= 0 for c in counts):  # also NaN
            raise ValueError("masked_adamw_step_: step counters must be >= 0")
        steps: list[float] | torch.Tensor = [c + 1.0 for c in counts]
    else:
        # capturable: the counts and lr stay tensors; backends read them where the math runs
        if lr_t is not None and lr_t.device != device and not (lr_t.device.type == "cpu" and device.type == "cpu"):
            raise ValueError(f"masked_adamw_step_: lr is on {lr_t.device} but the params are on {device}")
        torch._foreach_add_(list(step_counters), 1.0)
        steps = torch.stack([c.reshape(()) for c in step_counters]).to(device=device, dtype=torch.float32)
    c = Contiguous({"grads": grads}, {"params": params, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
                   all_contiguous=contiguous)
    be.kernels[op](c.lists["params"], c.lists["grads"], c.lists["exp_avgs"], c.lists["exp_avg_sqs"], steps,
                   lr=lr_f if lr_t is None else lr_t, **hp)
    c.write_back()
    if not capturable:
        native_shortcuts.add_to_steps_(step_counters, 1.0)


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
            make = be.adamw_fast.prepare_lists
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
    if not prepared.params or isinstance(lr, torch.Tensor) or torch.compiler.is_compiling():
        return False
    be = resolve(backend, prepared.params[0].device, op="masked_adamw_", tensors=prepared.params)
    run = be.adamw_fast.prepared_step
    native = prepared.native_for(be) if run is not None else None
    if native is None:
        return False
    beta1, beta2 = betas
    return run(native, lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
               weight_decay=float(weight_decay), check_only=check_only)


__all__ = ["masked_adamw_step_", "PreparedAdamW", "try_masked_adamw_step_"]
