"""The eager entry of each declared op (``fg.ops.<name>``), made from its declaration.

``make_entry(spec)`` returns a function with the declared signature plus ``backend="auto"``
that checks every input (``validation.py``), resolves the backend, hands the kernel contiguous
tensors and writes results back into strided outputs. While ``torch.compile`` traces it calls
the op's ``torch.library`` twin instead (``library.py``), an opaque node with a fake.

The eager path does not go through the dispatcher: that would convert every tensor list to and
fro on each call, a real cost on a 686-tensor model.

Example:
    >>> import torch
    >>> from freezeguard.backends.opspecs import SPECS
    >>> from freezeguard.ops.entries import make_entry
    >>> segment_dot = make_entry(SPECS["segment_dot"])
    >>> segment_dot([torch.ones(3), torch.ones(2)], [torch.ones(3), torch.ones(2)], backend="torch")
    tensor([3., 2.])
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from freezeguard.backends import resolve
from freezeguard.backends.opspecs import BETAS, COUNTS, FLOAT, INT, PER_TENSOR, TENSORS, OpSpec
from freezeguard.ops.validation import Contiguous, device_of, per_tensor_scalars, validate


def _integer(op: str, name: str, value: Any, minimum: float | None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value \
            or (minimum is not None and value < minimum):
        at_least = f" >= {minimum:g}" if minimum is not None else ""
        raise ValueError(f"{op}: {name} must be an integer{at_least}, got {value!r}")
    return int(value)


def _counts(op: str, name: str, value: Any, n: int, minimum: float | None) -> list[float]:
    counts = [float(s) for s in (value.tolist() if isinstance(value, torch.Tensor) else value)]
    if len(counts) != n:
        raise ValueError(f"{op}: {name} has {len(counts)} entries for {n} tensors")
    if minimum is not None and not all(c >= minimum for c in counts):  # also NaN
        raise ValueError(f"{op}: {name} must be >= {minimum:g} (they include the current update)")
    return counts


def _scalar(kind: str, value: Any) -> Any:
    return float(value) if kind == FLOAT else bool(value)


def run(spec: OpSpec, values: dict[str, Any], backend: str) -> torch.Tensor | None:
    """Check ``values`` (the declared arguments by name), pick the backend, run its kernel."""
    op = spec.name
    lists = {a.name: values[a.name] for a in spec.lists}
    n, contiguous = validate(op, lists)
    device = device_of(*lists.values())
    converted: dict[str, Any] = {}
    keywords: dict[str, Any] = {}
    for a in spec.values_args:
        kind = a.kind
        v = values[a.name]
        if kind == PER_TENSOR:
            converted[a.name] = per_tensor_scalars(op, a.name, v, n, device)
        elif kind == COUNTS:
            converted[a.name] = _counts(op, a.name, v, n, a.minimum)
        elif kind == INT:
            keywords[a.name] = _integer(op, a.name, v, a.minimum)
        elif kind == BETAS:
            keywords["beta1"], keywords["beta2"] = (float(b) for b in v)
        else:
            keywords[a.name] = _scalar(kind, v)
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=device) if spec.returns_per_tensor else None
    be = resolve(backend, device, op=op, tensors=lists[spec.lists[0].name])
    if contiguous:  # the common case, known from validate: the lists go to the kernel as they are
        compact, written = lists, None
    else:
        written = Contiguous({a.name: lists[a.name] for a in spec.lists if not a.mutated},
                             {a.name: lists[a.name] for a in spec.lists if a.mutated})
        compact = written.lists
    converted.update(compact)
    kernel, args = be.kernels[op], [converted[a.name] for a in spec.positional]
    if torch.is_grad_enabled():  # kernels write leaf tensors in place (parameters)
        with torch.no_grad():
            out = kernel(*args, **keywords)
    else:
        out = kernel(*args, **keywords)
    if written is not None:
        written.write_back()
    return out if spec.returns_per_tensor else None


def library_args(spec: OpSpec, values: dict[str, Any]) -> list[Any]:
    """``values`` in the order and types of the op's ``torch.library`` schema (without backend)."""
    args: list[Any] = []
    for a in spec.args:
        v = values[a.name]
        if a.kind == TENSORS:
            args.append(list(v))
        elif a.kind == PER_TENSOR:
            args.append(torch.as_tensor(v, dtype=torch.float32))
        elif a.kind == COUNTS:
            args.append([float(s) for s in v])
        elif a.kind == BETAS:
            args += [float(b) for b in v]
        elif a.kind == INT:
            args.append(int(v))
        else:
            args.append(_scalar(a.kind, v))
    return args


def values_from_library_args(spec: OpSpec, args: tuple[Any, ...]) -> tuple[dict[str, Any], str]:
    """The inverse of :func:`library_args`: (declared values by name, backend)."""
    values, i = {}, 0
    for a in spec.args:
        if a.kind == BETAS:
            values[a.name] = (args[i], args[i + 1])
            i += 2
        else:
            values[a.name] = args[i]
            i += 1
    return values, args[i]


def make_entry(spec: OpSpec) -> Callable[..., Any]:
    """``fg.ops.<spec.name>``: the declared signature, then keyword-only ``backend="auto"``."""
    positional = [a.name for a in spec.args if not a.keyword_only]
    declared = {a.name: a for a in spec.args}
    # Plain dict work, not inspect.Signature.bind: cheaper, and torch.compile traces it.

    def entry(*args: Any, backend: str = "auto", **kwargs: Any) -> Any:
        if len(args) > len(positional):
            raise TypeError(f"{spec.name}() takes {len(positional)} positional arguments but {len(args)} were given")
        values = dict(zip(positional, args, strict=False))  # fewer positional than declared is fine
        for k, v in kwargs.items():
            if k not in declared:
                raise TypeError(f"{spec.name}() got an unexpected keyword argument {k!r}")
            if k in values:
                raise TypeError(f"{spec.name}() got multiple values for argument {k!r}")
            values[k] = v
        for name, a in declared.items():
            if name not in values:
                if a.default is inspect.Parameter.empty:
                    raise TypeError(f"{spec.name}() missing required argument {name!r}")
                values[name] = a.default
        if torch.compiler.is_compiling():
            return getattr(torch.ops.freezeguard, spec.name)(*library_args(spec, values), backend)
        return run(spec, values, backend)

    entry.__name__ = entry.__qualname__ = spec.name
    entry.__doc__ = spec.doc
    entry.__signature__ = spec.python_signature()  # type: ignore[attr-defined]
    entry.__module__ = "freezeguard.ops"
    entry.spec = spec  # type: ignore[attr-defined]
    return entry


__all__ = ["library_args", "make_entry", "run", "values_from_library_args"]
