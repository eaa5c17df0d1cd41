"""One fine-tuning configuration measured: forward + backward + optimizer step of a denoiser.

A configuration is a plain dict (JSON-able, so it can be measured in a fresh subprocess)::

    {"model": "sd15-s", "device": "cpu", "batch": 1, "latent": 16, "steps": 5, "warmup": 2,
     "mode": "full" | "guard", "ratio": 0.3, "by": "tensors", "mask_path": None,
     "bf16": False, "checkpointing": False, "seed": 0, "backend": "auto", "lean_frozen_convs": False}

``full`` is the baseline a user would otherwise run: ``torch.optim.AdamW`` (fused where this
torch supports it for the device, else foreach). ``guard`` is ``fg.guard(model, mask)`` with a
random mask of ``ratio`` (or the mask file at ``mask_path``, a learned mask).

Memory. On CUDA, ``peak_bytes`` is ``torch.cuda.max_memory_allocated`` over the timed steps
minus the memory allocated before the first step (model + batch): what fine-tuning adds on top of
holding the model. On CPU there is no allocator counter; ``peak_bytes`` is the peak RSS delta
(``ru_maxrss`` after the steps minus the resident set before the first step), which is only
meaningful when the configuration runs alone in a fresh process (``isolate=True`` in
:func:`freezeguard.apps.bench.run_bench`); in-process it is reported as None. ``grad_bytes`` and
``state_bytes`` are exact sums of the ``.grad`` tensors and the optimizer state after a step;
``opt_step_s`` is the optimizer step's wall time (synchronised before and after); ``opt_host_s``
is the time until ``step()`` returns (the host's work: Python, checks, launches) and, on CUDA,
``opt_device_s`` the step's span on the stream between two CUDA events (None on the CPU, where
host and device are one). Gradients are fresh tensors every step (``zero_grad(set_to_none=True)``
then backward), as in training.
``saved_bytes`` is what autograd keeps for the backward pass (tensors packed by the forward of the
last step, each storage counted once): the activations, which freezing can only shrink where a
frozen branch needs no input gradient.

Example:
    >>> from freezeguard.apps.bench_step import measure
    >>> r = measure({"model": "tiny", "mode": "guard", "ratio": 0.5, "steps": 1, "warmup": 1, "latent": 8})
    >>> r["frozen_tensors"] > 0 and r["grad_bytes"] < r["param_bytes"]
    True
"""
from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import torch

from freezeguard.apps.process_memory import rss_bytes

DEFAULTS: dict[str, Any] = dict(model="tiny", device="cpu", batch=1, latent=None, steps=5, warmup=2,
                                mode="full", ratio=0.0, by="tensors", mask_path=None, bf16=False,
                                checkpointing=False, seed=0, backend="auto", lr=1e-5,
                                lean_frozen_convs=False)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class _SavedBytes:
    """Autograd saved-tensor hooks that add up the distinct storages one forward pass keeps."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}
        self.last = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        # Parameters are saved too (for input gradients) but are not activations: skip leaves.
        if not (isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad)):
            st = t.untyped_storage()
            self.seen[st.data_ptr()] = st.nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def reset_after_step(self) -> None:
        self.last, self.seen = sum(self.seen.values()), {}


def _full_optimizer(params, device: torch.device, lr: float) -> tuple[torch.optim.Optimizer, str]:
    # torch's fused AdamW is what a tuned training script uses; older torch lacks it on CPU.
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True), "torch.optim.AdamW(fused)"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, foreach=True), "torch.optim.AdamW(foreach)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` merged over :data:`DEFAULTS`, with bad values rejected by a clear error."""
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    c = {**DEFAULTS, **cfg}
    if c["mode"] not in ("full", "guard"):
        raise ValueError(f"mode must be 'full' or 'guard', got {c['mode']!r}")
    if not 0.0 <= float(c["ratio"]) < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {c['ratio']}")
    if c["by"] not in ("tensors", "params"):
        raise ValueError(f"by must be 'tensors' or 'params', got {c['by']!r}")
    if int(c["steps"]) < 1 or int(c["warmup"]) < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {c['steps']}, {c['warmup']}")
    return c


