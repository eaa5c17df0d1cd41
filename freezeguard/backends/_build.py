"""Find or build the native extensions: prebuilt if installed, else JIT-built once and cached.

``pip install`` normally builds ``freezeguard._C`` (CPU) and ``freezeguard._cuda`` (CUDA)
through setup.py. When they are missing (``FREEZEGUARD_SKIP_BUILD=1``, an ABI mismatch
after a torch upgrade, an editable install), the first op that needs one compiles it from
the sources installed as ``freezeguard._csrc`` with ``torch.utils.cpp_extension.load``,
which caches the build under ``TORCH_EXTENSIONS_DIR`` and serialises concurrent builds
across processes with a lock file; a lock here serialises threads of one process.

Example:
    >>> from freezeguard.backends import _build
    >>> ok, reason = _build.extension_status("cpu")   # never compiles
    >>> ext = _build.load_extension("cpu") if ok else None  # may compile, once
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch


class ExtensionBuildError(RuntimeError):
    """A native extension is neither installed nor buildable here; the message says what is missing."""


@dataclass(frozen=True)
class _Kind:
    module: str   # prebuilt module name
    subdir: str   # folder of its sources inside freezeguard._csrc
    patterns: tuple[str, ...]


_KINDS = {
    "cpu": _Kind("freezeguard._C", "cpu", ("*.cpp",)),
    "cuda": _Kind("freezeguard._cuda", "cuda", ("*.cpp", "*.cu")),
}

_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}
_origin: dict[str, str] = {}
_no_prebuilt: set[str] = set()  # kinds loaded_or_prebuilt found no importable prebuilt module for


def _kind(kind: str) -> _Kind:
    if kind not in _KINDS:
        raise ValueError(f"unknown extension kind {kind!r}; choose 'cpu' or 'cuda'")
    return _KINDS[kind]


def _csrc_dir() -> Path | None:
    spec = importlib.util.find_spec("freezeguard._csrc")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def sources(kind: str) -> list[Path]:
    """The installed source files of extension ``kind`` (empty if the sources are not installed)."""
    root = _csrc_dir()
    if root is None:
        return []
    folder = root / _kind(kind).subdir
    return sorted(p for pattern in _kind(kind).patterns for p in folder.glob(pattern))


def _prebuilt_present(kind: str) -> bool:
    try:
        return importlib.util.find_spec(_kind(kind).module) is not None
    except (ImportError, ValueError):
        return False


def _import_prebuilt(name: str) -> ModuleType:
    return importlib.import_module(name)


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _missing_toolchain(kind: str) -> str | None:
    """Why a JIT build of ``kind`` cannot start here, or None if it can."""
    from torch.utils import cpp_extension

    if not sources(kind):
        return f"the {kind} sources are not installed (freezeguard._csrc/{_kind(kind).subdir} is missing or empty)"
    if _compiler() is None:
        return "no C++ compiler found (set CXX or install g++/clang++)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if kind == "cuda" and (cpp_extension.CUDA_HOME is None or not Path(cpp_extension.CUDA_HOME, "bin", "nvcc").exists()):
        return "nvcc not found (set CUDA_HOME to a CUDA toolkit)"
    return None


def _cuda_runtime_problem() -> str | None:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def extension_status(kind: str) -> tuple[bool, str]:
    """Whether extension ``kind`` can be used here, and why (not). Never compiles.

    Example:
        >>> extension_status("cpu")    # doctest: +SKIP
        (True, 'will be JIT-built on first use (no prebuilt freezeguard._C)')
    """
    k = _kind(kind)
    if kind == "cuda":
        problem = _cuda_runtime_problem()
        if problem:
            return False, problem
    if kind in _loaded:
        return True, _origin[kind]
    if kind in _failed:
        return False, _failed[kind]
    if _prebuilt_present(kind):
        return True, f"prebuilt {k.module}"
    missing = _missing_toolchain(kind)
    if missing:
        return False, f"no prebuilt {k.module} and cannot JIT-build it: {missing}"
    cache = jit_cache_dir(kind)
    if cache is not None and any(cache.glob("*.so")):
        return True, f"no prebuilt {k.module}; a JIT-built copy is cached in {cache} and loads on first use"
    return True, f"will be JIT-built on first use (no prebuilt {k.module})"


def _flags(kind: str):
    from freezeguard._csrc import freezeguard_build_flags as flags

    return flags.cpu_flags() if kind == "cpu" else flags.cuda_flags()


def _jit_name(kind: str, files: list[Path], flag_text: str) -> str:
    # Name the build after its inputs, so a changed source or flag never reuses a stale
    # cache entry and two installs of different versions never share one.
    h = hashlib.sha256(flag_text.encode())
    h.update(torch.__version__.encode())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    # The kind's own headers and the ones its folders share (csrc/op_registry.h).
    folders = [files[0].parent, files[0].parent.parent] if files else []
    for folder in folders:
        for header in sorted(folder.glob("*.h")):
            h.update(header.read_bytes())
    return f"freezeguard_{'C' if kind == 'cpu' else 'cuda'}_{h.hexdigest()[:12]}"


def _jit_spec(kind: str) -> tuple[str, dict]:
    """(cache name, compiler arguments) of a JIT build of ``kind``."""
    if kind == "cpu":
        cflags, ldflags = _flags(kind)
        kwargs = {"extra_cflags": cflags, "extra_ldflags": ldflags}
    else:
        per = _flags(kind)
        kwargs = {"extra_cflags": per.get("cxx", []), "extra_cuda_cflags": per.get("nvcc", [])}
    return _jit_name(kind, sources(kind), repr(kwargs)), kwargs


def jit_cache_dir(kind: str) -> Path | None:
    """Where a JIT build of ``kind`` lives (None if the sources are not installed); never builds."""
    from torch.utils import cpp_extension

    if not sources(kind):
        return None
    name, _ = _jit_spec(kind)
    # torch.utils.cpp_extension's layout: TORCH_EXTENSIONS_DIR/<name>, else
    # <default root>/py<version><abiflags>_<cpu|cuXY|rocmXY>/<name>
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"], name)
    if torch.version.hip is not None:
        accel = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        accel = "cu" + torch.version.cuda.replace(".", "")
    else:
        accel = "cpu"
    folder = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{accel}"
    return Path(cpp_extension.get_default_build_root(), folder, name)


def _jit_build(kind: str) -> ModuleType:
    from torch.utils import cpp_extension

    missing = _missing_toolchain(kind)
    if missing:
        raise ExtensionBuildError(f"cannot JIT-build the freezeguard {kind} extension: {missing}")
    files = sources(kind)
    name, kwargs = _jit_spec(kind)
    verbose = os.environ.get("FREEZEGUARD_BUILD_VERBOSE", "0") == "1"
    try:
        return cpp_extension.load(name=name, sources=[str(f) for f in files],
                                  extra_include_paths=[str(files[0].parent)], verbose=verbose, **kwargs)
    except Exception as exc:  # compiler errors arrive as RuntimeError/CalledProcessError
        detail = str(exc)
        if len(detail) > 2000:  # keep the compiler's last words, where the error usually is
            detail = "..." + detail[-2000:]
        raise ExtensionBuildError(
            f"JIT build of the freezeguard {kind} extension failed ({type(exc).__name__}: {detail}); "
            "set FREEZEGUARD_BUILD_VERBOSE=1 to see the whole compiler output") from exc


def load_extension(kind: str) -> ModuleType:
    """The native module for ``kind`` ("cpu" or "cuda"): prebuilt, else JIT-built once.

    Raises ExtensionBuildError saying what is missing when neither works; the failure is
    remembered so later calls (and ``extension_status``) answer at once.
    """
    k = _kind(kind)
    if kind in _loaded:
        return _loaded[kind]
    with _lock:
        if kind in _loaded:
            return _loaded[kind]
        if kind in _failed:
            raise ExtensionBuildError(_failed[kind])
        if kind == "cuda":
            problem = _cuda_runtime_problem()
            if problem:
                raise ExtensionBuildError(f"the freezeguard cuda extension cannot run: {problem}")
        prebuilt_error = ""
        if os.environ.get("FREEZEGUARD_FORCE_JIT", "0") != "1" and _prebuilt_present(kind):
            try:
                module = _import_prebuilt(k.module)
                _loaded[kind], _origin[kind] = module, f"prebuilt {k.module}"
                return module
            except ImportError as exc:  # e.g. built against another torch: rebuild instead
                prebuilt_error = f"prebuilt {k.module} failed to import ({exc}); "
        try:
            module = _jit_build(kind)
        except ExtensionBuildError as exc:
            _failed[kind] = prebuilt_error + str(exc)
            raise ExtensionBuildError(_failed[kind]) from exc
        _loaded[kind] = module
        where = Path(module.__file__).parent if getattr(module, "__file__", None) else "the torch extensions cache"
        _origin[kind] = prebuilt_error + f"JIT-built {module.__name__} (cached in {where})"
        return module


def loaded_or_prebuilt(kind: str) -> ModuleType | None:
    """The native module for ``kind`` if it is loaded or importable prebuilt, else None. Never compiles.

    For optional shortcuts (freezeguard/ops/native_shortcuts.py) that must not start a JIT build.
    """
    k = _kind(kind)
    module = _loaded.get(kind)
    if module is not None or kind in _failed or os.environ.get("FREEZEGUARD_FORCE_JIT", "0") == "1":
        return module
    # Asked on every fused op: remember a miss instead of searching the filesystem each call (a later
    # JIT build lands in _loaded, checked above).
    if kind in _no_prebuilt or (kind == "cuda" and _cuda_runtime_problem()):
        return None
    if not _prebuilt_present(kind):
        _no_prebuilt.add(kind)
        return None
    try:
        module = _import_prebuilt(k.module)
    except ImportError:  # load_extension would JIT-build a replacement; that is not ours to start
        _no_prebuilt.add(kind)
        return None
    with _lock:
        _origin.setdefault(kind, f"prebuilt {k.module}")
        return _loaded.setdefault(kind, module)


def reset(kind: str | None = None) -> None:
    """Forget loaded modules and remembered failures (tests use it)."""
    for d in (_loaded, _failed, _origin):
        for key in [kind] if kind else list(d):
            d.pop(key, None)
    if kind:
        _no_prebuilt.discard(kind)
    else:
        _no_prebuilt.clear()


__all__ = ["ExtensionBuildError", "extension_status", "load_extension", "loaded_or_prebuilt", "jit_cache_dir",
           "sources", "reset"]
