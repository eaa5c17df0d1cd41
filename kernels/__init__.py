"""Raw Triton kernels, installed as ``freezeguard.kernels``. Users never import these directly."""
