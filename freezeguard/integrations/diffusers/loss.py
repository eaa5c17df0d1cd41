"""Per-sample diffusion training loss for diffusers denoisers (the ``loss_fn`` the learner takes).

Three objectives, as the diffusers training scripts train each family
(:mod:`freezeguard.integrations.diffusers.models`):

- ``epsilon`` (SD-1.x, SDXL; ``train_text_to_image.py``): x_t = sqrt(a_t) x + sqrt(1 - a_t) n at a
  random DDPM timestep t, target n;
- ``v_prediction`` (SD-2.x 768-v): same x_t, target v = sqrt(a_t) n - sqrt(1 - a_t) x;
- ``flow_matching`` (rectified flow: SD3, Flux; ``train_dreambooth_sd3.py`` / ``_flux.py``):
  x_s = (1 - s) x + s n at a sigma s of the ``FlowMatchEulerDiscreteScheduler`` (drawn uniformly
  over its training sigmas), timestep s * num_train_timesteps, target n - x.

Unlike those scripts it returns one value per sample (mean over C, H, W), because FreezeAsGuard's
releaser step weighs target and innocent samples differently.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from freezeguard.integrations.diffusers.models import ModelFamily, family_of, get_family

PREDICTION_TYPES = ("epsilon", "v_prediction")
OBJECTIVES = PREDICTION_TYPES + ("flow_matching",)
LossFn = Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor]


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def objective_of(noise_scheduler: Any) -> str:
    """``flow_matching`` for a flow-matching scheduler, else the scheduler's ``prediction_type``."""
    if "FlowMatch" in type(noise_scheduler).__name__:
        return "flow_matching"
    return getattr(noise_scheduler.config, "prediction_type", "epsilon")


def make_loss_fn(noise_scheduler: Any, *, vae: torch.nn.Module | None = None,
                 text_encoder: torch.nn.Module | None = None, family: Any = None,
                 prompt_encoder: Callable[[list[str]], Mapping[str, torch.Tensor]] | None = None) -> LossFn:
    """Build ``loss_fn(model, batch) -> Tensor[B]``, the per-sample diffusion MSE.

    The objective follows the scheduler (:func:`objective_of`): a ``DDPMScheduler`` with
    ``prediction_type`` epsilon or v_prediction, or a ``FlowMatchEulerDiscreteScheduler``. The
    forward call follows the model (``family``: a :class:`~freezeguard.integrations.diffusers.models.ModelFamily`
    or its name; by default found from the model at each call, :func:`~freezeguard.integrations.diffusers.models.family_of`):
    SDXL, SD3 and Flux read precomputed ``"pooled_projections"`` (and the other keys listed in
    :mod:`freezeguard.integrations.diffusers.models`) from the batch, or get them from
    ``prompt_encoder(batch["caption"])`` (e.g. :class:`~freezeguard.integrations.diffusers.pipeline.PromptEncoder`,
    a pipeline's ``encode_prompt``), which runs without gradients.

    ``batch`` holds ``"pixel_values"`` [B,C,H,W] in [-1, 1] (encoded by ``vae`` to
    ``latents * vae.config.scaling_factor`` when a VAE is given, used as-is for pixel-space
    models) or ``"latents"``; conditioning ``"encoder_hidden_states"`` [B,L,D] or ``"input_ids"``
    [B,L] (encoded by ``text_encoder``), or none for unconditional models; optional
    ``"class_labels"``. Optional ``"noise"`` and ``"timesteps"`` (flow matching: ``"sigmas"`` in
    (0, 1], or ``"timesteps"`` = sigma * num_train_timesteps) fix the randomness; otherwise
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
    prediction_type = objective_of(noise_scheduler)
    if prediction_type not in OBJECTIVES:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; supported: {OBJECTIVES}")
    flow = prediction_type == "flow_matching"
    if not flow and (not hasattr(noise_scheduler, "add_noise") or not hasattr(noise_scheduler, "alphas_cumprod")):
        raise TypeError(f"{type(noise_scheduler).__name__} is not a DDPM-type scheduler "
                        "(needs add_noise and alphas_cumprod); use e.g. DDPMScheduler.from_config(...)")
    num_timesteps = int(config.num_train_timesteps)
    if flow:
        train_sigmas = noise_scheduler.sigmas.detach().float().cpu().clone()
    def _family(model: torch.nn.Module) -> ModelFamily:
        try:
            return family_of(model, prediction_type)
        except TypeError:  # any other UNet-like module: called as UNet2DConditionModel is
            return get_family("sd15")

    fixed_family = get_family(family) if isinstance(family, str) else family
    if fixed_family is not None and not isinstance(fixed_family, ModelFamily):
        raise TypeError(f"family must be a ModelFamily or its name, got {type(family).__name__}")

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
        shift = getattr(vae.config, "shift_factor", None)  # SD3 / Flux VAEs
        if shift is not None:
            latents = latents - shift
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
        if flow:
            sigmas, timesteps = _flow_sigmas(batch, bsz, gen, rng_device, train_sigmas, num_timesteps)
            sigmas = sigmas.to(device)
            timesteps = timesteps.to(device)
            s = sigmas.view(bsz, *([1] * (latents.ndim - 1)))
            noisy = (1.0 - s) * latents + s * noise
            target = noise - latents
        else:
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

        cond = dict(batch)
        if prompt_encoder is not None and "encoder_hidden_states" not in batch and batch.get("caption") is not None:
            with torch.no_grad():
                cond.update(prompt_encoder(list(batch["caption"])))
        else:
            text = encode_text(batch)
            if text is not None:
                cond["encoder_hidden_states"] = text
        fam = fixed_family or _family(model)
        pred = fam.forward(model, noisy.to(dtype), timesteps, cond)
        per_elem = F.mse_loss(pred.float(), target, reduction="none")
        return per_elem.mean(dim=tuple(range(1, per_elem.ndim)))

    loss_fn.prediction_type = prediction_type  # type: ignore[attr-defined]
    return loss_fn


def _flow_sigmas(batch: Mapping[str, Any], bsz: int, gen: torch.Generator | None, rng_device: torch.device,
                 train_sigmas: torch.Tensor, num_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sigma in (0, 1] and the model's timestep sigma * num_train_timesteps."""
    if batch.get("sigmas") is not None:
        sigmas = torch.as_tensor(batch["sigmas"], dtype=torch.float32).reshape(-1)
    elif batch.get("timesteps") is not None:
        sigmas = torch.as_tensor(batch["timesteps"], dtype=torch.float32).reshape(-1) / num_timesteps
    else:
        # train_dreambooth_sd3.py with weighting_scheme "none": u ~ U[0, 1), one of the scheduler's sigmas
        u = torch.rand(bsz, generator=gen, device=rng_device).cpu()
        idx = (u * len(train_sigmas)).long().clamp_(max=len(train_sigmas) - 1)
        sigmas = train_sigmas[idx]
    if sigmas.numel() != bsz:
        raise ValueError(f"got {sigmas.numel()} sigmas for a batch of {bsz}")
    if not bool(((sigmas >= 0) & (sigmas <= 1)).all()):
        raise ValueError("flow-matching sigmas must lie in [0, 1]")
    return sigmas, sigmas * num_timesteps
