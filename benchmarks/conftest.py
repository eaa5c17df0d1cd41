"""Shared set-up of the op benchmarks (pytest-benchmark; not part of the default test run).

Run (CPU):   pytest benchmarks/bench_ops.py --benchmark-json=bench.json
             python benchmarks/report.py bench.json          # Markdown table of ratios
Run (GPU):   the same; the CUDA benchmarks run when a GPU is visible (full-size UNet list).

Each benchmark records in ``extra_info``: ``impl`` (what ran), ``role`` ("anchor" for the
baselines a user would otherwise use, "candidate" for freezeguard), ``bytes`` (memory an
ideal single pass moves, for effective GB/s) and, on CUDA, ``peak_mem_bytes``. Ratios are
only ever taken between benchmarks of one group, measured in the same run.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # `import _shapes` from the benchmark files
import _paths  # noqa: E402,F401  (tests/support: the authors' loop and fixtures)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_addoption(parser):
    parser.addoption("--fg-rounds", type=int, default=5, help="timed rounds per benchmark (default 5)")
    parser.addoption("--fg-threads", type=int, default=0,
                     help="torch.set_num_threads for the run (default: torch's choice). On a shared "
                          "machine, 1 avoids timing other people's load on the barriers of multi-threaded ops")


def pytest_configure(config):
    threads = config.getoption("--fg-threads", default=0)
    if threads:
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def run_bench(benchmark, request):
    """run_bench(fn, impl=..., role=..., nbytes=..., device=..., setup=None): time fn, record what it was."""
    rounds = request.config.getoption("--fg-rounds")

    def run(fn, *, impl: str, role: str, nbytes: int, device: str = "cpu", setup=None):
        benchmark.extra_info.update(impl=impl, role=role, bytes=int(nbytes), device=device,
                                    threads=torch.get_num_threads())
        if device == "cuda":
            def timed():
                fn()
                torch.cuda.synchronize()

            torch.cuda.reset_peak_memory_stats()
        else:
            timed = fn
        # setup (untimed) runs before every round, e.g. to give the step fresh gradients
        benchmark.pedantic(timed, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)
        if device == "cuda":
            benchmark.extra_info["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated())
            benchmark.extra_info["gpu"] = torch.cuda.get_device_name()

    return run
