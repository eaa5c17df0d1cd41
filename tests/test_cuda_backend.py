"""The `cuda` backend (csrc/cuda): compile checks that run without a GPU, and GPU tests.

Without a GPU, CI still compiles the kernels with nvcc (sm_80 and sm_90) and parses the torch
bindings with the host compiler, so a syntax or type error cannot land. With a GPU, every op
is checked against freezeguard/backends/reference.py (the spec), including odd sizes,
misaligned views, mixed dtypes, determinism and CUDA-graph capture.
"""
from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

import freezeguard as fg
from freezeguard.backends import BackendUnavailable, cuda_backend, reference

ROOT = Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"


# ---------------------------------------------------------------- compile checks (no GPU needed)

def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuda_includes(nvcc: str) -> list[str]:
    """The include directories nvcc itself uses (nvcc may be a wrapper script or a symlink)."""
    res = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True, timeout=60)
    dirs = []
    for line in (res.stdout + res.stderr).splitlines():
        if "INCLUDES=" in line:  # e.g. #$ INCLUDES="-I/usr/local/cuda/targets/x86_64-linux/include"
            for token in shlex.split(line.split("=", 1)[1]):
                token = token[2:] if token.startswith("-I") else token
                if token and Path(token).is_dir():
                    dirs.append(token)
    return [d for d in dirs if (Path(d) / "cuda_runtime_api.h").exists()]


def _build_flags() -> dict[str, list[str]]:
    from freezeguard._csrc.freezeguard_build_flags import cuda_flags

    return cuda_flags()


def _torch_std() -> list[str]:
    """The C++ standard torch.utils.cpp_extension builds extensions with (C++20 from torch 2.10)."""
    import inspect

    from torch.utils import cpp_extension

    return ["-std=c++20"] if "-std=c++20" in inspect.getsource(cpp_extension) else ["-std=c++17"]


def _nvcc_flags() -> list[str]:
    """What the real build passes to nvcc (torch's defaults + ours), minus the target list."""
    from torch.utils import cpp_extension

    torch_flags = list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", [])) + _torch_std()
    return torch_flags + [f for f in _build_flags()["nvcc"] if not f.startswith("-gencode")]


