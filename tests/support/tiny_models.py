"""Tiny, offline test fixtures: a Stable-Diffusion-shaped pipeline and imagefolder datasets.

The SD-1.x pipeline and the image folders ship with the package
(:mod:`freezeguard.integrations.diffusers.example`, behind ``freezeguard example-pipeline``); the
tiny SDXL, SD3 and Flux pipelines below are for the tests only. Everything is built from configs
and generated data, so tests run with ``HF_HUB_OFFLINE=1`` on a laptop CPU in seconds.

Example:
    >>> from support.tiny_models import build_tiny_sd_pipeline, write_tiny_imagefolder
    >>> pipe_dir = build_tiny_sd_pipeline("/tmp/tiny-sd")            # doctest: +SKIP
    >>> data_dir = write_tiny_imagefolder("/tmp/cats", n=8, caption="a photo of sks")  # doctest: +SKIP
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from freezeguard.integrations.diffusers.example import (  # noqa: F401 (the tests' names for them)
    STYLES,
    TINY_MAX_LENGTH,
    TINY_TEXT_DIM,
    build_tiny_components,
    build_tiny_sd_pipeline,
    build_tiny_unet,
    write_tiny_clip_tokenizer_files,
    write_tiny_imagefolder,
)


# -- tiny pipelines of the other families (SDXL, SD3, Flux), for the finetune / learn / verify CLIs --
def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                         layers_per_block=1, norm_num_groups=8, sample_size=16)


def _tiny_clip(tokenizer, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TINY_TEXT_DIM, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TINY_MAX_LENGTH,
                         projection_dim=TINY_TEXT_DIM, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _tiny_clip_tokenizer(tmp: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_tiny_clip_tokenizer_files(tmp)), model_max_length=TINY_MAX_LENGTH)


def _tiny_t5(tmp: str):
    """A tiny T5 encoder and a T5 tokenizer over a small in-code vocabulary (no sentencepiece file, no download)."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    # T5's layout: <pad>=0, </s>=1, <unk>=2, then pieces ("\u2581" marks a word start), then characters
    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + ["\u2581" + w for w in ("a", "photo", "of", "sks", *STYLES)]
    pieces += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokenizer = T5TokenizerFast(vocab=[(p, -float(len(p))) for p in pieces], extra_ids=0,
                                model_max_length=TINY_MAX_LENGTH)
    tokenizer.save_pretrained(tmp)
    tokenizer = T5TokenizerFast.from_pretrained(tmp)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=TINY_TEXT_DIM, d_kv=8, d_ff=32,
                                      num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1,
                                      decoder_start_token_id=0))
    return encoder, tokenizer


def build_tiny_family_pipeline(family: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny SDXL, SD3 or Flux pipeline folder (safetensors, all parts from configs) and return it.

    The text encoders are tiny CLIPs (SD3 runs without its optional T5, Flux with a tiny T5); the
    denoiser has the family's tiny config, resized to the text encoders' widths.
    """
    import tempfile

    import diffusers

    from freezeguard.integrations.diffusers.models import get_family

    torch.manual_seed(seed)
    fam = get_family(family)
    with tempfile.TemporaryDirectory() as tmp:
        tok, tok2 = _tiny_clip_tokenizer(tmp + "/a"), _tiny_clip_tokenizer(tmp + "/b")
        vae = _tiny_vae()
        if family == "sdxl":
            cfg = dict(fam.tiny_config, cross_attention_dim=2 * TINY_TEXT_DIM,
                       projection_class_embeddings_input_dim=6 * fam.tiny_config["addition_time_embed_dim"]
                       + TINY_TEXT_DIM)
            pipe = diffusers.StableDiffusionXLPipeline(
                vae=vae, text_encoder=_tiny_clip(tok, False), text_encoder_2=_tiny_clip(tok2, True), tokenizer=tok,
                tokenizer_2=tok2, unet=diffusers.UNet2DConditionModel(**cfg),
                scheduler=diffusers.EulerDiscreteScheduler.from_config(fam.scheduler().config), add_watermarker=False)
        elif family == "sd3":
            cfg = dict(fam.tiny_config, joint_attention_dim=2 * TINY_TEXT_DIM, pooled_projection_dim=2 * TINY_TEXT_DIM)
            pipe = diffusers.StableDiffusion3Pipeline(
                transformer=diffusers.SD3Transformer2DModel(**cfg), scheduler=fam.scheduler(), vae=vae,
                text_encoder=_tiny_clip(tok, True), tokenizer=tok, text_encoder_2=_tiny_clip(tok2, True),
                tokenizer_2=tok2, text_encoder_3=None, tokenizer_3=None)
        elif family == "flux":
            t5, t5_tok = _tiny_t5(tmp + "/t5")
            cfg = dict(fam.tiny_config, joint_attention_dim=TINY_TEXT_DIM, pooled_projection_dim=TINY_TEXT_DIM)
            pipe = diffusers.FluxPipeline(
                scheduler=fam.scheduler(), vae=vae, text_encoder=_tiny_clip(tok, False), tokenizer=tok,
                text_encoder_2=t5, tokenizer_2=t5_tok, transformer=diffusers.FluxTransformer2DModel(**cfg))
        else:
            raise ValueError(f"no tiny pipeline for {family!r}: sdxl, sd3 or flux (SD-1.x: build_tiny_sd_pipeline)")
        out = Path(out_dir)
        pipe.save_pretrained(str(out), safe_serialization=True)
    return out
