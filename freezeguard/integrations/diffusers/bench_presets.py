"""Model presets for the benchmarks, built from configs (no downloads), and a synthetic batch.

``sd15`` is the SD-1.5 UNet (686 tensors, 859.5M parameters: diffusers' default
``UNet2DConditionModel`` config with SD-1.5's cross_attention_dim 768). ``sd15-s`` / ``sd15-m``
keep all 686 tensors and the layout but scale the channels down so a CPU can run them (they keep
diffusers' default cross_attention_dim 1280, as the figures in benchmarks/RESULTS.md were measured);
``tiny`` is a two-block UNet for tests. ``sd21-tiny``, ``sdxl-tiny``, ``sd3-tiny`` and ``flux-tiny``
are the tiny configs of the model families (:mod:`freezeguard.integrations.diffusers.models`);
the family names themselves (``sd21``, ``sdxl``, ``sd3``, ``flux``) are the full-size models, which
``freezeguard bench`` costs from their meta-device layout (:data:`LAYOUT_ONLY`).

Example:
    >>> from freezeguard.integrations.diffusers.bench_presets import build_unet, make_batch
    >>> unet = build_unet("tiny")
    >>> batch = make_batch(unet, batch_size=1, latent=8)
    >>> unet(**batch).sample.shape
    torch.Size([1, 4, 8, 8])
"""
from __future__ import annotations

from typing import Any

import torch

from freezeguard.integrations.diffusers.models import family_of, get_family

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(sample_size=16, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
                 cross_attention_dim=32, attention_head_dim=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SD-1.5 layout (686 tensors), channels scaled (diffusers' default cross_attention_dim 1280).
    "sd15-s": dict(block_out_channels=(32, 64, 128, 128)),
    "sd15-m": dict(block_out_channels=(96, 192, 384, 384)),
    "sd15": dict(cross_attention_dim=768),
}
#: tiny configs of the model families: preset name -> family
FAMILY_PRESETS = {"sd21-tiny": "sd21", "sdxl-tiny": "sdxl", "sd3-tiny": "sd3", "flux-tiny": "flux"}
#: full-size families without a preset of their own: costed from the meta-device layout only
LAYOUT_ONLY = ("sd21", "sdxl", "sd3", "flux")
# Latent side used when none is given: SD-1.5 trains at 512 px = 64x64 latents; CPU presets use less.
DEFAULT_LATENT = {"tiny": 16, "sd15-s": 16, "sd15-m": 32, "sd15": 64, **{k: 8 for k in FAMILY_PRESETS}}


def preset_names() -> list[str]:
    """Every name ``build_model`` takes."""
    return sorted(PRESETS) + sorted(FAMILY_PRESETS) + list(LAYOUT_ONLY)


def build_model(preset: str, device: str | torch.device = "cpu", seed: int = 0) -> torch.nn.Module:
    """A randomly initialised (seeded) denoiser of the named preset, fp32, in train mode.

    A full-size family (:data:`LAYOUT_ONLY`) is built on ``device`` as asked: use ``"meta"`` for
    its names and shapes (nothing allocated).
    """
    if preset in FAMILY_PRESETS or preset in LAYOUT_ONLY:
        size = "tiny" if preset in FAMILY_PRESETS else "full"
        return get_family(FAMILY_PRESETS.get(preset, preset)).build(size, device=device, seed=seed)
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {preset_names()}")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    # Initialise on the target device: the full SD-1.5 UNet takes many seconds to initialise on CPU.
    with torch.device(device):
        unet = UNet2DConditionModel(**PRESETS[preset])
    return unet.train()


def build_unet(preset: str, device: str | torch.device = "cpu", seed: int = 0) -> torch.nn.Module:
    """The UNet presets' original name for :func:`build_model`."""
    return build_model(preset, device, seed)


def make_batch(unet: torch.nn.Module, batch_size: int, latent: int, text_len: int = 77,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs: noisy latents ``sample``, ``timestep`` and the model's conditioning.

    For a plain ``UNet2DConditionModel`` these are exactly ``unet(**batch)``'s keyword arguments;
    for every model, :func:`predict` runs the forward on them.
    """
    if batch_size < 1 or latent < 1:
        raise ValueError(f"batch_size and latent must be >= 1, got {batch_size}, {latent}")
    fam = family_of(unet)
    device = next(unet.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch_size, fam.latent_channels(unet), latent, latent, generator=gen)
    cond = fam.conditioning(unet, batch_size, text_len=text_len, generator=gen)
    t = torch.randint(0, 1000, (batch_size,), generator=gen)
    return {"sample": sample.to(device), "timestep": t.to(device), **{k: v.to(device) for k, v in cond.items()}}


def predict(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The denoiser's output for a :func:`make_batch` batch (same shape as ``batch["sample"]``)."""
    return family_of(model).forward(model, batch["sample"], batch["timestep"], batch)
