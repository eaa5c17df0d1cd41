"""The fused ops: one entry per declared op, validating input once and dispatching.

Each op works on a whole *list* of tensors (one model) in one pass over memory; compiled
backends cover the list in one or a few kernel launches. All math is in fp32; tensors may
be fp32, bf16 or fp16 (each tensor's companions share its dtype). Per-tensor scalars
(``dm``, ``m``) are fp32 tensors of length S on the tensors' device. Every op takes
``backend="auto" | "torch" | "cpp" | "triton" | "cuda"``.

The ops are declared once, in ``freezeguard.backends.opspecs``; their entries here
(``entries.make_entry``), their ``torch.library`` twins (``library.py``) and the backends'
kernel checks all come from those declarations. ``masked_adamw_step_`` and its prepared fast
path (``adamw_step.py``) are the optimizer's composite of the declared AdamW kernels.

Example:
    >>> import torch, freezeguard as fg
    >>> a = [torch.ones(3), torch.ones(2)]
    >>> fg.ops.segment_dot(a, a, backend="torch")
    tensor([3., 2.])
    >>> fg.ops.mask_shift_(a, a, [0.5, 1.0])
    >>> a[0], a[1]
    (tensor([1.5000, 1.5000, 1.5000]), tensor([2., 2.]))
    >>> th, de, g = [torch.ones(3)], [torch.ones(3)], [torch.ones(3)]
    >>> fg.ops.user_adamw_(th, de, g, [torch.zeros(3)], [torch.zeros(3)], [0.5], 1, lr=0.1)
    >>> [round(v, 4) for v in th[0].tolist()], [round(v, 4) for v in de[0].tolist()]
    ([0.95, 0.95, 0.95], [1.1, 1.1, 1.1])
    >>> p, buf = [torch.ones(2)], [torch.zeros(2)]
    >>> fg.ops.masked_sgd_momentum_(p, [torch.ones(2)], buf, lr=0.1)
    >>> p[0], buf[0]
    (tensor([0.9000, 0.9000]), tensor([1., 1.]))
"""
from __future__ import annotations

import torch

from freezeguard.backends import resolve
from freezeguard.backends.opspecs import PUBLIC
from freezeguard.ops import library as _library  # noqa: F401  (registers the torch.library ops)
from freezeguard.ops.adamw_step import PreparedAdamW, masked_adamw_step_, try_masked_adamw_step_
from freezeguard.ops.entries import make_entry
from freezeguard.ops.validation import SUPPORTED_DTYPES


def check_backend(backend: str, device: torch.device) -> None:
    """Raise ``BackendUnavailable`` (saying why) when ``backend`` cannot run the ops on ``device``."""
    resolve(backend, torch.device(device))


# One entry per declared public op: masked_adamw_, segment_dot, mask_shift_, user_update_,
# user_adamw_, masked_sgd_momentum_ (see freezeguard.backends.opspecs).
globals().update({spec.name: make_entry(spec) for spec in PUBLIC})

__all__ = ["check_backend", "masked_adamw_step_", "PreparedAdamW", "try_masked_adamw_step_", "SUPPORTED_DTYPES",
           *(spec.name for spec in PUBLIC)]
