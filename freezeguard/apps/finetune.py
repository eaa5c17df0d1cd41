"""The fine-tune behind ``freezeguard finetune``: full (publisher) or guarded (user).

The publisher's full fine-tune on target + innocent data gives θ_ft, the second end point of
mask learning (docs/DESIGN.md section 4). With a mask, the same loop is a *guarded* user fine-tune:
``fg.guard`` freezes the masked tensors and returns the fused ``fg.optim.AdamW``, so frozen
tensors get no gradient, no optimizer state and stay bit-identical.

``finetune`` is the loop on loaded components; ``finetune_folder`` the whole command on a local
pipeline folder: every input checked before any model loads, then the loop, then a copy of the
pipeline with the fine-tuned denoiser and the per-step log, swapped in whole.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from freezeguard.core import files
from freezeguard.core.guard import make_adamw
from freezeguard.core.mask import FreezeMask, describe_layout_mismatch
from freezeguard.core.training import train_steps
from freezeguard.core.weights import weights_layout
from freezeguard.integrations.diffusers import pipeline
from freezeguard.integrations.diffusers.data import DatasetError, ImageFolderDataset, mixed_batches
from freezeguard.integrations.diffusers.loss import make_loss_fn

MIXED_PRECISION = ("no", "bf16")
LOG_NAME = "finetune_log.jsonl"


class FinetuneError(ValueError):
    """Bad input to :func:`finetune_folder` (said before any model loads), or a run that failed
    (an earlier output is then left unchanged); the message names the ``freezeguard finetune`` flag."""


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


def check_finetune_inputs(model: str | Path, train_data: str | Path, out: str | Path, *,
                          innocent_data: str | Path | None = None, mask: str | Path | None = None, steps: int,
                          lr: float, weight_decay: float, batch_size: int, mixed_precision: str,
                          resolution: int | None, lean_frozen_convs: bool) -> Path:
    """Every check that needs no model loaded (the mask's fit from file headers); returns the pipeline folder."""
    try:
        _check_options(steps, lr, batch_size, mixed_precision)
        if not (weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"--weight-decay must be a number >= 0, got {weight_decay}")
        if resolution is not None and resolution < 1:
            raise ValueError(f"--resolution must be >= 1, got {resolution}")
        src = pipeline.check_pipeline_folder(model)
        out = Path(out)
        if lean_frozen_convs and not mask:
            raise ValueError("--lean-frozen-convs needs --mask (only frozen convs can drop their saved input)")
        if out.resolve() == src.resolve():
            raise ValueError("--out must differ from --model (the released model is never overwritten)")
        for flag, path in (("--train-data", train_data), ("--innocent-data", innocent_data)):
            if path is not None and not Path(path).is_dir():
                raise DatasetError(f"{flag} {path} does not exist (or is not a folder)")
        if mask is not None and not Path(mask).is_file():
            raise ValueError(f"--mask {mask} does not exist")
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not (out / LOG_NAME).is_file():
            # the new output replaces the folder whole: only an earlier run's output may go
            raise ValueError(f"--out {out} is a folder that no earlier `freezeguard finetune` wrote (it has no "
                             f"{LOG_NAME}); give a new or empty folder, so nothing of yours is replaced")
        files.check_outputs({"--out": out}, {"--model": src, "--train-data": train_data,
                                             "--innocent-data": innocent_data, "--mask": mask})
        if mask is not None:  # the mask file and its fit, from file headers, before any model loads
            early = FreezeMask.load(mask)
            sub = pipeline.denoiser_subfolder(src)
            unet_layout = weights_layout(src / sub, f"--model {sub}")
            mismatch = describe_layout_mismatch(early.layout,
                                                {k: v for k, v in unet_layout.items() if k in early.layout},
                                                missing="missing from the model", extra="", reshaped="reshaped")
            if mismatch:
                raise ValueError(f"--mask {mask}: mask was made for a different model ({mismatch})")
    except (ValueError, DatasetError, pipeline.PipelineError) as exc:
        raise FinetuneError(str(exc)) from None
    return src


def finetune_folder(model: str | Path, train_data: str | Path, out: str | Path, *,
                    innocent_data: str | Path | None = None, mask: str | Path | None = None, steps: int = 100,
                    lr: float = 1e-5, weight_decay: float = 1e-2, batch_size: int = 4, seed: int = 0,
                    resolution: int | None = None, caption_column: str = "text", mixed_precision: str = "no",
                    gradient_checkpointing: bool = False, lean_frozen_convs: bool = False,
                    device: str | torch.device | None = None, progress: bool = True,
                    on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """``freezeguard finetune`` as a function: fine-tune the denoiser of the local pipeline ``model``
    on image folders and write a copy of the pipeline with it to ``out``; returns a JSON-ready summary.

    Inputs are checked before any model loads (:func:`check_finetune_inputs`); ``mask`` (a mask
    file) makes it a guarded fine-tune. The per-step log (``out/finetune_log.jsonl``) is written
    beside ``out`` while the model trains and the finished output is swapped in whole, so a failed
    or interrupted run leaves an earlier output exactly as it was. ``on_step`` gets each step's
    record (step, loss, target_loss, innocent_loss; NaN where a batch had no such sample).
    Raises :class:`FinetuneError` for bad input or a failed run.

    Example:
        >>> summary = finetune_folder("sd15/", "data/target", "sd15-ft/", innocent_data="data/innocent",
        ...                           steps=400)                                         # doctest: +SKIP
    """
    src = check_finetune_inputs(model, train_data, out, innocent_data=innocent_data, mask=mask, steps=steps, lr=lr,
                                weight_decay=weight_decay, batch_size=batch_size, mixed_precision=mixed_precision,
                                resolution=resolution, lean_frozen_convs=lean_frozen_convs)
    out = Path(out)
    try:
        comps = pipeline.load_components(src, dtype=torch.float32)
        data_kwargs = {"resolution": resolution, "tokenizer": comps.tokenizer, "caption_column": caption_column}
        target = ImageFolderDataset(train_data, role="target", **data_kwargs)
        innocent = ImageFolderDataset(innocent_data, role="innocent", **data_kwargs) if innocent_data else None
        guard_mask = FreezeMask.load(mask, model=comps.unet) if mask is not None else None
    except (ValueError, KeyError, DatasetError, pipeline.PipelineError) as exc:
        raise FinetuneError(str(exc).strip("'\"")) from None

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.{LOG_NAME}.", suffix=".tmp", dir=out.parent)
    tmp_log = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as log_file:
            def log(record: dict) -> None:
                # NaN (a batch without target or innocent samples) is not JSON: write null.
                log_file.write(json.dumps({k: (None if v != v else v) for k, v in record.items()}) + "\n")
                if on_step is not None:
                    on_step(record)

            try:
                result = finetune(comps, target, innocent, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                                  mask=guard_mask, weight_decay=weight_decay, mixed_precision=mixed_precision,
                                  gradient_checkpointing=gradient_checkpointing, lean_frozen_convs=lean_frozen_convs,
                                  device=device, progress=progress, log=log)
            except (ValueError, FloatingPointError) as exc:
                raise FinetuneError(str(exc)) from None
        comps.unet.to("cpu")
        try:
            pipeline.save_pipeline_with_unet(src, out, comps.unet,
                                             extra=lambda folder: os.replace(tmp_log, folder / LOG_NAME))
        except OSError as exc:
            raise FinetuneError(f"could not write {out} ({exc}); an earlier output there is unchanged") from None
    finally:
        tmp_log.unlink(missing_ok=True)
    return {"out": str(out), "model": str(src), "mask": None if mask is None else str(mask),
            "guarded": guard_mask is not None, "train_images": len(target),
            "innocent_images": len(innocent) if innocent else 0, "log": str(out / LOG_NAME), **result.summary()}
