"""Launch settings and small host helpers shared by the kernel launchers.

``CONFIGS`` holds (BLOCK, num_warps) per op. They are starting points inside the usual range for
memory-bound elementwise kernels on Hopper (BLOCK 1024-4096, 4-8 warps), not measured optima:
``benchmarks/tune_triton.py`` sweeps them on a GPU. ``FREEZEGUARD_TRITON_CONFIG`` overrides them for
experiments, e.g. ``masked_adamw_=4096x8,segment_dot=2048x4``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch
import triton.language as tl

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
