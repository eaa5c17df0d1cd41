"""Model families: what freezeguard knows about each diffusers denoiser it is tested on.

One :class:`ModelFamily` per family holds the full-size config (the released model's
``unet/config.json`` or ``transformer/config.json``), a tiny config of the same class for CPU
runs, the training objective, the noise scheduler the training scripts use, and how to call the
denoiser's forward with its conditioning. Everything is built from configs: nothing is downloaded.

| family | class | tensors | parameters | objective |
| --- | --- | --- | --- | --- |
| ``sd15`` | ``UNet2DConditionModel`` | 686 | 859,520,964 | epsilon |
| ``sd21`` | ``UNet2DConditionModel`` | 686 | 865,910,724 | v_prediction |
| ``sdxl`` | ``UNet2DConditionModel`` | 1,680 | 2,567,463,684 | epsilon |
| ``sd3`` | ``SD3Transformer2DModel`` | 682 | 2,028,328,000 | flow_matching |
| ``flux`` | ``FluxTransformer2DModel`` | 1,160 | 11,901,408,320 | flow_matching |

The counts are those of the full config built on the meta device (``build(..., device="meta")``
allocates nothing); ``tests/test_models.py`` asserts them and the published sizes they round to.

Conditioning. A batch for :func:`freezeguard.integrations.diffusers.loss.make_loss_fn` carries
the text conditioning precomputed (or ``input_ids`` for the SD-1.x/2.x single text encoder):

- every family: ``"encoder_hidden_states"`` [B, L, D];
- ``sdxl``, ``sd3``, ``flux``: ``"pooled_projections"`` [B, P] (SDXL: the pooled CLIP-G text
  embedding, ``added_cond_kwargs["text_embeds"]``);
- ``sdxl``: optional ``"time_ids"`` [B, 6] (default: the latent's own size, no crop);
- ``flux`` with guidance embedding: optional ``"guidance"`` [B] (default 3.5, as FLUX.1-dev's
  training scripts use); the latents are packed into 2x2 patches and unpacked after the forward.

Example:
    >>> from freezeguard.integrations.diffusers.models import get_family
    >>> fam = get_family("flux")
    >>> model = fam.build("tiny")
    >>> cond = fam.conditioning(model, batch_size=2)
    >>> noisy = torch.randn(2, fam.latent_channels(model), 4, 4)
    >>> fam.forward(model, noisy, torch.tensor([500.0, 250.0]), cond).shape
    torch.Size([2, 4, 4, 4])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

OBJECTIVES = ("epsilon", "v_prediction", "flow_matching")

# SD-1.x / SD-2.x / SDXL share the DDPM schedule of the released scheduler_config.json files.
_SD_DDPM = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                clip_sample=False, steps_offset=1)


@dataclass(frozen=True)
class ModelFamily:
    """One denoiser family: configs, objective, scheduler and forward call.

    ``tensors`` / ``parameters`` are the full config's counts (meta device), ``published`` the
    size the model's publisher states and where, which the counts must round to.
    """

    name: str
    title: str
    class_name: str
    kind: str                       # "unet" | "sd3" | "flux": how forward is called
    objective: str                  # one of OBJECTIVES
    full_config: dict[str, Any]
    tiny_config: dict[str, Any]
    tensors: int
    parameters: int
    published: tuple[float, str]    # (parameters, source) as the publisher states them
    config_source: str
    latent_size: int                # latent side at the native training resolution
    text_len: int                   # conditioning sequence length at full size
    scheduler_config: dict[str, Any] = field(default_factory=dict)

    # -- building --------------------------------------------------------------------------
    def model_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.class_name)

    def config(self, size: str = "tiny") -> dict[str, Any]:
        if size not in ("tiny", "full"):
            raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
        return dict(self.full_config if size == "full" else self.tiny_config)

    def build(self, size: str = "tiny", device: str | torch.device = "cpu", seed: int = 0) -> torch.nn.Module:
        """The denoiser of ``size`` ("tiny" or "full"), seeded, in train mode.

        ``device="meta"`` gives the real names and shapes without allocating any weight (a
        full-size model on a real device takes its full fp32 size: 3.4 GB for SD-1.5, 48 GB for Flux).
        """
        cfg = self.config(size)
        torch.manual_seed(seed)
        with torch.device(device):
            model = self.model_class()(**cfg)
        return model.train()

    def scheduler(self) -> Any:
        """The noise scheduler of the family's training scripts (DDPM, or flow matching)."""
        if self.objective == "flow_matching":
            from diffusers import FlowMatchEulerDiscreteScheduler

            return FlowMatchEulerDiscreteScheduler(**self.scheduler_config)
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self.scheduler_config)

    # -- inputs ----------------------------------------------------------------------------
    def latent_channels(self, model: torch.nn.Module) -> int:
        """Channels of the (unpacked) latent the denoiser is trained on."""
        cin = int(_inner(model).config.in_channels)
        return cin // 4 if self.kind == "flux" else cin

    def conditioning(self, model: torch.nn.Module, batch_size: int, *, text_len: int = 8,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random precomputed conditioning of the right shapes (benchmarks and tests).

        ``text_len`` tokens (the released models use ``self.text_len``; tests use a few).
        """
        cfg = _inner(model).config
        p = next(model.parameters())
        device = p.device if p.device.type != "meta" else torch.device("cpu")
        length = int(text_len)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(device)

        if self.kind == "unet":
            out = {"encoder_hidden_states": randn(batch_size, length, int(cfg.cross_attention_dim))}
            if getattr(cfg, "addition_embed_type", None) == "text_time":
                pooled = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
                out["pooled_projections"] = randn(batch_size, pooled)
            return out
        out = {"encoder_hidden_states": randn(batch_size, length, int(cfg.joint_attention_dim)),
               "pooled_projections": randn(batch_size, int(cfg.pooled_projection_dim))}
        return out

    # -- forward ---------------------------------------------------------------------------
    def forward(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                batch: Mapping[str, Any]) -> torch.Tensor:
        """The denoiser's prediction for ``noisy`` [B, C, H, W], same shape as ``noisy``.

        ``timesteps`` are in the scheduler's units (0..num_train_timesteps; for flow matching
        sigma * num_train_timesteps). Conditioning is read from ``batch`` (module docstring).
        """
        p = next(model.parameters())
        device, dtype = p.device, p.dtype
        ehs = batch.get("encoder_hidden_states")
        ehs = ehs.to(device, dtype) if ehs is not None else None
        if self.kind == "unet":
            kwargs: dict[str, Any] = {}
            if ehs is not None:
                kwargs["encoder_hidden_states"] = ehs
            if batch.get("class_labels") is not None:
                kwargs["class_labels"] = batch["class_labels"].to(device)
            if getattr(getattr(_inner(model), "config", None), "addition_embed_type", None) == "text_time":
                kwargs["added_cond_kwargs"] = {"text_embeds": _need(batch, "pooled_projections", self).to(device, dtype),
                                               "time_ids": _sdxl_time_ids(batch, noisy).to(device, dtype)}
            return model(noisy.to(dtype), timesteps, return_dict=False, **kwargs)[0]
        pooled = _need(batch, "pooled_projections", self).to(device, dtype)
        if ehs is None:
            raise KeyError(f"{self.name}: batch needs 'encoder_hidden_states' (precomputed text conditioning)")
        if self.kind == "sd3":
            return model(hidden_states=noisy.to(dtype), timestep=timesteps.to(device), encoder_hidden_states=ehs,
                         pooled_projections=pooled, return_dict=False)[0]
        # Flux: 2x2 patches packed into tokens; timestep in [0, 1] (the model multiplies by 1000).
        b, c, h, w = noisy.shape
        if h % 2 or w % 2:
            raise ValueError(f"flux latents need even height and width, got {h}x{w}")
        packed = noisy.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=device)
        img_ids[..., 1] += torch.arange(h // 2, device=device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=device)[None, :]
        txt_ids = torch.zeros(ehs.shape[1], 3, device=device)
        kwargs = {}
        if _inner(model).config.guidance_embeds:
            g = batch.get("guidance", 3.5)
            kwargs["guidance"] = torch.as_tensor(g, dtype=torch.float32, device=device).expand(b).to(dtype)
        out = model(hidden_states=packed.to(dtype), timestep=(timesteps.to(device).float() / 1000.0).to(dtype),
                    encoder_hidden_states=ehs, pooled_projections=pooled, txt_ids=txt_ids,
                    img_ids=img_ids.reshape(-1, 3), return_dict=False, **kwargs)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _need(batch: Mapping[str, Any], key: str, fam: ModelFamily) -> torch.Tensor:
    if batch.get(key) is None:
        raise KeyError(f"{fam.name}: batch needs {key!r} (precomputed conditioning; see "
                       "freezeguard.integrations.diffusers.models)")
    return batch[key]


def _sdxl_time_ids(batch: Mapping[str, Any], noisy: torch.Tensor) -> torch.Tensor:
    if batch.get("time_ids") is not None:
        return batch["time_ids"]
    # original size, crop top-left, target size: the latent's own size in pixels (VAE factor 8)
    h, w = noisy.shape[-2] * 8, noisy.shape[-1] * 8
    return torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32).expand(noisy.shape[0], 6)


_TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                  norm_num_groups=8, cross_attention_dim=16, attention_head_dim=2,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (
    ModelFamily(
        name="sd15", title="Stable Diffusion 1.5 UNet", class_name="UNet2DConditionModel", kind="unet",
        objective="epsilon",
        # diffusers' UNet2DConditionModel defaults are SD-1.x's layout except cross_attention_dim (1280).
        full_config=dict(sample_size=64, cross_attention_dim=768),
        tiny_config=_TINY_UNET,
        tensors=686, parameters=859_520_964,
        published=(0.86e9, "Rombach et al. 2022 / CompVis model card: 860M-parameter UNet"),
        config_source="https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/blob/main/unet/config.json",
        latent_size=64, text_len=77, scheduler_config=dict(_SD_DDPM, prediction_type="epsilon")),
    ModelFamily(
        name="sd21", title="Stable Diffusion 2.1 UNet (768-v)", class_name="UNet2DConditionModel", kind="unet",
        objective="v_prediction",
        full_config=dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                         use_linear_projection=True, upcast_attention=True),
        tiny_config=dict(_TINY_UNET, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True),
        tensors=686, parameters=865_910_724,
        published=(0.86e9, "Stability-AI/stablediffusion README: SD 2 has the same U-Net size as SD 1.5 (860M)"),
        config_source="https://huggingface.co/stabilityai/stable-diffusion-2-1/blob/main/unet/config.json",
        latent_size=96, text_len=77, scheduler_config=dict(_SD_DDPM, prediction_type="v_prediction")),
    ModelFamily(
        name="sdxl", title="Stable Diffusion XL base 1.0 UNet", class_name="UNet2DConditionModel", kind="unet",
        objective="epsilon",
        full_config=dict(sample_size=128, block_out_channels=(320, 640, 1280),
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                         transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                         cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                         addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        tiny_config=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                         block_out_channels=(8, 16), norm_num_groups=8,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                         transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=16,
                         use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
                         projection_class_embeddings_input_dim=6 * 4 + 16),
        tensors=1680, parameters=2_567_463_684,
        published=(2.6e9, "Podell et al. 2023 (SDXL), Table 1: 2.6B UNet parameters"),
        config_source="https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/unet/config.json",
        latent_size=128, text_len=77, scheduler_config=dict(_SD_DDPM, prediction_type="epsilon")),
    ModelFamily(
        name="sd3", title="Stable Diffusion 3 Medium MMDiT", class_name="SD3Transformer2DModel", kind="sd3",
        objective="flow_matching",
        full_config=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
        tiny_config=dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                         num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                         pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8),
        tensors=682, parameters=2_028_328_000,
        published=(2.0e9, "stabilityai/stable-diffusion-3-medium model card: 2 billion parameter MMDiT"),
        config_source="https://huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers/blob/main/transformer/config.json",
        latent_size=128, text_len=333,  # 77 CLIP + 256 T5 tokens
        scheduler_config=dict(num_train_timesteps=1000, shift=3.0)),
    ModelFamily(
        name="flux", title="FLUX.1-dev transformer", class_name="FluxTransformer2DModel", kind="flux",
        objective="flow_matching",
        full_config=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                         guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        tiny_config=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                         num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                         guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
        tensors=1160, parameters=11_901_408_320,
        published=(12e9, "black-forest-labs/FLUX.1-dev model card: 12 billion parameter rectified flow transformer"),
        config_source="https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/transformer/config.json",
        latent_size=128, text_len=512,  # T5 tokens (FLUX.1-dev max_sequence_length)
        scheduler_config=dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                              max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)),
)}


def get_family(name: str) -> ModelFamily:
    """The family named ``name`` (``sd15``, ``sd21``, ``sdxl``, ``sd3``, ``flux``)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}") from None


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    # DDP / accelerate wrappers keep the diffusers model in .module (FSDP2 subclasses it instead)
    while not hasattr(model, "config") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def family_of(model: torch.nn.Module, objective: str | None = None) -> ModelFamily:
    """The family whose forward call fits ``model`` (by class and config; wrappers see through).

    UNets: SDXL when the config has ``addition_embed_type="text_time"``, else SD-1.x (SD-2.x when
    ``objective="v_prediction"``); the forward call is the same for SD-1.x and SD-2.x. A model
    under FSDP2 (``fully_shard`` makes a subclass), DDP or accelerate maps to its family.
    """
    inner = _inner(model)
    classes = {c.__name__ for c in type(inner).__mro__}
    if "SD3Transformer2DModel" in classes:
        return FAMILIES["sd3"]
    if "FluxTransformer2DModel" in classes:
        return FAMILIES["flux"]
    if "UNet2DConditionModel" in classes:
        if getattr(inner.config, "addition_embed_type", None) == "text_time":
            return FAMILIES["sdxl"]
        return FAMILIES["sd21" if objective == "v_prediction" else "sd15"]
    raise TypeError(f"no model family for {type(inner).__name__}; known: UNet2DConditionModel, "
                    "SD3Transformer2DModel, FluxTransformer2DModel")


def layout(name: str, size: str = "full") -> dict[str, tuple[int, ...]]:
    """name -> shape of every parameter of the family's model, from the meta device (no allocation)."""
    model = get_family(name).build(size, device="meta")
    return {n: tuple(p.shape) for n, p in model.named_parameters()}
