"""Compiler flags shared by setup.py and the JIT builder (freezeguard/backends/_build.py)."""
from __future__ import annotations


def cpu_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for the C++ CPU extension."""
    # No -std: torch.utils.cpp_extension adds the standard its headers need (C++20 for
    # torch >= 2.10); a later -std=c++17 here would silently override it.
    # -fno-math-errno: sqrt never sets errno, so the AdamW loop vectorises (with errno
    # semantics GCC keeps a scalar sqrt per element); results are unchanged.
    return ["-O3", "-fno-math-errno", "-fopenmp"], ["-fopenmp"]


def cuda_flags() -> dict[str, list[str]]:
    """Compile flags for the CUDA extension, per compiler."""
    return {
        "cxx": ["-O3"],
        "nvcc": ["-O3", "-lineinfo",
                 "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"],
    }