@pytest.mark.parametrize("arch", ["80", "90"])
def test_fused_ops_cu_compiles_with_nvcc(arch, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    flags = _nvcc_flags()
    out = tmp_path / f"fused_ops_sm{arch}.o"
    cmd = [nvcc, "-c", str(CUDA_SRC / "fused_ops.cu"), "-o", str(out), *flags,
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-warn-spills", "-Xcompiler", "-Wall"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    assert out.stat().st_size > 0
    if shutil.which("nm"):  # the launchers bindings.cpp links against, with C linkage
        symbols = subprocess.run(["nm", str(out)], capture_output=True, text=True).stdout
        for name in ("fg_masked_adamw", "fg_segment_dot", "fg_mask_shift", "fg_user_update", "fg_masked_sgd_momentum"):
            assert f" T {name}" in symbols, f"{name} missing from fused_ops.cu"
    # Register spills would turn a bandwidth-bound kernel into a local-memory-bound one.
    assert "spill" not in res.stderr.lower(), res.stderr
    own = [line for line in res.stderr.splitlines() if "fused_ops" in line and "warning" in line.lower()]
    assert not own, "\n".join(own)


def test_elementwise_kernels_use_128bit_accesses(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    ptx = tmp_path / "fused_ops.ptx"
    cmd = [nvcc, "-ptx", str(CUDA_SRC / "fused_ops.cu"), "-o", str(ptx), *_nvcc_flags(), "-arch=sm_90"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    entries = ptx.read_text().split(".entry ")[1:]
    kernels = {body.split("(", 1)[0]: body for body in entries}
    streaming = {k: b for k, b in kernels.items() if "reduce" not in k}
    # every element-wise op is one multi_tensor_kernel instantiation per storage dtype
    assert all("multi_tensor_kernel" in k for k in streaming), sorted(kernels)
    assert len(streaming) == 5 * 3, sorted(kernels)  # 5 ops (adamw, dot partials, shift, user, sgd) x 3 dtypes
    for name, body in streaming.items():
        assert "ld.v4" in body or "ld.global.v4" in body or "ld.global.nc.v4" in body, f"no 128-bit load in {name}"


def test_bindings_cpp_parses_with_torch_headers(tmp_path):
    nvcc = _nvcc()
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if nvcc is None or cxx is None:
        pytest.skip("needs nvcc (for the CUDA headers) and a C++ compiler")
    cuda_includes = _cuda_includes(nvcc)
    if not cuda_includes:
        pytest.skip(f"could not find the CUDA include directory of {nvcc}")
    from torch.utils.cpp_extension import include_paths

    includes = [*include_paths(), sysconfig.get_paths()["include"], *cuda_includes, str(CUDA_SRC)]
    # A CPU-only torch ships the c10/cuda headers but not this generated one; an empty stand-in
    # is enough to parse (it only carries build-configuration macros).
    torch_include = Path(include_paths()[0])
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        includes.insert(0, str(tmp_path / "stub"))
    cmd = [cxx, "-fsyntax-only", *_torch_std(), *_build_flags()["cxx"], "-Wall", "-DTORCH_EXTENSION_NAME=_cuda",
           "-DTORCH_API_INCLUDE_EXTENSION_H", *[f"-I{p}" for p in includes], str(CUDA_SRC / "bindings.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"host compiler failed:\n{' '.join(cmd)}\n{res.stderr[-6000:]}"
    own = [line for line in res.stderr.splitlines() if re.match(r".*bindings\.cpp:\d+:\d+: warning", line)]
    assert not own, "\n".join(own)


# ---------------------------------------------------------------- availability (any machine)

def test_availability_reports_a_reason():
    ok, reason = cuda_backend.availability()
    assert isinstance(ok, bool) and reason
    if ok:
        assert cuda_backend.HARDWARE_NOTE in reason
    if not torch.cuda.is_available():
        assert not ok


def test_supports_only_cuda_devices():
    assert cuda_backend.supports(torch.device("cpu"))[0] is False
    assert "CUDA" in cuda_backend.supports(torch.device("cpu"))[1]
    assert cuda_backend.supports(torch.device("cuda", 0))[0] is True


def test_forcing_cuda_on_cpu_tensors_says_why():
    a = [torch.ones(3)]
    with pytest.raises(BackendUnavailable, match="cuda"):
        fg.ops.segment_dot(a, a, backend="cuda")


# ---------------------------------------------------------------- GPU tests

CHUNK = 16384  # FG_CHUNK_SIZE in fused_ops.h; sizes below straddle it
SHAPES = [(0,), (1,), (7,), (3, 5), (33, 17), (CHUNK,), (CHUNK + 3,), (2 * CHUNK + 4,), (257, 129)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ext():
    from freezeguard.backends._build import load_extension

    return load_extension("cuda")


def _rand(shape, dtype, misaligned=False, scale=1.0):
    """A contiguous CUDA tensor; misaligned ones start one element into their storage."""
    n = math.prod(shape)
    if misaligned:
        base = (torch.randn(n + 1, device="cuda") * scale).to(dtype)
        return base[1:].view(shape)
    return (torch.randn(shape, device="cuda") * scale).to(dtype)


def _clone(ts):
    return [t.clone() for t in ts]


def _f32(ts):
    """fp32 copies (never aliases: Tensor.float() returns fp32 tensors themselves)."""
    return [t.to(torch.float32, copy=True) for t in ts]


def _assert_close_lowp(got, ref_lp, exact, what):
    """fp32: tight. bf16/fp16: error vs fp32 truth at most 2x what torch itself gets in that dtype."""
    for i, (g, r, e) in enumerate(zip(got, ref_lp, exact, strict=True)):
        if g.numel() == 0:
            continue
        if g.dtype == torch.float32:
            torch.testing.assert_close(g, r, rtol=2e-5, atol=1e-6, msg=f"{what}[{i}]")
            continue
        err = (g.float() - e).abs().max().item()
        torch_err = (r.float() - e).abs().max().item()
        bound = 2 * torch_err + 1e-6 * max(1.0, e.abs().max().item())
        assert err <= bound, f"{what}[{i}] {g.dtype}: error {err:.3e} > 2x torch's {torch_err:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("misaligned", [False, True])
def test_masked_adamw_matches_reference(dtype, misaligned):
    n_steps = 3 if dtype == torch.float32 else 1
    params = [_rand(s, dtype, misaligned) for s in SHAPES]
    grads_per_step = [[_rand(s, dtype, misaligned) for s in SHAPES] for _ in range(n_steps)]
    exp_avgs = [_rand(s, dtype, misaligned).zero_() for s in SHAPES]
    exp_avg_sqs = [_rand(s, dtype, misaligned).zero_() for s in SHAPES]
    ref = [_clone(params), _clone(exp_avgs), _clone(exp_avg_sqs)]
    exact = [_f32(ts) for ts in ref]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    for k in range(n_steps):
        # per-tensor step counts that differ, as after a tensor's frozen state changed
        steps = [float(k + 1 + (i % 3)) for i in range(len(SHAPES))]
        cuda_backend.masked_adamw_(params, grads_per_step[k], exp_avgs, exp_avg_sqs, steps, **hp)
        reference.masked_adamw_(ref[0], grads_per_step[k], ref[1], ref[2], steps, **hp)
        reference.masked_adamw_(exact[0], _f32(grads_per_step[k]), exact[1], exact[2], steps, **hp)
    torch.cuda.synchronize()
    for name, got, r, e in zip(("param", "exp_avg", "exp_avg_sq"), (params, exp_avgs, exp_avg_sqs), ref, exact, strict=True):
        _assert_close_lowp(got, r, e, name)


@pytest.mark.gpu
def test_masked_adamw_mixed_dtypes_through_public_op():
    # One list, three storage dtypes (three launches), non-contiguous members (fg.ops copies back).
    shapes = [(65, 33), (CHUNK + 1,), (5, 7)]
    params = [_rand(s, d) for s, d in zip(shapes, DTYPES, strict=True)]
    params[0] = params[0].t()  # non-contiguous view
    grads = [torch.randn_like(p) for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    ref = [_clone(params), _clone(m), _clone(v)]
    fg.ops.masked_adamw_(params, grads, m, v, [1.0, 2.0, 5.0], lr=1e-3, backend="cuda")
    fg.ops.masked_adamw_(ref[0], grads, ref[1], ref[2], [1.0, 2.0, 5.0], lr=1e-3, backend="torch")
    for got, r in zip(params + m + v, ref[0] + ref[1] + ref[2], strict=True):
        tol = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[got.dtype]
        torch.testing.assert_close(got.float(), r.float(), rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("misaligned", [False, True])
def test_segment_dot_matches_reference_and_is_deterministic(dtype, misaligned):
    a = [_rand(s, dtype, misaligned) for s in SHAPES]
    b = [_rand(s, dtype, misaligned) for s in SHAPES]
    got = cuda_backend.segment_dot(a, b)
    again = cuda_backend.segment_dot(a, b)
    want = reference.segment_dot(a, b)
    assert got.dtype == torch.float32 and got.shape == (len(SHAPES),)
    assert torch.equal(got, again), "segment_dot must be bitwise reproducible"
    scale = torch.stack([(x.float() * y.float()).abs().sum() for x, y in zip(a, b, strict=True)])
    assert ((got - want).abs() <= 1e-5 * scale + 1e-6).all(), (got, want)
    assert got[0] == 0  # the empty tensor


@pytest.mark.gpu
def test_segment_dot_mixed_dtypes_keeps_list_order():
    shapes = [(100,), (CHUNK + 9,), (3,), (0,), (1000,), (7,)]
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float32, torch.bfloat16, torch.float16]
    a = [_rand(s, d) for s, d in zip(shapes, dtypes, strict=True)]
    b = [_rand(s, d) for s, d in zip(shapes, dtypes, strict=True)]
    got = fg.ops.segment_dot(a, b, backend="cuda")
    want = reference.segment_dot(a, b)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("misaligned", [False, True])
def test_mask_shift_matches_reference(dtype, misaligned):
    theta = [_rand(s, dtype, misaligned) for s in SHAPES]
    delta = [_rand(s, dtype, misaligned) for s in SHAPES]
    dm = torch.rand(len(SHAPES), device="cuda") - 0.5
    ref, exact = _clone(theta), _f32(theta)
    cuda_backend.mask_shift_(theta, delta, dm)
    reference.mask_shift_(ref, delta, dm)
    reference.mask_shift_(exact, _f32(delta), dm)
    _assert_close_lowp(theta, ref, exact, "theta")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("misaligned", [False, True])
def test_user_update_matches_reference(dtype, misaligned):
    theta = [_rand(s, dtype, misaligned) for s in SHAPES]
    delta = [_rand(s, dtype, misaligned) for s in SHAPES]
    grad = [_rand(s, dtype, misaligned) for s in SHAPES]
    m = torch.rand(len(SHAPES), device="cuda")
    m[0], m[1] = 0.0, 1.0  # fully trainable / fully frozen
    lr = 0.05
    ref_t, ref_d = _clone(theta), _clone(delta)
    ex_t, ex_d = _f32(theta), _f32(delta)
    cuda_backend.user_update_(theta, delta, grad, m, lr)
    reference.user_update_(ref_t, ref_d, grad, m, lr)
    reference.user_update_(ex_t, ex_d, _f32(grad), m, lr)
    _assert_close_lowp(theta, ref_t, ex_t, "theta")
    _assert_close_lowp(delta, ref_d, ex_d, "delta")


@pytest.mark.gpu
def test_masked_adamw_captured_in_a_cuda_graph_reads_lr_and_steps_on_device():
    shapes = [(CHUNK + 5,), (31, 7), (1,)]
    params = [_rand(s, torch.float32) for s in shapes]
    grads = [_rand(s, torch.float32) for s in shapes]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    ref = [_clone(params), _clone(m), _clone(v)]
    hp = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    steps = torch.tensor([1.0, 3.0, 10.0], device="cuda", dtype=torch.float64)
    lr = torch.tensor([1e-2], device="cuda", dtype=torch.float64)
    host_steps = steps.tolist()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: puts the pointer table on the device
        cuda_backend.masked_adamw_capturable_(params, grads, m, v, steps, lr=lr, **hp)
    torch.cuda.current_stream().wait_stream(side)
    reference.masked_adamw_(ref[0], grads, ref[1], ref[2], host_steps, lr=1e-2, **hp)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        steps.add_(1)
        cuda_backend.masked_adamw_capturable_(params, grads, m, v, steps, lr=lr, **hp)
    for new_lr in (5e-3, 2e-2, 1e-3):
        lr.fill_(new_lr)
        graph.replay()
        host_steps = [s + 1 for s in host_steps]
        reference.masked_adamw_(ref[0], grads, ref[1], ref[2], host_steps, lr=new_lr, **hp)
    torch.cuda.synchronize()
    assert steps.tolist() == host_steps
    for got, r in zip(params + m + v, ref[0] + ref[1] + ref[2], strict=True):
        torch.testing.assert_close(got, r, rtol=2e-5, atol=1e-6)


@pytest.mark.gpu
def test_capture_without_warm_up_is_refused():
    cuda_backend.clear_table_cache()
    p = [_rand((10,), torch.float32)]
    steps = torch.ones(1, device="cuda", dtype=torch.float64)
    lr = torch.ones(1, device="cuda", dtype=torch.float64)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="warm-up"):
        with torch.cuda.graph(graph):
            cuda_backend.masked_adamw_capturable_(p, _clone(p), _clone(p), _clone(p), steps, lr=lr)


@pytest.mark.gpu
def test_table_cache_stays_bounded():
    ext = _ext()
    ext.clear_table_cache()
    keep = []  # hold the tensors so every list has new addresses
    for n in range(1, 100):
        a = [torch.ones(n, device="cuda")]
        keep.append(a)
        cuda_backend.segment_dot(a, a)
    assert 0 < ext.table_cache_size() <= 64


@pytest.mark.gpu
def test_extension_rejects_unsafe_input():
    ext = _ext()
    a = [torch.ones(8, device="cuda")]
    with pytest.raises(RuntimeError, match="elements"):
        ext.segment_dot(a, [torch.ones(9, device="cuda")])
    with pytest.raises(RuntimeError, match="CUDA"):
        ext.segment_dot([torch.ones(8)], [torch.ones(8)])
    with pytest.raises(RuntimeError, match="contiguous"):
        x = torch.ones(4, 4, device="cuda").t()
        ext.segment_dot([x], [x])
    with pytest.raises(RuntimeError, match="dm"):
        ext.mask_shift_(a, a, torch.ones(2, device="cuda"))
