"""Raw Triton kernels, installed as ``freezeguard.kernels``. Users never import these directly.

The ops layer reaches them through ``freezeguard.backends.triton_backend``. Modules:

* ``tables``        host-built, cached device tables (chunk layout, data-pointer table);
* ``addressing``    device helpers: chunk coordinates, typed pointers, rounding to storage;
* ``adamw``         masked AdamW;
* ``learner``       segment_dot, mask_shift_, user_update_;
* ``launch``        per-op (BLOCK, num_warps) and small launch helpers;
* ``compile_check`` compile every kernel for a GPU target without a GPU (CI);
* ``tune_gpu``      BLOCK x num_warps sweep against the anchors, on a GPU.

Importing this package imports nothing heavy; the kernel modules import triton.
"""
