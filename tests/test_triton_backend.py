"""The Triton backend against the reference, on the CPU interpreter (conftest sets
TRITON_INTERPRET=1 without a GPU) or on a GPU.

Sizes stay small: the interpreter runs each program in numpy. Block-boundary cases use the
configured BLOCK (kernels/triton/launch.py) so the full-chunk (vectorized) and tail (masked) paths
both run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.tolerances import KERNEL

import freezeguard as fg
from freezeguard.backends import reference as ref
from freezeguard.backends import triton_backend as tb

pytest.importorskip("triton")
if not tb.availability()[0]:
    pytest.skip(f"triton backend unavailable: {tb.availability()[1]}", allow_module_level=True)

from freezeguard.kernels import adamw, mask_updates, tables  # noqa: E402
from freezeguard.kernels.launch import CONFIGS  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not tb._interpreting() else "cpu")
BLOCK = CONFIGS["masked_adamw_"][0]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ADAMW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    torch.testing.assert_close(got.float(), want.float(), **KERNEL[dtype or got.dtype].kwargs(), equal_nan=True)


def _make(shapes, dtypes, scale=1.0, positive=False):
    out = []
    for s, dt in zip(shapes, dtypes, strict=True):
        t = torch.rand(s) if positive else torch.randn(s)
        out.append((t * scale).to(dtype=dt, device=DEVICE))
    return out


def _clone(ts):
    return [t.clone() for t in ts]


# Around one block: 0, 1, odd, BLOCK-1, BLOCK, BLOCK+1, 2 blocks + odd tail, a 2-D tensor.
SHAPES = [(0,), (1,), (37,), (BLOCK - 1,), (BLOCK,), (BLOCK + 1,), (2 * BLOCK + 123,), (33, 17)]


def _adamw_case(shapes, dtypes, n_steps=3, steps0=None):
    p = _make(shapes, dtypes)
    m = _make(shapes, dtypes, scale=0.1)
    v = _make(shapes, dtypes, scale=0.01, positive=True)
    P, M, V = _clone(p), _clone(m), _clone(v)
    steps = list(steps0 or [1.0] * len(shapes))
    for _ in range(n_steps):
        g = _make(shapes, dtypes)
        fg.ops.masked_adamw_(p, g, m, v, steps, backend="triton", **ADAMW)
        ref.masked_adamw_(P, _clone(g), M, V, steps, lr=ADAMW["lr"], beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=1e-2)
        for got, want in zip(p + m + v, P + M + V, strict=True):
            _close(got, want)
            # Compare each step from identical inputs: one-ulp differences must not compound.
            want.copy_(got)
        steps = [s + 1 for s in steps]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_adamw_matches_reference(dtype):
    # Per-tensor step counts differ (a tensor unfrozen later restarts its bias correction).
    _adamw_case(SHAPES, [dtype] * len(SHAPES), steps0=[1.0 + (i % 3) for i in range(len(SHAPES))])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_learner_ops_match_reference(dtype):
    dtypes = [dtype] * len(SHAPES)
    theta, delta, grad = _make(SHAPES, dtypes), _make(SHAPES, dtypes), _make(SHAPES, dtypes)
    T, D = _clone(theta), _clone(delta)

    got = fg.ops.segment_dot(delta, grad, backend="triton")
    want = ref.segment_dot(delta, grad)
    assert got.dtype == torch.float32 and got.shape == (len(SHAPES),)
    # fp32 accumulation in a different order; the inputs are exact in fp32.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert got[0].item() == 0.0  # the empty tensor

    dm = torch.linspace(-1, 1, len(SHAPES), device=DEVICE)
    fg.ops.mask_shift_(theta, delta, dm, backend="triton")
    ref.mask_shift_(T, D, dm)
    for a, b in zip(theta, T, strict=True):
        _close(a, b)
        b.copy_(a)  # the next op starts from identical inputs

    m = torch.rand(len(SHAPES), device=DEVICE)
    m[1] = 1.0  # fully frozen share: no update at all
    frozen_before = (theta[1].clone(), delta[1].clone())
    fg.ops.user_update_(theta, delta, grad, m, 0.5, backend="triton")
    ref.user_update_(T, D, grad, m, 0.5)
    for a, b in zip(theta + delta, T + D, strict=True):
        _close(a, b)
    assert torch.equal(theta[1], frozen_before[0]) and torch.equal(delta[1], frozen_before[1])


def test_mixed_dtypes_many_small_and_one_bigger():
    n_small = 40
    shapes = [(1 + 7 * i,) for i in range(n_small)] + [(0,), (3 * BLOCK + 5,)]
    dtypes = [DTYPES[i % 3] for i in range(len(shapes))]
    _adamw_case(shapes, dtypes, n_steps=2)

    a, b = _make(shapes, dtypes), _make(shapes, dtypes)
    torch.testing.assert_close(fg.ops.segment_dot(a, b, backend="triton"), ref.segment_dot(a, b),
                               rtol=1e-5, atol=1e-4)
    theta, delta = _make(shapes, dtypes), _make(shapes, dtypes)
    T = _clone(theta)
    dm = torch.rand(len(shapes), device=DEVICE)
    fg.ops.mask_shift_(theta, delta, dm, backend="triton")
    ref.mask_shift_(T, delta, dm)
    for x, y in zip(theta, T, strict=True):
        _close(x, y)


def test_unaligned_and_noncontiguous_tensors():
    # Views at odd element offsets are not 16-byte aligned: the kernels must take the
    # unhinted path. A transposed view exercises freezeguard/ops/validation.py's contiguous copy + write-back.
    base = torch.randn(4 * BLOCK, device=DEVICE)
    shapes = [(BLOCK + 3,), (5, 7)]
    p = [base[1:BLOCK + 4], torch.randn(7, 5, device=DEVICE).t()]
    outside = torch.cat([base[:1], base[BLOCK + 4:]]).clone()
    g, m = _make(shapes, [torch.float32] * 2), _make(shapes, [torch.float32] * 2, scale=0.1)
    v = _make(shapes, [torch.float32] * 2, scale=0.01, positive=True)
    P, M, V = _clone(p), _clone(m), _clone(v)
    fg.ops.masked_adamw_(p, g, m, v, [2.0, 5.0], backend="triton", **ADAMW)
    ref.masked_adamw_(P, g, M, V, [2.0, 5.0], lr=ADAMW["lr"], beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
    for got, want in zip(p + m + v, P + M + V, strict=True):
        _close(got, want)
    assert torch.equal(torch.cat([base[:1], base[BLOCK + 4:]]), outside)  # nothing written outside the view


def test_lists_of_only_empty_tensors():
    e = [torch.empty(0, device=DEVICE), torch.empty(0, 3, device=DEVICE, dtype=torch.bfloat16)]
    assert torch.equal(fg.ops.segment_dot(e, e, backend="triton"), torch.zeros(2, device=DEVICE))
    fg.ops.masked_adamw_(e, e, e, e, [1.0, 1.0], backend="triton", **ADAMW)  # nothing to do, must not fail
    fg.ops.user_update_(e, e, e, torch.zeros(2, device=DEVICE), 0.1, backend="triton")


def test_segment_dot_is_deterministic():
    shapes = [(5 * BLOCK + 17,), (3,), (BLOCK,)]
    a, b = _make(shapes, [torch.float32] * 3), _make(shapes, [torch.float32] * 3)
    first = fg.ops.segment_dot(a, b, backend="triton")
    for _ in range(2):
        assert torch.equal(fg.ops.segment_dot(a, b, backend="triton"), first)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter, on inf - inf
def test_nonfinite_gradients_propagate_like_reference():
    p, g = _make([(5,)], [torch.float32]), _make([(5,)], [torch.float32])
    g[0][1], g[0][3] = float("nan"), float("inf")
    m, v = [torch.zeros(5, device=DEVICE)], [torch.zeros(5, device=DEVICE)]
    P, M, V = _clone(p), _clone(m), _clone(v)
    fg.ops.masked_adamw_(p, g, m, v, [1.0], backend="triton", **ADAMW)
    ref.masked_adamw_(P, g, M, V, [1.0], lr=ADAMW["lr"], beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
    for got, want in zip(p + m + v, P + M + V, strict=True):
        torch.testing.assert_close(got, want, equal_nan=True)


def test_tables_are_cached_and_rebuilt_when_the_list_changes():
    tables.clear_caches()
    shapes = [(10,), (BLOCK + 1,)]
    a, b = _make(shapes, [torch.float32] * 2), _make(shapes, [torch.float32] * 2)
    mask_updates.segment_dot(a, b)
    mask_updates.segment_dot(a, b)
    assert tables.cache_stats()["layout_builds"] == 1 and tables.cache_stats()["pointer_builds"] == 1

    # Same sizes, new storage (e.g. grads reallocated): layout reused, pointers rebuilt, and
    # the result is the new tensors', not the old ones'.
    c = _make(shapes, [torch.float32] * 2)
    torch.testing.assert_close(mask_updates.segment_dot(a, c), ref.segment_dot(a, c), rtol=1e-5, atol=1e-4)
    assert tables.cache_stats()["layout_builds"] == 1 and tables.cache_stats()["pointer_builds"] == 2

    # A different list (a tensor more, another dtype): both rebuilt, still right.
    d = a + [torch.randn(3, device=DEVICE, dtype=torch.bfloat16)]
    e = b + [torch.randn(3, device=DEVICE, dtype=torch.bfloat16)]
    torch.testing.assert_close(mask_updates.segment_dot(d, e), ref.segment_dot(d, e), rtol=1e-5, atol=1e-4)
    assert tables.cache_stats()["layout_builds"] == 2

    # Back to the first list: served from the caches.
    mask_updates.segment_dot(a, b)
    assert tables.cache_stats()["layout_builds"] == 2 and tables.cache_stats()["pointer_builds"] == 3


def _count_launches(monkeypatch):
    counts: dict[str, int] = {}
    kernels = {"adamw": adamw._masked_adamw_kernel, "partials": mask_updates._dot_partials_kernel,
               "reduce": mask_updates._dot_reduce_kernel, "shift": mask_updates._mask_shift_kernel,
               "user": mask_updates._user_update_kernel}
    for name, k in kernels.items():
        original = k.run

        def run(*args, _name=name, _orig=original, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _orig(*args, **kwargs)

        monkeypatch.setattr(k, "run", run)
    return counts


@pytest.mark.parametrize("n_tensors", [3, 30])
def test_launches_do_not_grow_with_tensor_count(monkeypatch, n_tensors):
    counts = _count_launches(monkeypatch)
    shapes = [(5 + i,) for i in range(n_tensors)]
    dtypes = [torch.float32 if i % 2 else torch.bfloat16 for i in range(n_tensors)]  # two dtype groups
    t, d, g = _make(shapes, dtypes), _make(shapes, dtypes), _make(shapes, dtypes)
    m = _make(shapes, dtypes, scale=0.1)
    v = _make(shapes, dtypes, scale=0.01, positive=True)
    s = torch.rand(n_tensors, device=DEVICE)
    fg.ops.masked_adamw_(t, g, m, v, [1.0] * n_tensors, backend="triton", **ADAMW)
    fg.ops.segment_dot(d, g, backend="triton")
    fg.ops.mask_shift_(t, d, s, backend="triton")
    fg.ops.user_update_(t, d, g, s, 0.1, backend="triton")
    assert counts == {"adamw": 2, "partials": 2, "reduce": 1, "shift": 2, "user": 2}


def test_availability_and_supports():
    ok, why = tb.availability()
    assert ok and ("TRITON_INTERPRET" in why or "CUDA" in why)
    if tb._interpreting():
        assert tb.supports(torch.device("cpu"))[0]
        assert not tb.supports(torch.device("cuda"))[0]
    else:
        assert tb.supports(torch.device("cuda"))[0]
        assert not tb.supports(torch.device("cpu"))[0]
    assert "triton" in fg.available_backends()


def test_import_without_interpreter_or_gpu_reports_why():
    code = ("import os; os.environ.pop('TRITON_INTERPRET', None); "
            "import torch; torch.cuda.is_available = lambda: False; "
            "import sys; from freezeguard.backends import triton_backend as tb; "
            "assert 'triton' not in sys.modules; "
            "ok, why = tb.availability(); assert not ok and 'TRITON_INTERPRET' in why, why; "
            "ok, why = tb.supports(torch.device('cpu')); assert not ok and 'TRITON_INTERPRET' in why, why")
    subprocess.run([sys.executable, "-c", code], check=True, env={k: v for k, v in os.environ.items()
                                                                  if k != "TRITON_INTERPRET"})


def _bundled_ptxas() -> bool:
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")) \
        or shutil.which("ptxas") is not None


@pytest.mark.skipif(not _bundled_ptxas(), reason="no ptxas to compile for a GPU target")
def test_kernels_compile_for_h100_with_vector_accesses():
    # Compiles (not runs) every kernel for sm_90 in a subprocess without the interpreter: catches
    # kernels that only work interpreted, and pins the 128-bit accesses the bandwidth needs.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parent / "support" / "triton_compile_check.py"
    out = subprocess.run([sys.executable, str(script), "--arch", "90",
                          "--dtypes", "fp32,bf16", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in rows} >= {"masked_adamw_[fp32]", "masked_adamw_[bf16]", "segment_dot[reduce]"}
    for r in rows:
        if r["kernel"] != "segment_dot[reduce]":
            assert r["load_bits"] == 128, r
        if r["kernel"].split("[")[0] in ("masked_adamw_", "mask_shift_", "user_update_"):
            assert r["store_bits"] == 128, r
        assert r["stack_bytes"] in (None, 0), f"register spills: {r}"


@pytest.mark.gpu
def test_steady_state_calls_do_not_sync_with_the_host():
    shapes = [(BLOCK + 3,), (17,)]
    dts = [torch.float32, torch.bfloat16]
    p, g, m = _make(shapes, dts), _make(shapes, dts), _make(shapes, dts, scale=0.1)
    v = _make(shapes, dts, scale=0.01, positive=True)
    s = torch.rand(2, device=DEVICE)
    calls = [lambda: fg.ops.masked_adamw_(p, g, m, v, [3.0, 4.0], backend="triton", **ADAMW),
             lambda: fg.ops.segment_dot(p, g, backend="triton"),
             lambda: fg.ops.mask_shift_(p, g, s, backend="triton"),
             lambda: fg.ops.user_update_(p, m, g, s, 0.1, backend="triton")]
    for call in calls:
        call()  # build tables, compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in calls:
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_tensor_past_int32_offsets():
    # 2**31 + 4097 elements: chunk offsets past 2**31 must not wrap (int64 addressing).
    n = 2 ** 31 + 4097
    if torch.cuda.get_device_properties(0).total_memory < 3 * n * 2 + (4 << 30):
        pytest.skip("needs ~17 GB of GPU memory")
    theta = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    delta = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    fg.ops.mask_shift_([theta], [delta], torch.tensor([2.0], device="cuda"), backend="triton")
    for i in (0, 2 ** 31 - 1, 2 ** 31, n - 1):
        assert theta[i].item() == 2.0, i
    assert int((theta == 2.0).sum()) == n
    got = fg.ops.segment_dot([theta], [delta], backend="triton")
    torch.testing.assert_close(got, torch.tensor([2.0 * n], device="cuda"), rtol=1e-6, atol=0)