def measure(cfg: dict[str, Any], *, track_rss: bool = False) -> dict[str, Any]:
    """Run one configuration and return its measurements (times in seconds, sizes in bytes)."""
    from freezeguard.core.guard import guard
    from freezeguard.core.mask import FreezeMask
    from freezeguard.integrations.diffusers.bench_presets import (
        DEFAULT_LATENT,
        LAYOUT_ONLY,
        build_model,
        make_batch,
        predict,
    )

    c = check_config(cfg)
    if c["model"] in LAYOUT_ONLY:
        raise ValueError(f"{c['model']} is costed from its layout only (freezeguard bench --model {c['model']}); "
                         f"real steps run on {c['model']}-tiny")
    device = torch.device(c["device"])
    unet = build_model(c["model"], device, seed=c["seed"])
    if c["checkpointing"]:
        unet.enable_gradient_checkpointing()
    batch = make_batch(unet, c["batch"], c["latent"] or DEFAULT_LATENT[c["model"]], seed=c["seed"])
    target = torch.randn_like(batch["sample"])

    mask = None
    if c["mode"] == "guard":
        if c["mask_path"]:
            mask = FreezeMask.load(c["mask_path"], model=unet)
        else:
            mask = FreezeMask.random(unet, ratio=float(c["ratio"]), by=c["by"], seed=c["seed"])

    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = rss_bytes() if track_rss else 0

    if mask is None:
        opt, impl = _full_optimizer(unet.parameters(), device, c["lr"])
    else:
        lean = bool(c["lean_frozen_convs"])  # frozen convs save no input for backward: core/lean_convs.py
        opt = guard(unet, mask, lr=c["lr"], backend=c["backend"], lean_frozen_convs=lean)
        impl = f"fg.guard({c['backend']}{', lean_frozen_convs=True' if lean else ''})"
        if lean:
            from freezeguard.core.lean_convs import LeanFrozenConv2d

            impl += f" ({sum(isinstance(m, LeanFrozenConv2d) for m in unet.modules())} lean frozen convs)"

    step_t, opt_t, host_t, dev_t, grad_bytes = [], [], [], [], 0
    saved = _SavedBytes()
    cuda = device.type == "cuda"
    if cuda:
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for i in range(int(c["warmup"]) + int(c["steps"])):
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(c["bf16"])), \
                torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            pred = predict(unet, batch)
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        if cuda:
            ev0.record()
        opt.step()
        # host: until step() returns, i.e. all the Python and launches, without waiting for kernels
        th = time.perf_counter()
        if cuda:
            ev1.record()
        _sync(device)
        t2 = time.perf_counter()
        saved.reset_after_step()
        if i >= int(c["warmup"]):
            step_t.append(t2 - t0)
            opt_t.append(t2 - t1)
            host_t.append(th - t1)
            if cuda:
                dev_t.append(ev0.elapsed_time(ev1) / 1e3)  # the step's span on the stream
        grad_bytes = _tensor_bytes(p.grad for p in unet.parameters())
        del pred, loss

    params = list(unet.parameters())
    out: dict[str, Any] = {k: c[k] for k in ("model", "device", "batch", "mode", "ratio", "by", "bf16",
                                             "checkpointing", "mask_path",
                                             "lean_frozen_convs")}
    out.update(
        impl=impl, latent=c["latent"] or DEFAULT_LATENT[c["model"]],
        tensors=len(params), param_bytes=_tensor_bytes(params),
        frozen_tensors=len(mask.frozen_names) if mask else 0,
        frozen_ratio_tensors=mask.ratio("tensors") if mask else 0.0,
        frozen_ratio_params=mask.ratio("params") if mask else 0.0,
        step_s=statistics.median(step_t), opt_step_s=statistics.median(opt_t),
        opt_host_s=statistics.median(host_t), opt_device_s=statistics.median(dev_t) if dev_t else None,
        grad_bytes=grad_bytes, saved_bytes=saved.last,
        state_bytes=_tensor_bytes(v for s in opt.state.values() for v in s.values()),
    )
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        out["peak_measure"] = "torch.cuda.max_memory_allocated - allocated before"
    elif track_rss:
        out["peak_bytes"] = max(0, _maxrss_bytes() - rss0)
        out["peak_measure"] = "peak RSS delta (fresh process)"
    else:
        out["peak_bytes"], out["peak_measure"] = None, "none (in-process on CPU)"
    return out
