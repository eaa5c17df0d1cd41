"""The one tolerance table of the test suite (docs/STYLE.md: optimi's per-dtype ``Tolerance``).

- ``KERNEL[dtype]``: a backend's result against the pure-PyTorch reference after one op. fp32:
  kernels may contract a*b+c into an FMA and reorder a division (a few ulp). bf16/fp16: one
  rounding of an fp32 result may land one or two ulp away; on top, flash-attention's rule: the
  kernel's error against an fp32 computation is at most ``lowp_factor`` x the error of the same
  math done by PyTorch in that dtype.
- ``TRAJECTORY``: a whole optimizer run (many steps, state round trips) against ``torch.optim``
  in fp32, where the per-step differences above accumulate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """How far a result may be from its reference in one storage dtype."""

    atol: float
    rtol: float
    lowp_factor: float = 2.0  # kernel error vs fp32 <= this x PyTorch-in-dtype error

    def kwargs(self) -> dict[str, float]:
        """``atol``/``rtol`` for ``torch.testing.assert_close``."""
        return {"atol": self.atol, "rtol": self.rtol}


KERNEL = {
    torch.float32: Tolerance(atol=1e-6, rtol=1e-5),
    torch.bfloat16: Tolerance(atol=1e-5, rtol=2 ** -7),
    torch.float16: Tolerance(atol=1e-4, rtol=2 ** -9),
}
TRAJECTORY = Tolerance(atol=1e-6, rtol=1e-4)
