"""Fused ops against what a user would otherwise run, on the SD-1.5 UNet's 686 tensors.

- masked_adamw_: the freezeguard backend vs torch.optim.AdamW(fused=True) and
  (foreach=True) stepping the same trainable tensors, frozen 0/20/50/80% by tensors and
  by params (frozen tensors are simply not given to any of them).
- user_update_ and the releaser update (segment_dot + logit update + mask_shift_) vs the
  per-tensor Python loops of the authors' implementation (pittisl/FreezeAsGuard,
  src/mask_learner.py), as written there: ``support.authors_loop``.
CPU: the channel-scaled UNet list (fp32), backend cpp. CUDA (when visible): the full-size
list, backends triton and cuda. Run and summarise: see conftest.py.
"""
from __future__ import annotations

import gc

import _shapes
import pytest
import torch
from support import authors_loop

import freezeguard as fg
from freezeguard.backends import get_backend, status

LR = 1e-4
T, RHO, C_SPARSITY, MASK_LR, USER_LR = 0.2, 0.2, 5e3, 10.0, 1e-5  # the authors' defaults
RELEASER_HP = dict(T=T, freeze_ratio=RHO, c_sparsity=C_SPARSITY, mask_lr=MASK_LR)
PLACES = {"cpu": ("scaled", ("cpp",)), "cuda": ("full", ("triton", "cuda"))}
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]

_cache: dict = {}


def _model(device: str):
    """Parameters (with .grad) for the whole UNet list, built once per device."""
    if device not in _cache:
        _cache.clear()  # one device's tensors at a time (the diffs go too)
        gc.collect()
        gen = torch.Generator(device=device).manual_seed(0)
        shapes = _shapes.unet_shapes(PLACES[device][0])
        params = []
        for _, shape in shapes:
            p = torch.nn.Parameter(torch.randn(shape, device=device, generator=gen) * 0.02)
            p.grad = torch.randn(shape, device=device, generator=gen) * 1e-3
            params.append(p)
        _cache[device] = (shapes, params)
    return _cache[device]


def _skip_unless_runs(backend: str, device: str) -> None:
    st = status(backend)
    if not st.available:
        pytest.skip(f"{backend}: {st.reason}")
    ok, why = get_backend(backend).supports(torch.device(device))
    if not ok:
        pytest.skip(f"{backend}: {why}")


def _impls(device: str, anchors: tuple[str, ...]) -> list:
    return [pytest.param(device, impl, id=f"{device}-{impl}",
                         marks=[pytest.mark.gpu] if device == "cuda" else [])
            for impl in PLACES[device][1] + anchors]


ADAMW_IMPLS = _impls("cpu", ("torch_fused", "torch_foreach")) + _impls("cuda", ("torch_fused", "torch_foreach"))
CASES = [pytest.param(by, r, id=f"{by}-{round(r * 100)}") for by, r in _shapes.frozen_cases()]


# impl varies fastest: the implementations of one group run back to back, so the ratios
# compare measurements taken minutes apart at most on a machine whose load drifts.
@pytest.mark.parametrize("device,impl", ADAMW_IMPLS)
@pytest.mark.parametrize("by,ratio", CASES)
def test_masked_adamw(run_bench, benchmark, device, impl, by, ratio):
    shapes, params = _model(device)
    idx = _shapes.frozen_split(shapes, ratio, by)
    trainable = [params[i] for i in idx]
    benchmark.group = f"masked_adamw {device} frozen {round(ratio * 100)}% by {by}"
    benchmark.extra_info.update(trainable_tensors=len(idx), trainable_params=sum(p.numel() for p in trainable))
    nbytes = 7 * sum(p.numel() * p.element_size() for p in trainable)  # read p,g,m,v; write p,m,v
    if impl.startswith("torch_"):
        kind = impl.removeprefix("torch_")
        opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=1e-2, **{kind: True})
        try:
            run_bench(opt.step, impl=f"torch.optim.AdamW({kind}=True)", role="anchor", nbytes=nbytes, device=device)
        finally:
            del opt
            gc.collect()
        return
    _skip_unless_runs(impl, device)
    p = [t.detach() for t in trainable]
    g = [t.grad for t in trainable]
    # Fresh state for the trainable tensors only, as torch.optim.AdamW (and fg.optim.AdamW)
    # allocate it: same memory placement as the anchors.
    m = [torch.zeros_like(t) for t in p]
    v = [torch.zeros_like(t) for t in p]
    steps = [10.0] * len(idx)

    def step():
        fg.ops.masked_adamw_(p, g, m, v, steps, lr=LR, weight_decay=1e-2, backend=impl)

    run_bench(step, impl=f"fg.ops.masked_adamw_[{impl}]", role="candidate", nbytes=nbytes, device=device)


# ---- per-call overhead of the optimizer: 686 tensors of 16 elements, so the math is negligible

OVERHEAD_IMPLS = (
    [pytest.param("cpu", impl, id=f"cpu-{impl}") for impl in ("cpp", "cpp-python-bookkeeping", "torch_fused")]
    + [pytest.param("cuda", impl, id=f"cuda-{impl}", marks=[pytest.mark.gpu])
       for impl in ("triton", "cuda", "triton-python-bookkeeping", "torch_fused")])


