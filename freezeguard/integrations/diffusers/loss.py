"""Per-sample diffusion training loss for diffusers UNets (the ``loss_fn`` the learner takes).

The loss is the DDPM objective of the diffusers training scripts (``train_text_to_image.py``):
noise the (latent) image at a random timestep and regress the UNet's output on the scheduler's
target, epsilon or v. Unlike those scripts it returns one value per sample (mean over C, H, W),
because FreezeAsGuard's releaser step weighs target and innocent samples differently.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")
LossFn = Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor]


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def make_loss_fn(noise_scheduler: Any, *, vae: torch.nn.Module | None = None,
                 text_encoder: torch.nn.Module | None = None) -> LossFn:
    """Build ``loss_fn(model, batch) -> Tensor[B]``, the per-sample diffusion MSE.

    ``batch`` holds ``"pixel_values"`` [B,C,H,W] in [-1, 1] (encoded by ``vae`` to
    ``latents * vae.config.scaling_factor`` when a VAE is given, used as-is for pixel-space
    models) or ``"latents"``; conditioning ``"encoder_hidden_states"`` [B,L,D] or ``"input_ids"``
    [B,L] (encoded by ``text_encoder``), or none for unconditional models; optional
    ``"class_labels"``. Optional ``"noise"`` and ``"timesteps"`` fix the randomness; otherwise
    they are drawn from ``batch["generator"]`` if present, else torch's global RNG. Other keys
    (``"is_target"``, captions) are ignored. VAE and text encoder run without gradients.

    When ``"noise"`` is given, the VAE posterior's mean is used instead of a sample, so the
    loss is a deterministic function of the batch (held-out evaluation).

    Example:
        >>> from diffusers import DDPMScheduler                      # doctest: +SKIP
        >>> loss_fn = make_loss_fn(DDPMScheduler(), vae=vae, text_encoder=text_encoder)  # doctest: +SKIP
        >>> losses = loss_fn(unet, {"pixel_values": x, "input_ids": ids})  # Tensor[B]  # doctest: +SKIP
    """
    config = noise_scheduler.config
    prediction_type = getattr(config, "prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; supported: {PREDICTION_TYPES}")
    if not hasattr(noise_scheduler, "add_noise") or not hasattr(noise_scheduler, "alphas_cumprod"):
        raise TypeError(f"{type(noise_scheduler).__name__} is not a DDPM-type scheduler "
                        "(needs add_noise and alphas_cumprod); use e.g. DDPMScheduler.from_config(...)")
    num_timesteps = int(config.num_train_timesteps)

    def encode_images(batch: Mapping[str, Any]) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"]
        if "pixel_values" not in batch:
            raise KeyError("batch needs 'pixel_values' or 'latents'")
        pixels = batch["pixel_values"]
        if vae is None:
            return pixels
        vdev, vdtype = _model_device_dtype(vae)
        with torch.no_grad():
            dist = vae.encode(pixels.to(vdev, vdtype)).latent_dist
            latents = dist.mode() if "noise" in batch else dist.sample(generator=batch.get("generator"))
        return latents * vae.config.scaling_factor

    def encode_text(batch: Mapping[str, Any]) -> torch.Tensor | None:
        if "encoder_hidden_states" in batch:
            return batch["encoder_hidden_states"]
        if "input_ids" not in batch:
            return None
        if text_encoder is None:
            raise ValueError("batch has 'input_ids' but make_loss_fn got no text_encoder to encode them")
        tdev, _ = _model_device_dtype(text_encoder)
        with torch.no_grad():
            return text_encoder(batch["input_ids"].to(tdev), return_dict=False)[0]

    def loss_fn(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        device, dtype = _model_device_dtype(model)
        latents = encode_images(batch).to(device, torch.float32)
        bsz = latents.shape[0]
        gen = batch.get("generator")
        noise = batch.get("noise")
        rng_device = gen.device if gen is not None else device
        if noise is None:
            noise = torch.randn(latents.shape, generator=gen, device=rng_device)
        noise = noise.to(device, torch.float32)
        if noise.shape != latents.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != latents shape {tuple(latents.shape)}")
        timesteps = batch.get("timesteps")
        if timesteps is None:
            timesteps = torch.randint(0, num_timesteps, (bsz,), generator=gen, device=rng_device)
        timesteps = torch.as_tensor(timesteps).to(device).long().reshape(-1)
        if timesteps.numel() != bsz:
            raise ValueError(f"got {timesteps.numel()} timesteps for a batch of {bsz}")

        # Noising and targets in fp32: the scheduler's sqrt(1 - alpha_bar) is tiny at small t.
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if prediction_type == "epsilon":
            target = noise
        else:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)

        kwargs = {}
        cond = encode_text(batch)
        if cond is not None:
            kwargs["encoder_hidden_states"] = cond.to(device, dtype)
        if batch.get("class_labels") is not None:
            kwargs["class_labels"] = batch["class_labels"].to(device)
        pred = model(noisy.to(dtype), timesteps, return_dict=False, **kwargs)[0]
        per_elem = F.mse_loss(pred.float(), target, reduction="none")
        return per_elem.mean(dim=tuple(range(1, per_elem.ndim)))

    loss_fn.prediction_type = prediction_type  # type: ignore[attr-defined]
    return loss_fn
