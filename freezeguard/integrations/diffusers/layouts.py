"""UNet presets for the benchmarks, built from configs (no downloads) and a synthetic batch.

``sd15`` is ``UNet2DConditionModel()`` with its default config: the SD-1.5 UNet (686 tensors,
~860M parameters). ``sd15-s`` / ``sd15-m`` keep all 686 tensors and the layout but scale the
channels down so a CPU can run them; ``tiny`` is a two-block UNet for tests.

Example:
    >>> from freezeguard.integrations.diffusers.layouts import build_unet, make_batch
    >>> unet = build_unet("tiny")
    >>> batch = make_batch(unet, batch_size=1, latent=8)
    >>> unet(**batch).sample.shape
    torch.Size([1, 4, 8, 8])
"""
from __future__ import annotations

from typing import Any

import torch

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(sample_size=16, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
                 cross_attention_dim=32, attention_head_dim=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SD-1.5 layout (686 tensors), channels scaled; cross_attention_dim stays 768 as in SD-1.5.
    "sd15-s": dict(block_out_channels=(32, 64, 128, 128)),
    "sd15-m": dict(block_out_channels=(96, 192, 384, 384)),
    "sd15": {},
}
# Latent side used when none is given: SD-1.5 trains at 512 px = 64x64 latents; CPU presets use less.
DEFAULT_LATENT = {"tiny": 16, "sd15-s": 16, "sd15-m": 32, "sd15": 64}


def build_unet(preset: str, device: str | torch.device = "cpu", seed: int = 0) -> torch.nn.Module:
    """A randomly initialised (seeded) ``UNet2DConditionModel`` of the named preset, fp32, in train mode."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    # Initialise on the target device: the full SD-1.5 UNet takes many seconds to initialise on CPU.
    with torch.device(device):
        unet = UNet2DConditionModel(**PRESETS[preset])
    return unet.train()


def make_batch(unet: torch.nn.Module, batch_size: int, latent: int, text_len: int = 77,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword arguments for ``unet(**batch)``: noisy latents, timesteps and text states (random)."""
    if batch_size < 1 or latent < 1:
        raise ValueError(f"batch_size and latent must be >= 1, got {batch_size}, {latent}")
    cfg = unet.config
    device = next(unet.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch_size, cfg.in_channels, latent, latent, generator=gen)
    states = torch.randn(batch_size, text_len, cfg.cross_attention_dim, generator=gen)
    t = torch.randint(0, 1000, (batch_size,), generator=gen)
    return {"sample": sample.to(device), "timestep": t.to(device), "encoder_hidden_states": states.to(device)}
