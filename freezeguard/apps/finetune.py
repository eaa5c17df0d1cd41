"""The fine-tune loop behind ``freezeguard finetune``: full (publisher) or guarded (user).

The publisher's full fine-tune on target + innocent data gives θ_ft, the second end point of
mask learning (docs/DESIGN.md section 4). With a mask, the same loop is a *guarded* user fine-tune:
``fg.guard`` freezes the masked tensors and returns the fused ``fg.optim.AdamW``, so frozen
tensors get no gradient, no optimizer state and stay bit-identical.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from freezeguard.core.guard import make_adamw
from freezeguard.core.training import train_steps
from freezeguard.integrations.diffusers.data import mixed_batches
from freezeguard.integrations.diffusers.loss import make_loss_fn

MIXED_PRECISION = ("no", "bf16")


@dataclass
class FinetuneResult:
    """What a fine-tune run did: per-step mean / target / innocent losses and its cost."""

    losses: list[float] = field(default_factory=list)
    target_losses: list[float] = field(default_factory=list)   # NaN where a batch had none
    innocent_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    trainable_tensors: int = 0
    frozen_tensors: int = 0
    trainable_params: int = 0
    peak_memory_bytes: int | None = None  # CUDA only

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict (losses rounded to 6 significant digits; NaN becomes None)."""
        def clean(xs):
            return [None if math.isnan(x) else float(f"{x:.6g}") for x in xs]

        return {"steps": len(self.losses), "final_loss": clean(self.losses[-1:])[0] if self.losses else None,
                "losses": clean(self.losses), "target_losses": clean(self.target_losses),
                "innocent_losses": clean(self.innocent_losses), "seconds": round(self.seconds, 3),
                "device": self.device, "trainable_tensors": self.trainable_tensors,
                "frozen_tensors": self.frozen_tensors, "trainable_params": self.trainable_params,
                "peak_memory_bytes": self.peak_memory_bytes}


def _check_options(steps: int, lr: float, batch_size: int, mixed_precision: str) -> None:
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not (float(lr) > 0 and math.isfinite(float(lr))):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")


def _split_mean(losses: torch.Tensor, flags: torch.Tensor) -> float:
    return float(losses[flags].mean()) if bool(flags.any()) else float("nan")


def finetune(components: Any, target_ds: Any, innocent_ds: Any = None, *, steps: int, lr: float = 1e-5,
             batch_size: int = 4, seed: int = 0, mask: Any = None, weight_decay: float = 1e-2,
             mixed_precision: str = "no", gradient_checkpointing: bool = False, lean_frozen_convs: bool = False,
             device: str | torch.device | None = None, progress: bool = True,
             log: Callable[[dict[str, Any]], None] | None = None) -> FinetuneResult:
    """Fine-tune ``components.unet`` in place with AdamW on seeded mixed batches.

    ``components`` is a :class:`freezeguard.integrations.diffusers.SDComponents`; ``target_ds`` /
    ``innocent_ds`` are :class:`freezeguard.integrations.diffusers.ImageFolderDataset` (``innocent_ds`` may
    be None). ``mask`` (a ``FreezeMask``) makes it a guarded fine-tune through ``fg.guard``, with
    ``lean_frozen_convs`` passed on to it (frozen convs keep no input for backward).
    ``mixed_precision="bf16"`` runs forward/backward under bf16 autocast with fp32 weights.
    ``log`` gets one dict per step (step, loss, target_loss, innocent_loss).

    Example:
        >>> comps = load_components("models/tiny-sd")                                 # doctest: +SKIP
        >>> ds = ImageFolderDataset("data/sks", role="target", tokenizer=comps.tokenizer)  # doctest: +SKIP
        >>> result = finetune(comps, ds, steps=100, lr=1e-4)                          # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    _check_options(steps, lr, batch_size, mixed_precision)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unet = components.unet
    components.to(device)
    torch.manual_seed(seed)
    if gradient_checkpointing:
        if not hasattr(unet, "enable_gradient_checkpointing"):
            raise ValueError(f"{type(unet).__name__} does not support gradient checkpointing")
        unet.enable_gradient_checkpointing()
    unet.train()

    if mask is None:
        unet.requires_grad_(True)
    optimizer = make_adamw(unet, mask, lr=lr, weight_decay=weight_decay, lean_frozen_convs=lean_frozen_convs)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    result = FinetuneResult(device=str(device), trainable_tensors=len(trainable),
                            frozen_tensors=sum(1 for _ in unet.parameters()) - len(trainable),
                            trainable_params=sum(p.numel() for p in trainable))

    loss_fn = make_loss_fn(components.noise_scheduler, vae=components.vae, text_encoder=components.text_encoder,
                           prompt_encoder=getattr(components, "prompt_encoder", None))
    # Noise and timesteps come from their own seeded generator, so a run is reproducible
    # whatever else draws from the global RNG (dropout, other libraries).
    gen = torch.Generator(device=device).manual_seed(int(seed))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="finetune" + (" (guarded)" if mask is not None else ""),
               disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def record(step: int, per_sample: torch.Tensor, batch: Mapping[str, Any]) -> None:
        flags = batch["is_target"].to(per_sample.device)
        losses = per_sample.float()
        entry = {"step": step, "loss": float(losses.mean()), "target_loss": _split_mean(losses, flags),
                 "innocent_loss": _split_mean(losses, ~flags)}
        result.losses.append(entry["loss"])
        result.target_losses.append(entry["target_loss"])
        result.innocent_losses.append(entry["innocent_loss"])
        if log is not None:
            log(entry)

    try:
        train_steps(unet, optimizer, iter(mixed_batches(target_ds, innocent_ds, batch_size, seed, steps=steps)),
                    loss_fn, steps, generator=gen, autocast=autocast, on_step=record, progress=bar)
    finally:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
    result.seconds = time.perf_counter() - start
    unet.eval()
    return result
