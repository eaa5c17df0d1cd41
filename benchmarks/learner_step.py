"""The learner's per-step update, fused (freezeguard ops) vs the authors' per-tensor Python loop.

Times only the update given the gradients (the forward/backward are identical in both): the
releaser update (segmented dot products, logit step, mask shift) and the simulated user's SGD
update, on the parameter list of a UNet preset. The loop is the authors' per-tensor code
(:mod:`support.authors_loop`); the fused path is what :class:`freezeguard.MaskLearner` calls.

Example:
    >>> from learner_step import compare_learner_update
    >>> r = compare_learner_update(model="tiny", repeats=1)
    >>> r["tensors"], r["releaser_speedup"] > 0
    (208, True)
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import _paths  # noqa: F401  (tests/support on sys.path)
import torch

HP = dict(T=0.2, freeze_ratio=0.2, c_sparsity=5e3, mask_lr=10.0, user_lr=1e-5)  # the authors' defaults
RELEASER_HP = {k: HP[k] for k in ("T", "freeze_ratio", "c_sparsity", "mask_lr")}
USER_HP = {k: HP[k] for k in ("T", "user_lr")}


def _median_time(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up (and, for triton, compiles)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def compare_learner_update(model: str = "tiny", device: str = "cpu", repeats: int = 5,
                           backend: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Median seconds of the releaser and user updates, fused vs loop, on a preset's tensors."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    from support import authors_loop

    from freezeguard import ops
    from freezeguard.apps.learn.logits import budget_weights, soft_mask, updated_logits
    from freezeguard.integrations.diffusers.bench_presets import build_unet

    dev = torch.device(device)
    with torch.no_grad():
        theta = [p.detach().clone() for p in build_unet(model, dev, seed=seed).parameters()]
    gen = torch.Generator().manual_seed(seed)
    delta = [torch.randn(t.shape, generator=gen).to(dev) * 1e-3 for t in theta]
    grads = [torch.randn(t.shape, generator=gen).to(dev) * 1e-3 for t in theta]
    x = torch.rand(len(theta), generator=gen).to(dev)
    weights = budget_weights([t.numel() for t in theta], "tensors", device=dev)

    def fused_releaser() -> None:
        s = ops.segment_dot(delta, grads, backend=backend)
        new = updated_logits(x, s, weights=weights, ratio=HP["freeze_ratio"], temperature=HP["T"],
                             c_sparsity=HP["c_sparsity"], mask_lr=HP["mask_lr"])
        ops.mask_shift_(theta, delta, soft_mask(new, HP["T"]) - soft_mask(x, HP["T"]), backend=backend)

    def fused_user() -> None:
        ops.user_update_(theta, delta, grads, soft_mask(x, HP["T"]), HP["user_lr"], backend=backend)

    xl = x.clone().requires_grad_(True)
    out = dict(model=model, device=device, tensors=len(theta), backend=backend,
               releaser_fused_s=_median_time(fused_releaser, dev, repeats),
               releaser_loop_s=_median_time(
                   lambda: authors_loop.releaser_update(theta, delta, xl, grads=grads, **RELEASER_HP), dev, repeats),
               user_fused_s=_median_time(fused_user, dev, repeats),
               user_loop_s=_median_time(
                   lambda: authors_loop.user_update(theta, delta, xl, grads=grads, **USER_HP), dev, repeats))
    out["releaser_speedup"] = out["releaser_loop_s"] / out["releaser_fused_s"]
    out["user_speedup"] = out["user_loop_s"] / out["user_fused_s"]
    return out
