"""Shared test setup.

Without a GPU, the Triton kernels run under the Triton interpreter: TRITON_INTERPRET must be
set before triton.jit decorates anything, so it is set here, before any test imports them.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:  # decide without importing torch.cuda machinery twice
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one intra-op thread for a module (use: ``pytestmark = pytest.mark.usefixtures("one_thread")``).

    The test machines have 2 cores shared by parallel jobs; on these tiny models more threads only
    spin against each other (4-30x slower).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
