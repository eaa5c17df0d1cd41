"""Launch settings and the host side shared by the kernel launchers.

Every op launches the same way: the tensor list's chunk layout and pointer table
(``freezeguard.kernels.tables``), then one launch per dtype group over that group's chunks, with
the op's (BLOCK, num_warps). :func:`launch_chunked` does all of it; an op that needs the layout
first (``segment_dot`` sizes its partial sums by it) uses :func:`chunk_tables` and
:func:`launch_groups`. A launcher is then its kernel, its scalar arguments and one call.

``CONFIGS`` holds (BLOCK, num_warps) per op. They are starting points inside the usual range for
memory-bound elementwise kernels on Hopper (BLOCK 1024-4096, 4-8 warps), not measured optima:
``benchmarks/tune_triton.py`` sweeps them on a GPU. ``FREEZEGUARD_TRITON_CONFIG`` overrides them for
experiments, e.g. ``masked_adamw_=4096x8,segment_dot=2048x4``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Sequence

import torch
import triton.language as tl

from freezeguard.kernels import tables

CONFIGS: dict[str, tuple[int, int]] = {
    "masked_adamw_": (2048, 8),
    "segment_dot": (2048, 8),
    "mask_shift_": (2048, 8),
    "user_update_": (2048, 8),
}
REDUCE_BLOCK = 1024  # partial sums folded per iteration when segment_dot reduces a tensor's chunks


def _apply_env_overrides() -> None:
    spec = os.environ.get("FREEZEGUARD_TRITON_CONFIG", "").strip()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            op, cfg = item.split("=")
            block, warps = (int(x) for x in cfg.lower().split("x"))
        except ValueError:
            raise ValueError(f"FREEZEGUARD_TRITON_CONFIG: cannot parse {item!r}; expected op=BLOCKxWARPS") from None
        if op not in CONFIGS:
            raise ValueError(f"FREEZEGUARD_TRITON_CONFIG: unknown op {op!r}; known: {', '.join(CONFIGS)}")
        if block & (block - 1) or block < 16:
            raise ValueError(f"FREEZEGUARD_TRITON_CONFIG: BLOCK must be a power of two >= 16, got {block}")
        CONFIGS[op] = (block, warps)


_apply_env_overrides()


def _interpret_setting() -> bool:
    """Whether triton.jit makes interpreted kernels now (triton's own knob, else its variable)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older triton: no knobs module
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Read when the kernels are decorated (this module is imported first by every kernel module), so
# it says how *these* kernels run, whatever the environment says later.
INTERPRETED = _interpret_setting()

_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def triton_dtype(dtype: torch.dtype):
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise TypeError(f"triton backend: unsupported dtype {dtype}; supported: fp32, bf16, fp16") from None


def per_tensor_scalars(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """A small fp32 table for this call, on ``device`` without a host sync."""
    if device.type == "cuda":
        host = torch.tensor(values, dtype=torch.float32, pin_memory=True)
        # The caching host allocator keeps the pinned block alive until the copy has run.
        return host.to(device, non_blocking=True)
    return torch.tensor(values, dtype=torch.float32)


def on_device(device: torch.device):
    """Triton launches on the current CUDA device; make it the tensors' device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


Roles = Sequence[Sequence[torch.Tensor]]


def chunk_tables(op: str, roles: Roles, block: int | None = None) -> tuple[tables.Layout, tables.Pointers]:
    """The (cached) chunk layout of ``roles[0]`` in blocks of ``block`` (default: the op's BLOCK)
    and the pointer table of every role."""
    lay = tables.layout(roles[0], block or CONFIGS[op][0])
    return lay, tables.pointers(roles, lay)


def launch_groups(kernel, op: str, lay: tables.Layout, ptr: tables.Pointers, *args: Any, num_warps: int | None = None,
                  per_group: Callable[[tables.Group], tuple] | None = None, **constexprs: Any) -> None:
    """``kernel`` once per non-empty dtype group, on the current device, as
    ``kernel[(chunks,)](pointers, S, chunk_tid, chunk_local, numels, *per_group(group), *args,
    DTYPE=, BLOCK=, ALIGNED=, num_warps=, **constexprs)``."""
    warps = num_warps or CONFIGS[op][1]
    for g, aligned in zip(lay.groups, ptr.aligned, strict=True):
        if g.num_chunks == 0:
            continue
        kernel[(g.num_chunks,)](ptr.table, lay.num_tensors, g.chunk_tid, g.chunk_local, lay.numels,
                                *(per_group(g) if per_group is not None else ()), *args,
                                DTYPE=triton_dtype(g.dtype), BLOCK=lay.block, ALIGNED=aligned, num_warps=warps,
                                **constexprs)


def launch_chunked(kernel, op: str, roles: Roles, *args: Any, block: int | None = None, num_warps: int | None = None,
                   **constexprs: Any) -> None:
    """:func:`chunk_tables` then :func:`launch_groups` on the tensors' device: a whole op's launch."""
    lay, ptr = chunk_tables(op, roles, block)
    with on_device(roles[0][0].device):
        launch_groups(kernel, op, lay, ptr, *args, num_warps=num_warps, **constexprs)
