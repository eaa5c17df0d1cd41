"""Host time of one optimizer step where only the host work counts (issue 12's CPU target).

A real ``torch.nn.Module`` holding the SD-1.5 UNet's 686 tensors, each shrunk to 16 elements so
the math is negligible and what is timed is the per-step host work: looking up state, checking
every tensor, step counters, dispatch. Every step gets *fresh* gradient tensors, as training does
with ``zero_grad(set_to_none=True)`` (set up outside the timed region by pytest-benchmark's
``setup``), so nothing may key on the gradients' identity.

Implementations, one group, measured back to back in one run:
- ``torch.optim.AdamW(fused=True)`` (the anchor) and ``(foreach=True)``;
- ``fg.optim.AdamW`` (auto backend: cpp) and ``fg.guard`` (the same optimizer with a mask);
- ``fg.optim.AdamW(capturable=True)`` with a tensor lr (the device-side path, on the CPU);
- ``fg.wrap`` around ``torch.optim.AdamW(fused=True)`` (the enforcement hooks' cost on top).

Run: ``pytest benchmarks/bench_optimizer_step.py --fg-threads 1 --fg-rounds 300 --benchmark-json=step.json``
then ``python benchmarks/report.py step.json``.
"""
from __future__ import annotations

import _shapes
import pytest
import torch

import freezeguard as fg

LR = 1e-4
ELEMS = 16


class TinyUNet(torch.nn.Module):
    """686 parameters named p0..p685, 16 elements each (the SD-1.5 UNet's tensor count)."""

    def __init__(self, n: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        for i in range(n):
            self.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(ELEMS, generator=gen)))


def _fresh_grads(model: torch.nn.Module, frozen: set[str]):
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(ELEMS, generator=gen) for _ in range(8)]

    def setup():
        # New gradient tensors every step (set_to_none=True, then backward allocates them).
        for k, (name, p) in enumerate(model.named_parameters()):
            p.grad = None if name in frozen else grads[k % 8].clone()

    return setup


IMPLS = ["torch_fused", "torch_foreach", "fg_adamw", "fg_guard_20pct", "fg_capturable", "fg_wrap_torch_fused_20pct"]


@pytest.mark.parametrize("impl", IMPLS)
def test_optimizer_step_host_time(run_bench, benchmark, impl):
    n = len(_shapes.unet_shapes("scaled"))
    benchmark.group = f"optimizer step host time cpu ({n} x {ELEMS} elements, fresh grads)"
    model = TinyUNet(n)
    names = [name for name, _ in model.named_parameters()]
    frozen: set[str] = set()
    nbytes = 7 * n * ELEMS * 4
    if impl.startswith("torch_"):
        kind = impl.removeprefix("torch_")
        opt = torch.optim.AdamW(model.parameters(), lr=LR, **{kind: True})
        label, role = f"torch.optim.AdamW({kind}=True)", "anchor" if kind == "fused" else "reference"
    elif impl == "fg_adamw":
        opt = fg.optim.AdamW(model.named_parameters(), lr=LR)
        label, role = "fg.optim.AdamW", "candidate"
    elif impl == "fg_capturable":
        opt = fg.optim.AdamW(model.named_parameters(), lr=torch.tensor(LR), capturable=True)
        label, role = "fg.optim.AdamW(capturable=True, lr tensor)", "candidate"
    else:
        frozen = set(names[::5])  # every fifth tensor: 20% by tensors
        mask = fg.FreezeMask.from_names(model, sorted(frozen))
        if impl == "fg_guard_20pct":
            opt = fg.guard(model, mask, lr=LR)
            label = "fg.guard (20% frozen)"
        else:
            opt = fg.wrap(torch.optim.AdamW(model.parameters(), lr=LR, fused=True), mask, model)
            label = "fg.wrap(torch fused) (20% frozen)"
        role = "candidate"
    setup = _fresh_grads(model, frozen)
    setup()
    opt.step()  # state exists before timing, as in any step after the first
    run_bench(opt.step, impl=label, role=role, nbytes=nbytes, setup=setup)
    for name, p in model.named_parameters():
        if name in frozen:
            assert name not in {n for n, q in model.named_parameters() if q in opt.state}
