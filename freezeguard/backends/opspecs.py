"""The declaration of every fused op: its arguments, which tensor lists it writes, what it returns.

One ``OpSpec`` per op is the single statement of its interface. From it come
- the eager entry ``fg.ops.<name>`` and its input checks (``freezeguard.ops.entries``),
- the ``torch.library`` op ``torch.ops.freezeguard.<name>``, its schema and its fake
  (``freezeguard.ops.library``),
- the check that a backend's kernel for it takes the declared arguments (``BackendRecord``,
  ``freezeguard.backends.record``).
The math is stated once more, in the op's reference (``reference.py``, the spec every backend is
tested against). Adding an op is its declaration here, its reference, and its kernels.

Kernels are called as ``kernel(*per_tensor_args, **scalars)``: the tensor lists and the
per-tensor values in declaration order, then the scalars by keyword (``betas`` as ``beta1``,
``beta2``). Kernels receive validated, contiguous tensors and never see the ``backend`` argument.

Example:
    >>> from freezeguard.backends.opspecs import SPECS
    >>> spec = SPECS["mask_shift_"]
    >>> [a.name for a in spec.lists], spec.mutated
    (['theta', 'delta'], ('theta',))
    >>> spec.library_schema()
    '(Tensor(a0!)[] theta, Tensor[] delta, Tensor dm, str backend) -> ()'
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

_REQUIRED = inspect.Parameter.empty

# Argument kinds. The first four are handed to kernels positionally, one value per tensor.
TENSORS = "tensors"          # a list of tensors (one model's worth), all of one length
PER_TENSOR = "per_tensor"    # fp32 tensor [S] (a sequence of floats is accepted): one value per tensor
COUNTS = "counts"            # host floats, one per tensor, each >= minimum (AdamW step counts)
DEVICE_COUNTS = "device_counts"  # float tensor [S] on the tensors' device (kernel-only ops)
FLOAT = "float"
INT = "int"
BOOL = "bool"
BETAS = "betas"              # (beta1, beta2): one argument for users, two floats for kernels
FLOAT_OR_TENSOR = "float_or_tensor"  # a float or a one-element tensor on the device (kernel-only ops)
_PER_TENSOR_KINDS = (TENSORS, PER_TENSOR, COUNTS, DEVICE_COUNTS)
_SCHEMA_TYPE = {PER_TENSOR: "Tensor", COUNTS: "float[]", FLOAT: "float", INT: "int", BOOL: "bool"}


@dataclass(frozen=True)
class Arg:
    """One argument of an op."""

    name: str
    kind: str
    mutated: bool = False            # TENSORS only: the op writes these tensors
    default: Any = _REQUIRED
    keyword_only: bool = False
    minimum: float | None = None     # INT, COUNTS: the smallest value accepted
    doc: str = ""

    def kernel_names(self) -> tuple[str, ...]:
        return ("beta1", "beta2") if self.kind == BETAS else (self.name,)


def tensors(name: str, *, mutated: bool = False) -> Arg:
    return Arg(name, TENSORS, mutated=mutated)


def per_tensor(name: str) -> Arg:
    return Arg(name, PER_TENSOR)


def scalar(name: str, kind: str = FLOAT, default: Any = _REQUIRED, *, keyword_only: bool = True,
           minimum: float | None = None) -> Arg:
    return Arg(name, kind, default=default, keyword_only=keyword_only, minimum=minimum)


ADAMW_SCALARS = (scalar("lr"), Arg("betas", BETAS, default=(0.9, 0.999), keyword_only=True),
                 scalar("eps", default=1e-8))


@dataclass(frozen=True)
class OpSpec:
    """An op's interface. ``public`` ops get an ``fg.ops`` entry and a ``torch.library`` op;
    the others are kernel variants an entry reaches (``masked_adamw_capturable_``)."""

    name: str
    doc: str
    args: tuple[Arg, ...]
    returns_per_tensor: bool = False   # True: returns an fp32 tensor [S]; False: returns None
    public: bool = True

    def __post_init__(self) -> None:
        names = [a.name for a in self.args]
        if len(set(names)) != len(names) or "backend" in names:
            raise ValueError(f"{self.name}: argument names must be unique and not 'backend': {names}")
        if not self.args or self.args[0].kind != TENSORS:
            raise ValueError(f"{self.name}: the first argument must be a tensor list (it anchors device and shapes)")
        if any(a.mutated and a.kind != TENSORS for a in self.args):
            raise ValueError(f"{self.name}: only tensor lists can be mutated")

    # Derived once per declaration (the eager entries read them on every call).
    @cached_property
    def lists(self) -> tuple[Arg, ...]:
        return tuple(a for a in self.args if a.kind == TENSORS)

    @cached_property
    def values_args(self) -> tuple[Arg, ...]:
        """Every argument but the tensor lists."""
        return tuple(a for a in self.args if a.kind != TENSORS)

    @cached_property
    def mutated(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args if a.mutated)

    @cached_property
    def positional(self) -> tuple[Arg, ...]:
        """What a kernel takes positionally: the lists and the per-tensor values, in order."""
        return tuple(a for a in self.args if a.kind in _PER_TENSOR_KINDS)

    @cached_property
    def scalars(self) -> tuple[Arg, ...]:
        return tuple(a for a in self.args if a.kind not in _PER_TENSOR_KINDS)

    def kernel_keywords(self) -> list[str]:
        return [n for a in self.scalars for n in a.kernel_names()]

    def why_kernel_does_not_fit(self, kernel: Callable) -> str | None:
        """Why ``kernel`` cannot be called as this op's kernel, or None when it can."""
        if not callable(kernel):
            return f"{kernel!r} is not callable"
        try:
            sig = inspect.signature(kernel)
        except (TypeError, ValueError):
            return None  # a builtin without a signature: trusted, as a compiled function would be
        try:
            sig.bind(*(object() for _ in self.positional), **{k: object() for k in self.kernel_keywords()})
        except TypeError as exc:
            want = ", ".join([a.name for a in self.positional] + ["*"] + self.kernel_keywords())
            return f"its signature {sig} does not take ({want}): {exc}"
        return None

    def library_schema(self) -> str:
        """The ``torch.library`` schema: lists, per-tensor values, scalars (betas as two floats), backend."""
        if not self.public:
            raise ValueError(f"{self.name} is a kernel-only variant: it has no torch.library op")
        parts, alias = [], 0
        for a in self.args:
            if a.kind == TENSORS:
                if a.mutated:
                    parts.append(f"Tensor(a{alias}!)[] {a.name}")
                    alias += 1
                else:
                    parts.append(f"Tensor[] {a.name}")
            elif a.kind == BETAS:
                parts += ["float beta1", "float beta2"]
            else:
                parts.append(f"{_SCHEMA_TYPE[a.kind]} {a.name}")
        parts.append("str backend")
        return f"({', '.join(parts)}) -> {'Tensor' if self.returns_per_tensor else '()'}"

    def python_signature(self) -> inspect.Signature:
        """The eager entry's signature: the declared arguments, then keyword-only ``backend="auto"``."""
        params = []
        for a in self.args:
            kind = inspect.Parameter.KEYWORD_ONLY if a.keyword_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
            params.append(inspect.Parameter(a.name, kind, default=a.default))
        params.append(inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto", annotation=str))
        return inspect.Signature(params, return_annotation="torch.Tensor" if self.returns_per_tensor else None)


_ADAMW_LISTS = (tensors("params", mutated=True), tensors("grads"), tensors("exp_avgs", mutated=True),
                tensors("exp_avg_sqs", mutated=True))

DECLARED: tuple[OpSpec, ...] = (
    OpSpec("masked_adamw_", """One AdamW update, in place, of every listed (trainable) tensor.

    Frozen tensors are simply not listed: the op never touches them. ``steps[i]`` is tensor i's
    step count including this update (>= 1). Non-finite gradients propagate into the parameters
    exactly as in ``torch.optim.AdamW`` (skipping is the grad scaler's job).""",
           (*_ADAMW_LISTS, Arg("steps", COUNTS, minimum=1), *ADAMW_SCALARS,
            scalar("weight_decay", default=1e-2))),
    OpSpec("masked_adamw_capturable_", """:func:`masked_adamw_` with ``steps`` (a float tensor [S]) and ``lr``
    (a float or a one-element tensor) read where the math runs, never on the host (CUDA graphs).""",
           (*_ADAMW_LISTS, Arg("steps", DEVICE_COUNTS), Arg("lr", FLOAT_OR_TENSOR, keyword_only=True),
            scalar("beta1"), scalar("beta2"), scalar("eps"), scalar("weight_decay")), public=False),
    OpSpec("segment_dot", "fp32 tensor [S]: the dot product <a_i, b_i> of each pair, accumulated in fp32.",
           (tensors("a"), tensors("b")), returns_per_tensor=True),
    OpSpec("mask_shift_", "theta_i += delta_i * dm[i] for every tensor i, in place.",
           (tensors("theta", mutated=True), tensors("delta"), per_tensor("dm"))),
    OpSpec("user_update_", "The simulated user's step: u = -lr (1-m_i) g_i; theta_i += (1-m_i) u; delta_i -= u.",
           (tensors("theta", mutated=True), tensors("delta", mutated=True), tensors("grad"), per_tensor("m"),
            scalar("lr", keyword_only=False))),
    OpSpec("user_adamw_", """The AdamW simulated user's step (the learner's stronger attacker), in place.

    torch.optim.AdamW on theta_ft = theta - m_i Delta with gradient (1 - m_i) g, landed on the
    live weights: theta += (1 - m_i) u, Delta -= u (see ``reference.user_adamw_`` for the math).
    ``step`` counts user steps including this one (>= 1; m is constant between releaser steps,
    so one count serves every tensor). ``grads`` may be used as scratch: their values after the
    call are unspecified.""",
           (tensors("theta", mutated=True), tensors("delta", mutated=True), tensors("grads", mutated=True),
            tensors("exp_avgs", mutated=True), tensors("exp_avg_sqs", mutated=True), per_tensor("m"),
            scalar("step", INT, keyword_only=False, minimum=1), *ADAMW_SCALARS,
            scalar("weight_decay", default=0.0))),
    OpSpec("masked_sgd_momentum_", """SGD with momentum, in place, of every listed (trainable) tensor.

    ``torch.optim.SGD`` semantics with buffers that start at zero: g' = g + weight_decay * p;
    buf = momentum * buf + (1 - dampening) * g'; p -= lr * (g' + momentum * buf if nesterov else buf).
    With ``dampening=0`` this is torch's update from the first step on (torch copies the first
    gradient into a new buffer, which a zero buffer gives too).""",
           (tensors("params", mutated=True), tensors("grads"), tensors("momentum_buffers", mutated=True),
            scalar("lr"), scalar("momentum", default=0.9), scalar("dampening", default=0.0),
            scalar("weight_decay", default=0.0), scalar("nesterov", BOOL, default=False))),
)

SPECS: dict[str, OpSpec] = {s.name: s for s in DECLARED}
PUBLIC: tuple[OpSpec, ...] = tuple(s for s in DECLARED if s.public)

__all__ = ["Arg", "OpSpec", "DECLARED", "SPECS", "PUBLIC", "TENSORS", "PER_TENSOR", "COUNTS", "DEVICE_COUNTS",
           "FLOAT", "INT", "BOOL", "BETAS", "FLOAT_OR_TENSOR"]
