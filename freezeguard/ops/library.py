"""The fused ops registered with ``torch.library``: what ``torch.compile`` sees.

Each declared public op (``freezeguard.backends.opspecs``) becomes a custom op
``torch.ops.freezeguard.<name>`` whose schema comes from its declaration and says what it mutates
(e.g. ``Tensor(a0!)[] theta``), with a fake implementation, also from the declaration, that checks
list lengths, shapes, dtypes and per-tensor scalars and computes nothing, so
``torch.compile(fullgraph=True)`` traces a call as one opaque node instead of breaking the graph.
At run time the node runs the same eager path as ``fg.ops`` (``entries.run``), so backend
choice, validation and the kernels are the same as in eager mode. ``masked_adamw_step_`` (the
optimizer's composite op, ``adamw_step.py``) is registered here by hand.

In eager mode ``fg.ops`` does not go through the dispatcher; it switches to these ops only while
torch.compile traces (``torch.compiler.is_compiling()``).

Example:
    >>> import torch, freezeguard as fg
    >>> a = [torch.ones(3), torch.ones(2)]
    >>> torch.ops.freezeguard.segment_dot(a, a, "torch")
    tensor([3., 2.])
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from freezeguard.backends.opspecs import PER_TENSOR, PUBLIC, TENSORS, OpSpec
from freezeguard.ops import adamw_step
from freezeguard.ops.entries import run, values_from_library_args
from freezeguard.ops.validation import SUPPORTED_DTYPES

Tensors = list[Tensor]


def _check(op: str, lists: dict[str, Tensors]) -> None:
    """The shape/dtype rules of the eager ops, on fake tensors."""
    first = next(iter(lists))
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


def _fake_for(spec: OpSpec):
    def fake(*args: Any) -> Tensor | None:
        values, _ = values_from_library_args(spec, args)
        lists = {a.name: values[a.name] for a in spec.lists}
        _check(spec.name, lists)
        n = len(next(iter(lists.values())))
        for a in spec.args:
            if a.kind == PER_TENSOR:
                x = values[a.name]
                torch._check(x.dim() == 1 and x.numel() == n,
                             lambda a=a: f"{spec.name}: {a.name} must hold one value per tensor ({n})")
            elif a.kind != TENSORS and isinstance(values[a.name], list):
                torch._check(len(values[a.name]) == n, lambda a=a: f"{spec.name}: one {a.name} value per tensor")
        if spec.returns_per_tensor:
            first = lists[spec.lists[0].name]
            return torch.empty(n, dtype=torch.float32, device=first[0].device if first else torch.device("cpu"))
        return None

    return fake


def _register(spec: OpSpec) -> None:
    def impl(*args: Any) -> Tensor | None:
        values, backend = values_from_library_args(spec, args)
        return run(spec, values, backend)

    op = torch.library.custom_op(f"freezeguard::{spec.name}", impl, mutates_args=spec.mutated,
                                 schema=spec.library_schema())
    op.register_fake(_fake_for(spec))


def _register_adamw_step() -> None:
    @torch.library.custom_op("freezeguard::masked_adamw_step_",
                             mutates_args=("params", "exp_avgs", "exp_avg_sqs", "step_counters"))
    def masked_adamw_step_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                           step_counters: Tensors, lr: float, lr_tensor: Optional[Tensor], beta1: float,
                           beta2: float, eps: float, weight_decay: float, backend: str) -> None:
        adamw_step.masked_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, step_counters,
                                      lr=lr_tensor if lr_tensor is not None else lr, betas=(beta1, beta2), eps=eps,
                                      weight_decay=weight_decay, backend=backend)

    @masked_adamw_step_.register_fake
    def _(params, grads, exp_avgs, exp_avg_sqs, step_counters, lr, lr_tensor, beta1, beta2, eps, weight_decay,
          backend):
        _check("masked_adamw_step_", {"params": params, "grads": grads, "exp_avgs": exp_avgs,
                                      "exp_avg_sqs": exp_avg_sqs})
        torch._check(len(step_counters) == len(params), lambda: "masked_adamw_step_: one step counter per tensor")
        for c in step_counters:
            torch._check(c.numel() == 1, lambda: "masked_adamw_step_: step counters hold one value each")


if not hasattr(torch.ops.freezeguard, "segment_dot"):  # a module reload must not define them twice
    for _spec in PUBLIC:
        _register(_spec)
    _register_adamw_step()

__all__: list[str] = []
