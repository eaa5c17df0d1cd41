"""The native CPU extension really builds and loads, and _build decides and explains right.

The JIT path is exercised in a subprocess with FREEZEGUARD_FORCE_JIT=1 (the prebuilt module,
if pip built one, is ignored); torch caches the build by source hash, so only the very first
run on a machine pays the compile.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import freezeguard as fg
from freezeguard.backends import BackendUnavailable, _build, cpp_backend, status

_csrc_flags = pytest.importorskip("freezeguard._csrc.freezeguard_build_flags")


@pytest.fixture
def fresh_build_state():
    """Run a test with _build's memory emptied, then put the real state back."""
    saved = (dict(_build._loaded), dict(_build._failed), dict(_build._origin))
    _build.reset()
    yield
    _build.reset()
    _build._loaded.update(saved[0])
    _build._failed.update(saved[1])
    _build._origin.update(saved[2])


def _no_compile(*args, **kwargs):
    raise AssertionError("extension_status must never compile")


def test_status_never_compiles(fresh_build_state, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", _no_compile)
    ok, reason = _build.extension_status("cpu")
    assert isinstance(ok, bool) and reason
    assert ok, reason  # this machine has a compiler and ninja (CI too)
    assert "prebuilt" in reason or "JIT-built" in reason


def test_extension_loads_and_is_cached():
    ext = _build.load_extension("cpu")
    for op in ("masked_adamw_", "segment_dot", "mask_shift_", "user_update_"):
        assert callable(getattr(ext, op))
    assert _build.load_extension("cpu") is ext
    ok, reason = _build.extension_status("cpu")
    assert ok and ("prebuilt" in reason or "JIT-built" in reason)
    a = [torch.arange(5.0), torch.ones(3)]
    assert ext.segment_dot(a, a).tolist() == [30.0, 3.0]


def test_concurrent_loads_get_one_module():
    results = []
    threads = [threading.Thread(target=lambda: results.append(_build.load_extension("cpu"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r is results[0] for r in results)


def test_jit_cache_dir_is_where_torch_builds():
    ext = _build.load_extension("cpu")
    if "JIT-built" in _build.extension_status("cpu")[1]:
        assert Path(ext.__file__).parent == _build.jit_cache_dir("cpu")


def test_jit_build_in_a_fresh_process():
    cache = _build.jit_cache_dir("cpu")
    if _build._prebuilt_present("cpu") and not (cache and cache.exists()) \
            and os.environ.get("FREEZEGUARD_TEST_JIT") != "1":
        pytest.skip("a prebuilt freezeguard._C is in use and the JIT cache is cold: compiling from scratch "
                    "takes minutes on a small machine (set FREEZEGUARD_TEST_JIT=1 to run it)")
    code = (
        "import torch\n"
        "from freezeguard.backends import _build\n"
        "ext = _build.load_extension('cpu')\n"
        "ok, why = _build.extension_status('cpu')\n"
        "assert ok and 'JIT-built' in why, why\n"
        "x = [torch.ones(4, dtype=torch.bfloat16)]\n"
        "print(float(ext.segment_dot(x, x)[0]))\n"
    )
    env = {**os.environ, "FREEZEGUARD_FORCE_JIT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "4.0"


def test_missing_compiler_is_explained(fresh_build_state, monkeypatch):
    monkeypatch.setattr(_build, "_prebuilt_present", lambda kind: False)
    monkeypatch.setattr(_build, "_compiler", lambda: None)
    ok, reason = _build.extension_status("cpu")
    assert not ok and "no C++ compiler" in reason
    with pytest.raises(_build.ExtensionBuildError, match="no C\\+\\+ compiler"):
        _build.load_extension("cpu")
    # the failure is remembered: status answers at once, with the reason
    monkeypatch.undo()
    assert _build.extension_status("cpu") == (False, _build._failed["cpu"])


def test_missing_ninja_is_explained(fresh_build_state, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(_build, "_prebuilt_present", lambda kind: False)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    ok, reason = _build.extension_status("cpu")
    assert not ok and "ninja" in reason


def test_broken_prebuilt_falls_back_to_jit(fresh_build_state, monkeypatch):
    # Pretend freezeguard._C is installed but fails to import (e.g. built for another torch).
    monkeypatch.setattr(_build, "_prebuilt_present", lambda kind: True)
    monkeypatch.setattr(_build, "_import_prebuilt",
                        lambda name: (_ for _ in ()).throw(ImportError("undefined symbol: _ZN3c10")))
    ext = _build.load_extension("cpu")
    assert callable(ext.segment_dot)
    ok, reason = _build.extension_status("cpu")
    assert ok and "failed to import" in reason and "JIT-built" in reason


def test_failed_build_falls_back_in_auto_and_explains_when_forced(fresh_build_state, monkeypatch):
    monkeypatch.setattr(_build, "_prebuilt_present", lambda kind: False)
    monkeypatch.setattr(_build, "_compiler", lambda: None)
    monkeypatch.delenv("FREEZEGUARD_BACKEND", raising=False)
    assert status("cpp").available is False  # no compiler: known without building
    x = [torch.ones(3)]
    assert fg.ops.segment_dot(x, x).tolist() == [3.0]  # auto -> reference, no crash
    with pytest.raises(BackendUnavailable, match="cpp.*no C\\+\\+ compiler"):
        fg.ops.segment_dot(x, x, backend="cpp")


def test_build_failure_during_first_op_falls_back(fresh_build_state, monkeypatch):
    # The toolchain looks fine, so availability() says "will be JIT-built", but the
    # compiler then fails: the first auto op must still run (on the reference).
    monkeypatch.setattr(_build, "_prebuilt_present", lambda kind: False)

    def broken(kind):
        raise _build.ExtensionBuildError("JIT build of the freezeguard cpu extension failed (boom)")

    monkeypatch.setattr(_build, "_jit_build", broken)
    monkeypatch.delenv("FREEZEGUARD_BACKEND", raising=False)
    assert status("cpp").available
    x = [torch.ones(2)]
    assert fg.ops.segment_dot(x, x).tolist() == [2.0]
    st = status("cpp")
    assert not st.available and "boom" in st.reason
    assert cpp_backend.supports(torch.device("cpu")) == (False, st.reason)


def test_cpp_backend_takes_cpu_tensors_only():
    ok, why = cpp_backend.BACKEND.supports(torch.device("meta"))
    assert not ok and "CPU" in why


def test_cuda_status_says_why_without_a_gpu():
    ok, reason = _build.extension_status("cuda")
    if torch.version.cuda is None:
        assert not ok and "without CUDA" in reason
    elif not torch.cuda.is_available():
        assert not ok and "GPU" in reason
    else:
        assert reason


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown extension kind"):
        _build.extension_status("rocm")


def test_flags_are_portable():
    cflags, ldflags = _csrc_flags.cpu_flags()
    assert "-fopenmp" in cflags and "-fopenmp" in ldflags
    # The wheel must run on other CPUs: ISA choice happens at run time (csrc/cpu/simd.h).
    assert not any(f.startswith("-march") or f.startswith("-mavx") for f in cflags)
    # torch picks the C++ standard its headers need; pinning one here would override it.
    assert not any(f.startswith("-std") for f in cflags)
    assert all(not f.startswith("-std") for fl in _csrc_flags.cuda_flags().values() for f in fl)


def test_sources_are_installed():
    names = {p.name for p in _build.sources("cpu")}
    assert {"bindings.cpp", "fused_ops.cpp", "inner_loops.cpp"} <= names


def test_extension_rejects_bad_input_without_crashing():
    # The extension may be called without freezeguard.ops in front of it: errors, never a crash.
    ext = _build.load_extension("cpu")
    x64 = [torch.zeros(70_000, dtype=torch.float64)]
    with pytest.raises(RuntimeError, match="dtype"):
        ext.segment_dot(x64, x64)
    a, b = [torch.zeros(4)], [torch.zeros(5)]
    with pytest.raises(RuntimeError, match="elements"):
        ext.mask_shift_(a, b, torch.zeros(1))
    with pytest.raises(RuntimeError, match="one value per tensor"):
        ext.user_update_(a, a, a, torch.zeros(2), 0.1)
    with pytest.raises(RuntimeError, match="contiguous"):
        t = [torch.zeros(4, 4).t()]
        ext.segment_dot(t, t)


def test_every_function_the_package_calls_is_bound():
    # Each function registers its own binding beside its C++ definition (csrc/op_registry.h), so a
    # registration the linker dropped or a source left out of the build would otherwise surface only
    # at that function's first call. The names are those cpp_backend and native_shortcuts call.
    ext = _build.load_extension("cpu")
    from freezeguard.ops import native_shortcuts

    called = set()
    for module, receiver in ((cpp_backend, r"_ext\(\)"), (native_shortcuts, r"native")):
        called |= set(re.findall(receiver + r"\.(\w+)\(", Path(module.__file__).read_text()))
    assert {"masked_adamw_step_prepared_", "masked_sgd_momentum_", "read_step_counters"} <= called  # the scan works
    assert not called - set(vars(ext)), f"not bound in {ext.__name__}: {sorted(called - set(vars(ext)))}"
    # AdamWLists is bound before the op that takes it, so that op's signature names its Python type.
    assert f"lists: {ext.__name__}.AdamWLists" in ext.masked_adamw_step_prepared_.__doc__


def test_binding_registry_is_private_to_each_module():
    # The registry is a static inside an inline function. With default visibility GCC makes it one
    # process-wide (GNU unique) symbol: freezeguard._cuda, or a JIT-built _C loaded next to the
    # prebuilt one, would then share it and bind the other module's functions.
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found")
    ext = _build.load_extension("cpu")
    res = subprocess.run([nm, "-D", "--defined-only", ext.__file__], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "registered_binders" not in res.stdout
