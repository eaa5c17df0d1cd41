"""Build script: the package, plus the native extensions when a toolchain is present.

Environment switches (read at build time):
  FREEZEGUARD_SKIP_BUILD=1   build no native extension (they are JIT-built on first use instead)
  FREEZEGUARD_SKIP_CUDA=1    build the C++ CPU extension but not the CUDA one
  MAX_JOBS=N                 parallel compile jobs (default: from free memory, at most the cores)
"""
from __future__ import annotations

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CSRC = "csrc"


def _default_max_jobs() -> str:
    # Like flash-attention: a small machine thrashes if every core runs a 2 GB compiler.
    try:
        free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        free_gb = 4.0
    return str(max(1, min(os.cpu_count() or 1, int(free_gb // 2))))


def _relative_sources(subdir: str, pattern: str) -> list[str]:
    # setuptools refuses absolute source paths; they must be relative to setup.py.
    return sorted((Path(CSRC) / subdir / p.name).as_posix() for p in (ROOT / CSRC / subdir).glob(pattern))


def _native_extensions():
    if os.environ.get("FREEZEGUARD_SKIP_BUILD", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("freezeguard: torch is not importable at build time; skipping native extensions "
              "(install with --no-build-isolation to build them now; otherwise they JIT-build on first use)")
        return [], {}
    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    from freezeguard_build_flags import cpu_flags, cuda_flags  # noqa: E402  (csrc/, see below)

    cflags, ldflags = cpu_flags()
    exts = [cpp_extension.CppExtension(
        "freezeguard._C",
        sources=_relative_sources("cpu", "*.cpp"),
        extra_compile_args={"cxx": cflags},
        extra_link_args=ldflags,
    )]
    want_cuda = os.environ.get("FREEZEGUARD_SKIP_CUDA", "0") != "1"
    if want_cuda and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        cuda_sources = _relative_sources("cuda", "*.c*")
        exts.append(cpp_extension.CUDAExtension(
            "freezeguard._cuda", sources=cuda_sources,
            extra_compile_args=cuda_flags(),
        ))
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


import sys  # noqa: E402

sys.path.insert(0, str(ROOT / CSRC))
ext_modules, cmdclass = _native_extensions()

# The raw sources ship as data of freezeguard._csrc (JIT builds read them); their folders are
# listed as packages too, so setuptools installs them without its "absent from packages" warning.
CSRC_PACKAGES = {"freezeguard._csrc": CSRC, "freezeguard._csrc.cpu": f"{CSRC}/cpu", "freezeguard._csrc.cuda": f"{CSRC}/cuda"}

setup(
    packages=find_packages(include=["freezeguard", "freezeguard.*"]) + ["freezeguard.kernels", *CSRC_PACKAGES],
    # The raw Triton kernels live in kernels/triton/ but install as freezeguard.kernels. kernels/
    # itself has no __init__.py: run from the repository root (the current folder on sys.path), a
    # regular package there would shadow the package-index `kernels` that transformers imports,
    # while a bare folder is only a namespace portion that any installed `kernels` wins over.
    package_dir={"freezeguard.kernels": "kernels/triton", **CSRC_PACKAGES},
    package_data={"freezeguard.backends": ["*.json"], "freezeguard._csrc": ["*.py", "*.h"],
                  "freezeguard._csrc.cpu": ["*.cpp", "*.h"], "freezeguard._csrc.cuda": ["*.cu", "*.cpp", "*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