@pytest.mark.parametrize("device,impl", OVERHEAD_IMPLS)
def test_optimizer_step_overhead(run_bench, benchmark, device, impl, monkeypatch):
    """fg.optim.AdamW.step against torch.optim.AdamW(fused=True).step where only the overhead counts.

    ``*-python-bookkeeping`` runs the same step with the native list checks and step counters
    switched off (freezeguard/ops/native_shortcuts.py), i.e. as before they existed.
    """
    shapes = _shapes.unet_shapes("scaled")
    benchmark.group = f"optimizer step overhead {device} (686 x 16 elements)"
    gen = torch.Generator(device=device).manual_seed(0)
    named = [(name, torch.nn.Parameter(torch.randn(16, device=device, generator=gen))) for name, _ in shapes]
    for _, p in named:
        p.grad = torch.randn(16, device=device, generator=gen)
    nbytes = 7 * sum(p.numel() * p.element_size() for _, p in named)
    if impl == "torch_fused":
        opt = torch.optim.AdamW([p for _, p in named], lr=LR, fused=True)
        run_bench(opt.step, impl="torch.optim.AdamW(fused=True)", role="anchor", nbytes=nbytes, device=device)
        return
    backend = impl.removesuffix("-python-bookkeeping")
    _skip_unless_runs(backend, device)
    if impl.endswith("-python-bookkeeping"):
        from freezeguard.ops import native_shortcuts as _shortcuts

        monkeypatch.setattr(_shortcuts, "_native", lambda: None)
    opt = fg.optim.AdamW(named, lr=LR, mask=fg.FreezeMask({n: (16,) for n, _ in named}, []), backend=backend)
    run_bench(opt.step, impl=f"fg.optim.AdamW[{impl}]",
              role="reference" if impl.endswith("bookkeeping") else "candidate", nbytes=nbytes, device=device)


# ---- the learner's two updates

def _learner_state(device: str):
    """Live weights (with .grad), delta = theta_pre - theta_ft, and the mask logits."""
    _, params = _model(device)
    key = f"{device}-diffs"
    if key not in _cache:
        gen = torch.Generator(device=device).manual_seed(1)
        _cache[key] = [torch.randn(p.shape, device=device, generator=gen) * 1e-3 for p in params]
    x = torch.rand(len(params), device=device)  # logits, U[0,1) as the authors initialise them
    return params, _cache[key], x


def _fused_releaser(theta, diffs, grads, x, backend):
    """The same update with the fused ops: one segment_dot, a few ops on [S], one mask_shift_."""
    s = fg.ops.segment_dot(diffs, grads, backend=backend)
    m = torch.sigmoid(x / T)
    dm_dx = m * (1 - m) / T
    # d/dx_i of c (rho - mean m)^2, by hand (no autograd graph over 686 scalars)
    d_sparsity = C_SPARSITY * 2 * (RHO - m.mean()) * (-dm_dx / m.numel())
    x -= MASK_LR * s * dm_dx + d_sparsity
    fg.ops.mask_shift_(theta, diffs, torch.sigmoid(x / T) - m, backend=backend)


LEARNER_IMPLS = (_impls("cpu", ("authors_loop", "torch")) + _impls("cuda", ("authors_loop", "torch")))


@pytest.mark.parametrize("device,impl", LEARNER_IMPLS)
def test_user_update(run_bench, benchmark, device, impl):
    params, diffs, x = _learner_state(device)
    benchmark.group = f"user_update {device}"
    nbytes = 5 * sum(p.numel() * p.element_size() for p in params)  # read theta,delta,grad; write theta,delta
    if impl == "authors_loop":
        run_bench(lambda: authors_loop.user_update(params, diffs, x, T=T, user_lr=USER_LR),
                  impl="per-tensor loop (authors')",
                  role="anchor", nbytes=nbytes, device=device)
        return
    if impl != "torch":
        _skip_unless_runs(impl, device)
    theta = [p.detach() for p in params]
    grads = [p.grad for p in params]

    def fused():
        fg.ops.user_update_(theta, diffs, grads, torch.sigmoid(x / T), USER_LR, backend=impl)

    run_bench(fused, impl=f"fg.ops.user_update_[{impl}]", role="candidate" if impl != "torch" else "reference",
              nbytes=nbytes, device=device)


@pytest.mark.parametrize("device,impl", LEARNER_IMPLS)
def test_releaser_update(run_bench, benchmark, device, impl):
    params, diffs, x = _learner_state(device)
    benchmark.group = f"releaser update {device}"
    nbytes = 5 * sum(p.numel() * p.element_size() for p in params)  # dot reads 2; shift reads 2, writes 1
    if impl == "authors_loop":
        x_for_mask = x.clone().requires_grad_(True)
        run_bench(lambda: authors_loop.releaser_update(params, diffs, x_for_mask, **RELEASER_HP),
                  impl="per-tensor loop (authors')",
                  role="anchor", nbytes=nbytes, device=device)
        return
    if impl != "torch":
        _skip_unless_runs(impl, device)
    theta = [p.detach() for p in params]
    grads = [p.grad for p in params]
    xf = x.clone()
    run_bench(lambda: _fused_releaser(theta, diffs, grads, xf, impl), impl=f"fused ops [{impl}]",
              role="candidate" if impl != "torch" else "reference", nbytes=nbytes, device=device)


def test_fused_releaser_matches_the_loop():
    """Guard for the benchmark itself: the fused releaser computes what the loop computes."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    diffs = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    x = torch.rand(len(shapes), generator=gen)
    theta = [p.detach().clone() for p in params]
    xf = x.clone()
    authors_loop.releaser_update(params, diffs, x.clone().requires_grad_(True), **RELEASER_HP)
    _fused_releaser(theta, diffs, [p.grad for p in params], xf, "torch")
    for a, b in zip(theta, params, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
