"""The fused ops registered with ``torch.library``: what ``torch.compile`` sees.

Each op is a custom op ``torch.ops.freezeguard.<name>`` whose schema says what it mutates
(e.g. ``Tensor(a!)[] params``), with a fake implementation that checks list lengths, shapes and
dtypes and computes nothing, so ``torch.compile(fullgraph=True)`` traces a call as one opaque
node instead of breaking the graph. At run time the node calls the eager op of
``freezeguard.ops``, so backend choice, validation and the kernels are the same as in eager mode.

In eager mode ``freezeguard.ops`` does not go through the dispatcher (it would convert every
tensor list to and fro on each call, a real cost on a 686-tensor step); it switches to these
ops only while torch.compile traces (``torch.compiler.is_compiling()``).

Example:
    >>> import torch, freezeguard as fg
    >>> a = [torch.ones(3), torch.ones(2)]
    >>> f = torch.compile(lambda x: fg.ops.segment_dot(x, x, backend="torch"), fullgraph=True,
    ...                   backend="aot_eager")
    >>> f(a)                                                    # doctest: +SKIP
    tensor([3., 2.])
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from freezeguard import ops as eager
from freezeguard.ops import SUPPORTED_DTYPES

Tensors = list[Tensor]


def _check(op: str, first: str, **lists: Tensors) -> None:
    """The shape/dtype rules of freezeguard.ops, on fake tensors."""
    ref = lists[first]
    for name, ts in lists.items():
        torch._check(len(ts) == len(ref), lambda name=name, ts=ts: f"{op}: {name} has {len(ts)} tensors, "
                                                                   f"{first} {len(ref)}")
        for i, (a, b) in enumerate(zip(ref, ts, strict=True)):
            torch._check(b.dtype in SUPPORTED_DTYPES, lambda b=b, i=i, name=name: f"{op}: {name}[{i}] has dtype "
                                                                                 f"{b.dtype}; supported: fp32, bf16, fp16")
            torch._check(a.dtype == b.dtype, lambda a=a, b=b, i=i, name=name: f"{op}: {name}[{i}] is {b.dtype} but "
                                                                             f"{first}[{i}] is {a.dtype}")
            torch._check(a.shape == b.shape, lambda a=a, b=b, i=i, name=name: f"{op}: {name}[{i}] has shape "
                                                                             f"{tuple(b.shape)}, {first}[{i}] "
                                                                             f"{tuple(a.shape)}")


def _scalars(op: str, name: str, x: Tensor, n: int) -> None:
    torch._check(x.dim() == 1 and x.numel() == n, lambda: f"{op}: {name} must hold one value per tensor ({n})")


def _register() -> None:
    """Define the ops; runs once, when ``freezeguard.ops`` is imported (never inside a trace)."""
    @torch.library.custom_op("freezeguard::masked_adamw_",
                             mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
    def masked_adamw_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                      steps: list[float], lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float, backend: str) -> None:
        eager.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, betas=(beta1, beta2), eps=eps,
                            weight_decay=weight_decay, backend=backend)

    @masked_adamw_.register_fake
    def _(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, backend):
        _check("masked_adamw_", "params", params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
        torch._check(len(steps) == len(params), lambda: "masked_adamw_: one step count per tensor")

    @torch.library.custom_op("freezeguard::masked_adamw_step_",
                             mutates_args=("params", "exp_avgs", "exp_avg_sqs", "step_counters"))
    def masked_adamw_step_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                           step_counters: Tensors, lr: float, lr_tensor: Optional[Tensor], beta1: float,
                           beta2: float, eps: float, weight_decay: float, backend: str) -> None:
        eager.masked_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, step_counters,
                                 lr=lr_tensor if lr_tensor is not None else lr, betas=(beta1, beta2), eps=eps,
                                 weight_decay=weight_decay, backend=backend)

    @masked_adamw_step_.register_fake
    def _(params, grads, exp_avgs, exp_avg_sqs, step_counters, lr, lr_tensor, beta1, beta2, eps, weight_decay,
          backend):
        _check("masked_adamw_step_", "params", params=params, grads=grads, exp_avgs=exp_avgs,
               exp_avg_sqs=exp_avg_sqs)
        torch._check(len(step_counters) == len(params), lambda: "masked_adamw_step_: one step counter per tensor")
        for c in step_counters:
            torch._check(c.numel() == 1, lambda: "masked_adamw_step_: step counters hold one value each")

    @torch.library.custom_op("freezeguard::segment_dot", mutates_args=())
    def segment_dot(a: Tensors, b: Tensors, backend: str) -> Tensor:
        return eager.segment_dot(a, b, backend=backend)

    @segment_dot.register_fake
    def _(a, b, backend):
        _check("segment_dot", "a", a=a, b=b)
        device = a[0].device if a else torch.device("cpu")
        return torch.empty(len(a), dtype=torch.float32, device=device)

    @torch.library.custom_op("freezeguard::mask_shift_", mutates_args=("theta",))
    def mask_shift_(theta: Tensors, delta: Tensors, dm: Tensor, backend: str) -> None:
        eager.mask_shift_(theta, delta, dm, backend=backend)

    @mask_shift_.register_fake
    def _(theta, delta, dm, backend):
        _check("mask_shift_", "theta", theta=theta, delta=delta)
        _scalars("mask_shift_", "dm", dm, len(theta))

    @torch.library.custom_op("freezeguard::user_update_", mutates_args=("theta", "delta"))
    def user_update_(theta: Tensors, delta: Tensors, grad: Tensors, m: Tensor, lr: float, backend: str) -> None:
        eager.user_update_(theta, delta, grad, m, lr, backend=backend)

    @user_update_.register_fake
    def _(theta, delta, grad, m, lr, backend):
        _check("user_update_", "theta", theta=theta, delta=delta, grad=grad)
        _scalars("user_update_", "m", m, len(theta))

    @torch.library.custom_op("freezeguard::user_adamw_",
                             mutates_args=("theta", "delta", "grads", "exp_avgs", "exp_avg_sqs"))
    def user_adamw_(theta: Tensors, delta: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                    m: Tensor, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                    backend: str) -> None:
        eager.user_adamw_(theta, delta, grads, exp_avgs, exp_avg_sqs, m, step, lr=lr, betas=(beta1, beta2),
                          eps=eps, weight_decay=weight_decay, backend=backend)

    @user_adamw_.register_fake
    def _(theta, delta, grads, exp_avgs, exp_avg_sqs, m, step, lr, beta1, beta2, eps, weight_decay, backend):
        _check("user_adamw_", "theta", theta=theta, delta=delta, grads=grads, exp_avgs=exp_avgs,
               exp_avg_sqs=exp_avg_sqs)
        _scalars("user_adamw_", "m", m, len(theta))



if not hasattr(torch.ops.freezeguard, "segment_dot"):  # a module reload must not define them twice
    _register()

__all__: list[str] = []
