"""Raw Triton kernels (``kernels/triton/``), installed as ``freezeguard.kernels``. Users never import these directly.

The ops layer reaches them through ``freezeguard.backends.triton_backend``. Modules:

* ``tables``        host-built, cached device tables (chunk layout, data-pointer table);
* ``addressing``    device helpers: chunk coordinates, typed pointers, rounding to storage;
* ``adamw``         masked AdamW;
* ``mask_updates``  the mask-learning ops: segment_dot, mask_shift_, user_update_;
* ``launch``        per-op (BLOCK, num_warps) and the launch every op shares (tables, then one
                    launch per dtype group).

Development tools that drive these kernels live outside the package: the compile check for a GPU
target without a GPU in ``tests/support/triton_compile_check.py``, the BLOCK x num_warps sweep
in ``benchmarks/tune_triton.py``.

Importing this package imports nothing heavy; the kernel modules import triton.
"""
