"""Every backend of every fused op against the pure-PyTorch reference, over one grid.

Grid: backend (torch, cpp, triton, cuda; skipped where it cannot run) x device (cpu; cuda
under the `gpu` mark) x dtype (fp32, bf16, fp16) x sizes (0, 1, odd, > one block, many
small tensors, one large), plus mixed dtypes in one list, non-contiguous inputs, frozen
patterns for AdamW (none, all, random, changing between steps), several steps, and the
bad-input errors of freezeguard/ops/validation.py.

How results are judged (docs/STYLE.md: optimi's per-dtype Tolerance, flash-attention's rule):
- fp32: close to the reference within TOLERANCES[fp32].
- bf16/fp16: close to the reference within one or two units in the last place, and the
  kernel's error against an fp32 computation is at most ~2x the error of the same math
  done by PyTorch in that dtype.
- segment_dot: within a few fp32 roundings of an fp64 dot product.
Triton on CPU runs in the (slow) interpreter, so it gets the small cases only.
"""
from __future__ import annotations

import math

import pytest
import torch
from support.tolerances import KERNEL

import freezeguard as fg
from freezeguard.backends import BackendUnavailable, get_backend, reference, status

BACKENDS = ("torch", "cpp", "triton", "cuda")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]
ADAM = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


TOLERANCES = KERNEL  # tests/support/tolerances.py


def _backend_or_skip(name: str, device: str):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    st = status(name)
    if not st.available:
        pytest.skip(f"backend {name} unavailable: {st.reason}")
    ok, why = get_backend(name).supports(torch.device(device))
    if not ok:
        pytest.skip(f"backend {name} cannot run on {device}: {why}")
    return name


def _interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


# name -> tensor sizes; the "heavy" ones are skipped under the Triton interpreter.
SIZES = {
    "empty": [0],
    "one": [1],
    "odd": [1001],
    "blocks": [70_001, 3],            # > a 64K CPU piece and any GPU block
    "many_small": [1 + (7 * i) % 97 for i in range(150)],
    "large": [(1 << 20) + 5],
    "mixed": [0, 1, 4099, 33, 0, 257],
}
HEAVY = {"blocks", "many_small", "large"}
SIZE_IDS = list(SIZES)


def _sizes_or_skip(case: str, backend: str, device: str) -> list[int]:
    if case in HEAVY and _interpreted(backend, device):
        pytest.skip("too large for the Triton interpreter")
    return SIZES[case]


def _randn(sizes, dtype, device, scale=1.0):
    return [(torch.randn(n, device=device) * scale).to(dtype) for n in sizes]


def _clone(ts):
    return [t.clone() for t in ts]


def _f32(ts):
    # always a copy: .float() of an fp32 tensor would alias it
    return [t.to(torch.float32, copy=True) for t in ts]


def _max_err(got, want) -> float:
    errs = [(g.double() - w.double()).abs().max().item() for g, w in zip(got, want, strict=True) if g.numel()]
    return max(errs, default=0.0)


def _assert_close_lists(got, want, dtype, what=""):
    tol = TOLERANCES[dtype]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g.float(), w.float(), atol=tol.atol, rtol=tol.rtol,
                                   msg=lambda m, i=i: f"{what}[{i}]: {m}")


def _assert_lowp_rule(got, fp32_ref, naive, dtype, what):
    """flash-attention's rule: kernel error <= factor x (PyTorch in dtype) error, vs fp32."""
    tol = TOLERANCES[dtype]
    kernel_err, torch_err = _max_err(got, fp32_ref), _max_err(naive, fp32_ref)
    assert kernel_err <= tol.lowp_factor * torch_err + tol.atol, (
        f"{what}: kernel error {kernel_err:.3g} vs fp32 exceeds {tol.lowp_factor} x PyTorch-in-{dtype} "
        f"error {torch_err:.3g}")


# ---- PyTorch doing the same math in the storage dtype (no upcast), for the low-precision rule

def _naive_adamw_(p, g, m, v, steps, lr, betas, eps, weight_decay):
    b1, b2 = betas
    for pi, gi, mi, vi, s in zip(p, g, m, v, steps, strict=True):
        pi.mul_(1 - lr * weight_decay)
        mi.lerp_(gi, 1 - b1)
        vi.mul_(b2).addcmul_(gi, gi, value=1 - b2)
        denom = (vi.sqrt() / math.sqrt(1 - b2 ** s)).add_(eps)
        pi.addcdiv_(mi, denom, value=-lr / (1 - b1 ** s))


