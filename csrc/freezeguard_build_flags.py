"""Compiler flags shared by setup.py and the JIT builder (freezeguard/backends/_build.py)."""
from __future__ import annotations


def cpu_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for the C++ CPU extension."""
    return ["-O3", "-fopenmp", "-std=c++17"], ["-fopenmp"]


def cuda_flags() -> dict[str, list[str]]:
    """Compile flags for the CUDA extension, per compiler."""
    return {
        "cxx": ["-O3", "-std=c++17"],
        "nvcc": ["-O3", "-std=c++17", "-lineinfo",
                 "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"],
    }
