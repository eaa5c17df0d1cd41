"""Compile every kernel for a GPU target without a GPU, and report how it accesses memory.

It drives the real launchers (``adamw.masked_adamw_``, ``mask_updates.*``) on small CPU tensors with
a stand-in Triton driver that reports a CUDA target, and turns each launch into a *warmup*
(compile, do not run). So the exact launch arguments go through Triton's argument binding and
specialization, and the kernels through the whole compiler down to a cubin (Triton bundles
ptxas). CI without a GPU thereby catches kernels that only work interpreted, and sees whether
full chunks use 128-bit accesses (``ld.global.v4``), which the bandwidth targets depend on.

It replaces Triton's active driver, so run it in its own process, without ``TRITON_INTERPRET``:
    python tests/support/triton_compile_check.py [--arch 90] [--dtypes fp32,bf16,fp16] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _CompileOnlyDriver:
    """Just enough of a Triton driver to compile for ``arch`` on a machine without a GPU."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


def _registers(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, stack bytes) from the bundled cuobjdump, when it is there."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else None, int(stack.group(1)) if stack else None)


def _widest(ptx: str, kind: str) -> int:
    """Widest global access of ``kind`` ("ld" or "st") in bits, e.g. 128 for ld.global.v4.b32."""
    best = 0
    for m in re.finditer(rf"\b{kind}\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.b(\d+)", ptx):
        best = max(best, int(m.group(1) or 1) * int(m.group(2)))
    return best


def check(arch: int = 90, dtypes: list[str] | None = None) -> list[dict]:
    """One row per compiled kernel: name, widest global load/store in bits, registers, stack bytes."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(_CompileOnlyDriver(arch))
    from freezeguard.kernels import adamw, mask_updates

    compiled: list[tuple[str, object]] = []
    kernels = {"masked_adamw_": adamw._masked_adamw_kernel, "segment_dot": mask_updates._dot_partials_kernel,
               "segment_dot[reduce]": mask_updates._dot_reduce_kernel, "mask_shift_": mask_updates._mask_shift_kernel,
               "user_update_": mask_updates._user_update_kernel}
    current = {"dtype": ""}
    for name, k in kernels.items():
        if not isinstance(k, JITFunction):
            raise RuntimeError("compile_check: kernels are interpreted; unset TRITON_INTERPRET")

        def warmup(*args, grid, warmup, _k=k, _name=name, **kwargs):
            label = _name if _name.endswith("]") else f"{_name}[{current['dtype']}]"
            compiled.append((label, JITFunction.run(_k, *args, grid=grid, warmup=True, **kwargs)))

        k.run = warmup  # instance attribute: kernel[grid](...) now compiles instead of launching

    # A full chunk and a tail (both code paths), and an empty tensor.
    shapes = [(5000,), (0,), (7,)]
    for name in dtypes or list(_DTYPES):
        current["dtype"] = name
        ts = [[torch.zeros(s, dtype=_DTYPES[name]) for s in shapes] for _ in range(4)]
        scalars = torch.zeros(len(shapes))
        adamw.masked_adamw_(*ts, [1.0] * len(shapes), lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
        mask_updates.segment_dot(ts[0], ts[1])
        mask_updates.mask_shift_(ts[0], ts[1], scalars)
        mask_updates.user_update_(ts[0], ts[1], ts[2], scalars, 1e-3)

    rows, seen = [], set()
    for label, kernel in compiled:
        if label in seen:
            continue
        seen.add(label)
        ptx = kernel.asm["ptx"]
        regs, stack = _registers(kernel.asm["cubin"])
        rows.append({"kernel": label, "load_bits": _widest(ptx, "ld"), "store_bits": _widest(ptx, "st"),
                     "registers": regs, "stack_bytes": stack, "num_warps": kernel.metadata.num_warps})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--json", action="store_true", help="print rows as JSON")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    rows = check(args.arch, args.dtypes.split(","))
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'kernel':24s} {'load bits':>9s} {'store bits':>10s} {'regs':>5s} {'stack':>5s} {'warps':>5s}")
    for r in rows:
        print(f"{r['kernel']:24s} {r['load_bits']:9d} {r['store_bits']:10d} {str(r['registers']):>5s} "
              f"{str(r['stack_bytes']):>5s} {r['num_warps']:5d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