def _naive_mask_shift_(theta, delta, dm):
    for i, (t, d) in enumerate(zip(theta, delta, strict=True)):
        t.add_(d * dm[i].to(t.dtype))


def _naive_user_update_(theta, delta, grad, m, lr):
    for i, (t, d, g) in enumerate(zip(theta, delta, grad, strict=True)):
        keep = (1 - m[i]).to(t.dtype)
        u = g * (-lr * keep)
        t.add_(keep * u)
        d.sub_(u)


# ---- masked_adamw_

def _adam_state(sizes, dtype, device):
    p = _randn(sizes, dtype, device)
    m = _randn(sizes, dtype, device, 0.1)
    v = [(t.float() ** 2).to(dtype) for t in _randn(sizes, dtype, device, 0.1)]
    return p, m, v


def _run_adamw_steps(backend, sizes, dtype, device, n_steps, trainable_per_step):
    """Run n_steps on the backend, the fp32 reference and the naive in-dtype version.

    trainable_per_step(step) -> indices listed that step (the rest are frozen); every
    tensor keeps its own step count.
    """
    p, m, v = _adam_state(sizes, dtype, device)
    runs = {"kernel": (_clone(p), _clone(m), _clone(v)),
            "ref": (_clone(p), _clone(m), _clone(v)),      # the spec, in the storage dtype
            "ref32": (_f32(p), _f32(m), _f32(v)),
            "naive": (_clone(p), _clone(m), _clone(v))}
    counts = [0] * len(sizes)
    for step in range(n_steps):
        idx = trainable_per_step(step)
        for i in idx:
            counts[i] += 1
        steps = [float(counts[i]) for i in idx]
        grads = _randn([sizes[i] for i in idx], dtype, device)
        for name, (pp, mm, vv) in runs.items():
            sel = ([pp[i] for i in idx], [mm[i] for i in idx], [vv[i] for i in idx])
            g = grads if name != "ref32" else _f32(grads)
            if name == "kernel":
                fg.ops.masked_adamw_(*sel[:1], g, *sel[1:], steps, backend=backend, **ADAM)
            elif name in ("ref", "ref32"):
                reference.masked_adamw_(sel[0], g, sel[1], sel[2], steps, lr=ADAM["lr"], beta1=0.9, beta2=0.999,
                                        eps=ADAM["eps"], weight_decay=ADAM["weight_decay"])
            else:
                _naive_adamw_(sel[0], g, sel[1], sel[2], steps, **ADAM)
    return (p, m, v), runs, counts


def _check_adamw(runs, dtype, initial, counts):
    names = ("params", "exp_avgs", "exp_avg_sqs")
    for k, what in enumerate(names):
        got, ref, ref32, naive = runs["kernel"][k], runs["ref"][k], runs["ref32"][k], runs["naive"][k]
        for i, c in enumerate(counts):
            if c == 0:  # never listed: bit-identical to its initial value
                assert torch.equal(got[i], initial[k][i]), f"frozen {what}[{i}] changed"
        _assert_close_lists(got, ref, dtype, what)
        if dtype != torch.float32:
            _assert_lowp_rule(got, ref32, naive, dtype, what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SIZE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_adamw_sizes(backend, case, dtype, device):
    backend = _backend_or_skip(backend, device)
    sizes = _sizes_or_skip(case, backend, device)
    all_idx = list(range(len(sizes)))
    initial, runs, counts = _run_adamw_steps(backend, sizes, dtype, device, 3, lambda s: all_idx)
    _check_adamw(runs, dtype, initial, counts)


FROZEN_PATTERNS = {
    "none": lambda n, step, gen: list(range(n)),
    "all": lambda n, step, gen: [],
    "random": lambda n, step, gen: sorted(torch.randperm(n, generator=gen.manual_seed(1))[: n // 2].tolist()),
    "changing": lambda n, step, gen: sorted(torch.randperm(n, generator=gen.manual_seed(100 + step))[: n // 2].tolist()),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", list(FROZEN_PATTERNS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_adamw_frozen_patterns(backend, pattern, dtype, device):
    backend = _backend_or_skip(backend, device)
    sizes = SIZES["mixed"] + [129, 2, 1000]
    gen = torch.Generator()
    choose = FROZEN_PATTERNS[pattern]
    initial, runs, counts = _run_adamw_steps(backend, sizes, dtype, device, 4,
                                             lambda step: choose(len(sizes), step, gen))
    if pattern == "changing":  # the point of the pattern: step counts end up different
        assert len(set(counts)) > 1
    _check_adamw(runs, dtype, initial, counts)


# ---- segment_dot

def _check_dot(got, a, b):
    exact = torch.stack([(x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)]) if a else torch.zeros(0)
    scale = torch.stack([(x.double() * y.double()).abs().sum() for x, y in zip(a, b, strict=True)]) if a else torch.zeros(0)
    assert got.dtype == torch.float32 and got.shape == (len(a),)
    # fp32 accumulation: a few roundings per term at most, relative to sum |a_i b_i|.
    bound = 1e-5 * scale.to(got.device) + 1e-6
    err = (got.double() - exact.to(got.device)).abs()
    assert bool((err <= bound).all()), f"segment_dot error {err.max().item():.3g} over bound"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SIZE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_dot(backend, case, dtype, device):
    backend = _backend_or_skip(backend, device)
    sizes = _sizes_or_skip(case, backend, device)
    a, b = _randn(sizes, dtype, device), _randn(sizes, dtype, device)
    got = fg.ops.segment_dot(a, b, backend=backend)
    _check_dot(got, a, b)
    ref = reference.segment_dot(a, b)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_dot_is_deterministic(backend, device):
    if backend == "torch":
        pytest.skip("the reference sums with torch.sum, whose order follows the thread count")
    backend = _backend_or_skip(backend, device)
    sizes = SIZES["mixed"] if _interpreted(backend, device) else [300_001, 5, 70_000]
    a, b = _randn(sizes, torch.float32, device), _randn(sizes, torch.float32, device)
    threads = torch.get_num_threads()
    try:
        first = fg.ops.segment_dot(a, b, backend=backend)
        torch.set_num_threads(1)  # a different split of the work must not change the bits
        second = fg.ops.segment_dot(a, b, backend=backend)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, second)


# ---- mask_shift_ and user_update_

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SIZE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_shift(backend, case, dtype, device):
    backend = _backend_or_skip(backend, device)
    sizes = _sizes_or_skip(case, backend, device)
    theta, delta = _randn(sizes, dtype, device), _randn(sizes, dtype, device, 0.1)
    dm = torch.rand(len(sizes), device=device) - 0.5
    got, ref, ref32, naive = _clone(theta), _clone(theta), _f32(theta), _clone(theta)
    for step in range(2):
        fg.ops.mask_shift_(got, delta, dm, backend=backend)
        reference.mask_shift_(ref, delta, dm)
        reference.mask_shift_(ref32, _f32(delta), dm)
        _naive_mask_shift_(naive, delta, dm)
    _assert_close_lists(got, ref, dtype, "theta")
    if dtype != torch.float32:
        _assert_lowp_rule(got, ref32, naive, dtype, "theta")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SIZE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_user_update(backend, case, dtype, device):
    backend = _backend_or_skip(backend, device)
    sizes = _sizes_or_skip(case, backend, device)
    theta, delta = _randn(sizes, dtype, device), _randn(sizes, dtype, device, 0.1)
    m = torch.rand(len(sizes), device=device)
    lr = 0.05
    got, ref = (_clone(theta), _clone(delta)), (_clone(theta), _clone(delta))
    ref32, naive = (_f32(theta), _f32(delta)), (_clone(theta), _clone(delta))
    for step in range(2):
        grad = _randn(sizes, dtype, device)
        fg.ops.user_update_(*got, grad, m, lr, backend=backend)
        reference.user_update_(*ref, grad, m, lr)
        reference.user_update_(*ref32, _f32(grad), m, lr)
        _naive_user_update_(*naive, grad, m, lr)
    for k, what in enumerate(("theta", "delta")):
        _assert_close_lists(got[k], ref[k], dtype, what)
        if dtype != torch.float32:
            _assert_lowp_rule(got[k], ref32[k], naive[k], dtype, what)


# ---- mixed dtypes in one list, non-contiguous inputs, empty lists

MIXED = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.float16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_in_one_list(backend, device):
    backend = _backend_or_skip(backend, device)
    sizes = [1001, 64, 3, 5000, 1]
    mk = lambda scale=1.0: [(torch.randn(n, device=device) * scale).to(dt) for n, dt in zip(sizes, MIXED, strict=True)]  # noqa: E731
    # AdamW, two steps
    p, g, mm = mk(), mk(), mk(0.1)
    v = [(t.float() ** 2).to(t.dtype) for t in mk(0.1)]
    kp, km, kv = _clone(p), _clone(mm), _clone(v)
    rp, rm, rv = _clone(p), _clone(mm), _clone(v)  # the reference keeps each tensor's dtype
    for steps in ([1.0] * 5, [2.0, 2.0, 1.0, 2.0, 3.0]):
        fg.ops.masked_adamw_(kp, g, km, kv, steps, backend=backend, **ADAM)
        reference.masked_adamw_(rp, g, rm, rv, steps, lr=ADAM["lr"], beta1=0.9, beta2=0.999, eps=1e-8,
                                weight_decay=ADAM["weight_decay"])
    for got, ref in ((kp, rp), (km, rm), (kv, rv)):
        for x, y in zip(got, ref, strict=True):
            _assert_close_lists([x], [y.to(x.dtype)], x.dtype, "adamw mixed")
    # the learner ops
    theta, delta, grad = mk(), mk(0.1), mk()
    dm, m = torch.rand(len(sizes), device=device) - 0.5, torch.rand(len(sizes), device=device)
    _check_dot(fg.ops.segment_dot(theta, grad, backend=backend), theta, grad)
    kt, rt = _clone(theta), _f32(theta)
    fg.ops.mask_shift_(kt, delta, dm, backend=backend)
    reference.mask_shift_(rt, _f32(delta), dm)
    kt2, kd2, rt2, rd2 = _clone(theta), _clone(delta), _f32(theta), _f32(delta)
    fg.ops.user_update_(kt2, kd2, grad, m, 0.05, backend=backend)
    reference.user_update_(rt2, rd2, _f32(grad), m, 0.05)
    for got, ref in ((kt, rt), (kt2, rt2), (kd2, rd2)):
        for x, y in zip(got, ref, strict=True):
            _assert_close_lists([x], [y.to(x.dtype)], x.dtype, "learner mixed")


def _strided(shape, dtype, device, scale=1.0):
    """A non-contiguous view (every other column of a transposed matrix)."""
    base = (torch.randn(shape[1] * 2, shape[0], device=device) * scale).to(dtype)
    view = base.t()[:, ::2]
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, dtype, device):
    backend = _backend_or_skip(backend, device)
    shapes = [(7, 5), (33, 65), (2, 2)]
    mk = lambda scale=1.0: [_strided(s, dtype, device, scale) for s in shapes]  # noqa: E731
    p, g, mm, v = mk(), mk(), mk(0.1), mk(0.1)
    for x in v:
        x.copy_(x * x)
    rp, rm, rv = _f32(p), _f32(mm), _f32(v)
    fg.ops.masked_adamw_(p, g, mm, v, [1.0, 2.0, 3.0], backend=backend, **ADAM)
    reference.masked_adamw_(rp, _f32(g), rm, rv, [1.0, 2.0, 3.0], lr=ADAM["lr"], beta1=0.9, beta2=0.999, eps=1e-8,
                            weight_decay=ADAM["weight_decay"])
    for got, ref in ((p, rp), (mm, rm), (v, rv)):  # results written back into the strided views
        _assert_close_lists(got, [t.to(dtype) for t in ref], dtype, "adamw strided")
    theta, delta, grad = mk(), mk(0.1), mk()
    _check_dot(fg.ops.segment_dot(theta, grad, backend=backend), theta, grad)
    dm, m = torch.rand(3, device=device), torch.rand(3, device=device)
    kt = mk()
    rt = _f32(kt)
    fg.ops.mask_shift_(kt, delta, dm, backend=backend)
    reference.mask_shift_(rt, _f32(delta), dm)
    _assert_close_lists(kt, [t.to(dtype) for t in rt], dtype, "mask_shift strided")
    rt2, rd2 = _f32(theta), _f32(delta)
    fg.ops.user_update_(theta, delta, grad, m, 0.05, backend=backend)
    reference.user_update_(rt2, rd2, _f32(grad), m, 0.05)
    _assert_close_lists(theta, [t.to(dtype) for t in rt2], dtype, "user_update theta strided")
    _assert_close_lists(delta, [t.to(dtype) for t in rd2], dtype, "user_update delta strided")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_lists(backend):
    backend = _backend_or_skip(backend, "cpu")
    fg.ops.masked_adamw_([], [], [], [], [], backend=backend, **ADAM)
    out = fg.ops.segment_dot([], [], backend=backend)
    assert out.shape == (0,) and out.dtype == torch.float32
    fg.ops.mask_shift_([], [], torch.zeros(0), backend=backend)
    fg.ops.user_update_([], [], [], torch.zeros(0), 0.1, backend=backend)


# ---- bad input: clear errors, nothing half-applied

def _three(dtype=torch.float32, device="cpu"):
    return [torch.randn(4, dtype=dtype, device=device), torch.randn(3, dtype=dtype, device=device)]


def test_length_mismatch_is_rejected_and_nothing_changes():
    theta, delta = _three(), _three()
    before = _clone(theta)
    with pytest.raises(ValueError, match="list lengths differ"):
        fg.ops.mask_shift_(theta, delta[:1], [0.5])
    with pytest.raises(ValueError, match="list lengths differ"):
        fg.ops.user_update_(theta, delta, delta[:1], [0.5, 0.5], 0.1)
    with pytest.raises(ValueError, match="list lengths differ"):
        fg.ops.segment_dot(theta, delta[:1])
    p, g, m, v = _three(), _three(), _three(), _three()
    with pytest.raises(ValueError, match="steps has 1 entries"):
        fg.ops.masked_adamw_(p, g, m, v, [1.0], lr=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(theta, before, strict=True))


def test_wrong_scalar_length_and_bad_steps():
    theta, delta = _three(), _three()
    with pytest.raises(ValueError, match="one value per tensor"):
        fg.ops.mask_shift_(theta, delta, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one value per tensor"):
        fg.ops.user_update_(theta, delta, delta, torch.zeros(2, 1), 0.1)
    p, g, m, v = _three(), _three(), _three(), _three()
    with pytest.raises(ValueError, match=">= 1"):
        fg.ops.masked_adamw_(p, g, m, v, [0.0, 1.0], lr=1e-3)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="has shape"):
        fg.ops.segment_dot([torch.zeros(3)], [torch.zeros(4)])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64, torch.bool])
def test_unsupported_dtypes_are_rejected(dtype):
    bad = [torch.zeros(3, dtype=dtype)]
    with pytest.raises(TypeError, match="dtype"):
        fg.ops.segment_dot(bad, bad)
    with pytest.raises(TypeError, match="dtype"):
        fg.ops.mask_shift_(bad, bad, [0.1])


def test_sparse_tensors_are_rejected():
    sp = [torch.zeros(3, 3).to_sparse()]
    with pytest.raises(TypeError, match="sparse|dense"):
        fg.ops.segment_dot(sp, sp)


def test_mixed_devices_are_rejected():
    # "meta" stands in for a second device on a CPU-only machine.
    with pytest.raises(ValueError, match="is on"):
        fg.ops.segment_dot([torch.zeros(3)], [torch.zeros(3, device="meta")])


def test_companion_dtype_mismatch_is_rejected():
    with pytest.raises(TypeError, match="bfloat16"):
        fg.ops.mask_shift_([torch.zeros(3)], [torch.zeros(3, dtype=torch.bfloat16)], [0.1])
    p = [torch.zeros(3)]
    with pytest.raises(TypeError):
        fg.ops.masked_adamw_(p, [torch.zeros(3, dtype=torch.float16)], [torch.zeros(3)], [torch.zeros(3)], [1.0],
                             lr=1e-3)


def test_not_a_tensor_is_rejected():
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        fg.ops.segment_dot([[1.0, 2.0]], [torch.zeros(2)])


def test_forcing_an_unavailable_backend_says_why(monkeypatch):
    x = [torch.ones(3)]
    unavailable = [n for n in BACKENDS if not status(n).available]
    if unavailable:
        name = unavailable[0]
        with pytest.raises(BackendUnavailable, match=f"{name}.*unavailable: .+"):
            fg.ops.segment_dot(x, x, backend=name)
        monkeypatch.setenv("FREEZEGUARD_BACKEND", name)
        with pytest.raises(BackendUnavailable, match=name):
            fg.ops.segment_dot(x, x)
        monkeypatch.delenv("FREEZEGUARD_BACKEND")
    # A backend that is available but cannot take these tensors: cpp on a non-CPU device.
    if status("cpp").available:
        meta = [torch.ones(3, device="meta")]
        with pytest.raises(BackendUnavailable, match="cpp.*cannot run on meta"):
            fg.ops.segment_dot(meta, meta, backend="cpp")
    with pytest.raises(ValueError, match="unknown backend"):
        fg.ops.segment_dot(x, x, backend="fortran")


# ---- user_adamw_ (the AdamW simulated user), the same grid

def _naive_user_adamw_(theta, delta, grads, mu, nu, m, step, lr, betas, eps, weight_decay):
    b1, b2 = betas
    bc1, bc2 = 1 - b1 ** step, math.sqrt(1 - b2 ** step)
    for i, (t, d, g, a, b) in enumerate(zip(theta, delta, grads, mu, nu, strict=True)):
        keep = (1 - m[i]).to(t.dtype)
        g_ft = g * keep
        a.lerp_(g_ft, 1 - b1)
        b.mul_(b2).addcmul_(g_ft, g_ft, value=1 - b2)
        u = a / (b.sqrt() / bc2 + eps) * (-lr / bc1) - (lr * weight_decay) * (t - m[i].to(t.dtype) * d)
        t.add_(keep * u)
        d.sub_(u)


USER_M = {
    "none_frozen": lambda n, step, gen: torch.zeros(n),
    "all_frozen": lambda n, step, gen: torch.ones(n),
    "soft": lambda n, step, gen: torch.rand(n, generator=gen.manual_seed(1)),
    "changing": lambda n, step, gen: torch.rand(n, generator=gen.manual_seed(100 + step)),
}
USER_HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def _run_user_adamw(backend, sizes, dtype, device, m_of_step, steps=3):
    theta, delta = _randn(sizes, dtype, device), _randn(sizes, dtype, device, 0.1)
    mu = _randn(sizes, dtype, device, 0.1)
    nu = [(t.float() ** 2).to(dtype) for t in _randn(sizes, dtype, device, 0.1)]
    runs = {"kernel": [_clone(x) for x in (theta, delta, mu, nu)], "ref": [_clone(x) for x in (theta, delta, mu, nu)],
            "ref32": [_f32(x) for x in (theta, delta, mu, nu)], "naive": [_clone(x) for x in (theta, delta, mu, nu)],
            "initial": [_clone(x) for x in (theta, delta, mu, nu)]}
    gen = torch.Generator()
    # eps=1e-8 underflows to 0 in fp16, where the naive in-dtype version then divides 0 by 0
    hp = {**USER_HP, "eps": 1e-4 if dtype == torch.float16 else USER_HP["eps"]}
    for step in range(1, steps + 1):
        m = m_of_step(len(sizes), step, gen).to(device)
        grads = _randn(sizes, dtype, device)
        for name, (t, d, a, b) in runs.items():
            if name == "initial":
                continue
            g = _f32(grads) if name == "ref32" else _clone(grads)  # a backend may use grads as scratch
            if name == "kernel":
                fg.ops.user_adamw_(t, d, g, a, b, m, step, backend=backend, **hp)
            elif name == "naive":
                _naive_user_adamw_(t, d, g, a, b, m, step, **hp)
            else:
                reference.user_adamw_(t, d, g, a, b, m, step, lr=hp["lr"], beta1=0.9, beta2=0.999, eps=hp["eps"],
                                      weight_decay=hp["weight_decay"])
    return runs


def _check_user_adamw(runs, dtype):
    for k, what in enumerate(("theta", "delta", "exp_avgs", "exp_avg_sqs")):
        _assert_close_lists(runs["kernel"][k], runs["ref"][k], dtype, what)
        if dtype != torch.float32:
            _assert_lowp_rule(runs["kernel"][k], runs["ref32"][k], runs["naive"][k], dtype, what)


def _user_adamw_backend_or_skip(name: str, device: str) -> str:
    name = _backend_or_skip(name, device)
    if not get_backend(name).implements("user_adamw_"):
        pytest.skip(f"backend {name} has no user_adamw_ kernel (auto picks the next backend)")
    return name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SIZE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_user_adamw_sizes(backend, case, dtype, device):
    backend = _user_adamw_backend_or_skip(backend, device)
    sizes = _sizes_or_skip(case, backend, device)
    _check_user_adamw(_run_user_adamw(backend, sizes, dtype, device, USER_M["soft"]), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", list(USER_M))
@pytest.mark.parametrize("backend", BACKENDS)
def test_user_adamw_frozen_patterns(backend, pattern, dtype, device):
    backend = _user_adamw_backend_or_skip(backend, device)
    sizes = SIZES["mixed"] + [129, 2, 1000]
    runs = _run_user_adamw(backend, sizes, dtype, device, USER_M[pattern], steps=4)
    _check_user_adamw(runs, dtype)
    if pattern == "all_frozen":  # m = 1: nothing of the user's step reaches the live weights
        for got, start in zip(runs["kernel"][0], runs["initial"][0], strict=True):
            assert torch.equal(got, start)


def test_user_adamw_runs_on_auto_and_rejects_bad_steps():
    theta, delta, g = [torch.ones(3)], [torch.ones(3)], [torch.ones(3)]
    fg.ops.user_adamw_(theta, delta, g, [torch.zeros(3)], [torch.zeros(3)], [0.5], 1, lr=0.1)
    assert torch.allclose(theta[0], torch.full((3,), 0.95))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="step"):
            fg.ops.user_adamw_(theta, delta, g, [torch.zeros(3)], [torch.zeros(3)], [0.5], bad, lr=0.1)
    with pytest.raises(ValueError, match="list lengths differ"):
        fg.ops.user_adamw_(theta, delta, [], [torch.zeros(3)], [torch.zeros(3)], [0.5], 1, lr=0.1)


# ---- masked_adamw_step_: the optimizer's op (counters in tensors), host and device-side paths

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lr_kind", ["float", "tensor"], ids=["host", "device_side"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_adamw_step_matches_the_reference(backend, lr_kind, dtype, device):
    backend = _backend_or_skip(backend, device)
    sizes = SIZES["mixed"] + [129]
    p, m, v = _adam_state(sizes, dtype, device)
    kp, km, kv = _clone(p), _clone(m), _clone(v)
    start = [0.0, 3.0, 0.0, 1.0, 5.0, 0.0, 2.0]
    on = device if lr_kind == "tensor" else "cpu"  # device-side: counters and lr where the math runs
    counters = [torch.tensor(s, device=on) for s in start]
    lr = torch.tensor(ADAM["lr"], device=device) if lr_kind == "tensor" else ADAM["lr"]
    for k in range(3):
        g = _randn(sizes, dtype, device)
        fg.ops.masked_adamw_step_(kp, g, km, kv, counters, lr=lr, betas=ADAM["betas"], eps=ADAM["eps"],
                                  weight_decay=ADAM["weight_decay"], backend=backend)
        reference.masked_adamw_(p, g, m, v, [s + k + 1 for s in start], lr=ADAM["lr"], beta1=0.9, beta2=0.999,
                                eps=ADAM["eps"], weight_decay=ADAM["weight_decay"])
    assert [c.item() for c in counters] == [s + 3 for s in start]
    assert all(c.device.type == torch.device(on).type for c in counters)
    for got, want, what in ((kp, p, "params"), (km, m, "exp_avgs"), (kv, v, "exp_avg_sqs")):
        _assert_close_lists(got, want, dtype, what)


def test_masked_adamw_step_refuses_bad_counters_and_changes_nothing():
    p, g, m, v = _three(), _three(), _three(), [t.abs() for t in _three()]
    before = _clone(p)
    for counters, err in (([torch.tensor(0.0)], ValueError), ([torch.tensor(-1.0), torch.tensor(0.0)], ValueError),
                          ([torch.tensor(float("nan")), torch.tensor(0.0)], ValueError),
                          ([torch.zeros(2), torch.tensor(0.0)], TypeError)):
        with pytest.raises(err):
            fg.ops.masked_adamw_step_(p, g, m, v, counters, lr=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(p, before, strict=True))


# ---- the backend contract

def test_every_backend_is_a_valid_record():
    from freezeguard.backends.opspecs import SPECS
    from freezeguard.backends.record import BackendRecord

    for name in BACKENDS:
        be = get_backend(name)
        assert isinstance(be, BackendRecord), name
        assert be.name == name and be.dtypes <= set(fg.ops.SUPPORTED_DTYPES)
        for op, kernel in be.kernels.items():  # what the record checked when it was built
            assert SPECS[op].why_kernel_does_not_fit(kernel) is None, (name, op)
    assert set(get_backend("torch").kernels) == set(SPECS)  # the reference backend implements every op


def test_a_record_that_claims_a_wrong_kernel_is_refused():
    from freezeguard.backends.record import ALL_DTYPES, BackendRecord

    def ok():
        return True, ""

    def mask_shift_(theta, delta):  # misses dm
        pass

    with pytest.raises(TypeError, match="mask_shift_ kernel does not fit"):
        BackendRecord(name="bad", devices=frozenset({"cpu"}), dtypes=ALL_DTYPES, availability=ok,
                      kernels={"mask_shift_": mask_shift_})
    with pytest.raises(TypeError, match="not a declared op"):
        BackendRecord(name="bad", devices=frozenset({"cpu"}), dtypes=ALL_DTYPES, availability=ok,
                      kernels={"mask_shift": reference.mask_shift_})
    with pytest.raises(ValueError, match="dtypes"):
        BackendRecord(name="bad", devices=frozenset({"cpu"}), dtypes=frozenset({torch.float64}), availability=ok,
                      kernels={})


def test_backend_dtypes_are_enforced(monkeypatch):
    import dataclasses

    from freezeguard import backends

    be = dataclasses.replace(get_backend("torch"), dtypes=frozenset({torch.float32}))
    monkeypatch.setitem(backends._cache, "torch", be)
    x32, x16 = [torch.ones(2)], [torch.ones(2, dtype=torch.bfloat16)]
    assert fg.ops.segment_dot(x32, x32, backend="torch").tolist() == [2.0]
    with pytest.raises(BackendUnavailable, match="torch.*dtype bfloat16"):
        fg.ops.segment_dot(x16, x16, backend="torch")


def test_availability_and_supports_never_build(monkeypatch):
    from freezeguard.backends import _build

    def no_build(kind):
        raise AssertionError("availability()/supports() must not compile")

    monkeypatch.setattr(_build, "_jit_build", no_build)
    for name in BACKENDS:
        get_backend(name).availability()
        get_backend(name).supports(torch.device("cpu"))
        status(name)


def test_tensor_subclasses_never_reach_a_kernel():
    # A traceable wrapper subclass (what FSDP2's DTensor is) has no plain storage: an error
    # naming it, not a crash inside a native kernel.
    from torch.testing._internal.two_tensor import TwoTensor

    t = TwoTensor(torch.ones(4), torch.ones(4))
    plain = [torch.ones(4)]
    for backend in BACKENDS:
        if not status(backend).available or not get_backend(backend).supports(torch.device("cpu"))[0]:
            continue
        with pytest.raises(TypeError, match="TwoTensor"):
            fg.ops.segment_dot([t], plain, backend=backend)
        with pytest.raises(TypeError, match="subclass"):
            fg.ops.masked_adamw_step_([t], plain, [torch.zeros(4)], [torch.zeros(4)], [torch.tensor(0.0)], lr=1e-3,
                                      backend=backend)


# ---- masked_sgd_momentum_: the op added to show what a new op needs (declaration, reference,
# kernels), over the same grid

def _naive_sgd_momentum_(p, g, buf, lr, momentum, dampening, weight_decay, nesterov):
    for pi, gi, bi in zip(p, g, buf, strict=True):
        d = gi + weight_decay * pi if weight_decay else gi.clone()
        bi.mul_(momentum).add_(d, alpha=1 - dampening)
        pi.sub_(lr * (d + momentum * bi if nesterov else bi))


SGD_HP = [dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False),
          dict(lr=1e-2, momentum=0.8, dampening=0.1, weight_decay=1e-2, nesterov=True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SIZE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_sgd_momentum(backend, case, dtype, device):
    backend = _backend_or_skip(backend, device)
    if not get_backend(backend).implements("masked_sgd_momentum_"):
        pytest.skip(f"backend {backend} has no masked_sgd_momentum_ kernel")
    sizes = _sizes_or_skip(case, backend, device)
    for hp in SGD_HP:
        p = _randn(sizes, dtype, device)
        runs = {k: [_clone(p), [torch.zeros_like(t) for t in p]] for k in ("kernel", "ref", "naive")}
        runs["ref32"] = [_f32(p), [torch.zeros(t.shape, device=device) for t in p]]
        # bf16/fp16: one step. Each stored step may round a buffer one unit apart from the reference
        # (an FMA in the kernel), and later steps' cancellation makes that unit large relative to the
        # result; the low-precision rule below judges the error against fp32 instead.
        for _ in range(3 if dtype == torch.float32 else 1):
            g = _randn(sizes, dtype, device)
            fg.ops.masked_sgd_momentum_(*runs["kernel"][:1], g, runs["kernel"][1], backend=backend, **hp)
            reference.masked_sgd_momentum_(runs["ref"][0], g, runs["ref"][1], **hp)
            reference.masked_sgd_momentum_(runs["ref32"][0], _f32(g), runs["ref32"][1], **hp)
            _naive_sgd_momentum_(runs["naive"][0], g, runs["naive"][1], **hp)
        for k, what in enumerate(("params", "momentum_buffers")):
            _assert_close_lists(runs["kernel"][k], runs["ref"][k], dtype, what)
            if dtype != torch.float32:
                _assert_lowp_rule(runs["kernel"][k], runs["ref32"][k], runs["naive"][k], dtype, what)


@pytest.mark.parametrize("nesterov", [False, True])
def test_masked_sgd_momentum_is_torch_sgd(nesterov):
    """With dampening 0 the op is torch.optim.SGD from the first step (zero buffers = torch's copy)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 1, 300)]
    mine = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in mine]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=nesterov, foreach=False)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in mine]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        fg.ops.masked_sgd_momentum_(mine, grads, bufs, lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=nesterov)
    for p, q in zip(params, mine, strict=True):
        torch.testing.assert_close(q, p.detach(), **TOLERANCES[torch.float32].kwargs())
