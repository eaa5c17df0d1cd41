"""A tiny local Stable Diffusion pipeline and image folders to try freezeguard on (no download).

``freezeguard example-pipeline OUT`` writes them: ``OUT/sd`` (an SD-1.x-shaped pipeline folder,
every part built from a config with seeded random weights: a 208-tensor UNet, a tiny VAE, a tiny
CLIP text encoder and byte-level tokenizer, a DDPM scheduler; safetensors) and two Hugging Face
imagefolders of procedurally drawn 16x16 images, ``OUT/target`` (checkerboards, "a photo of sks")
and ``OUT/legal`` (stripes, "a photo of stripes"). The README's walkthrough runs every command on
them in a few minutes on a laptop CPU. The weights are random: the figures show the plumbing,
not FreezeAsGuard's effect (``freezeguard demo`` pretrains a toy model for that).

Example:
    >>> import tempfile
    >>> folder = write_tiny_imagefolder(tempfile.mkdtemp(), n=2, caption="a photo of sks", style="checker")
    >>> sorted(p.name for p in folder.iterdir())
    ['checker_0000.png', 'checker_0001.png', 'metadata.jsonl']
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

#: Length of tokenized captions in the tiny pipeline (CLIP uses 77; 16 keeps tests fast).
TINY_MAX_LENGTH = 16
#: Hidden size of the tiny CLIP text encoder (= the UNet's cross_attention_dim).
TINY_TEXT_DIM = 32
STYLES = ("stripes", "checker", "blobs", "rings", "gradient")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode map (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_tiny_clip_tokenizer_files(out_dir: str | os.PathLike) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` of a tiny byte-level CLIP BPE (514 + a few tokens).

    Every byte is a token (with and without the ``</w>`` end-of-word suffix), so any text
    tokenizes; a handful of merges make common caption words shorter.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in alphabet + [c + "</w>" for c in alphabet]:
        vocab[tok] = len(vocab)
    merges = ["o f</w>", "p h", "ph o", "pho t", "phot o</w>"]
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out


def build_tiny_unet(seed: int = 0, cross_attention_dim: int = TINY_TEXT_DIM) -> torch.nn.Module:
    """A two-block SD-shaped ``UNet2DConditionModel`` (208 tensors), randomly initialised after ``seed``.

    Example:
        >>> unet = build_tiny_unet(cross_attention_dim=8)
        >>> len(list(unet.parameters()))
        208
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=8, cross_attention_dim=cross_attention_dim,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
    )


def build_tiny_components(seed: int = 0, tokenizer_dir: str | os.PathLike | None = None) -> dict:
    """The five components of a tiny SD pipeline, in memory (randomly initialised, seeded)."""
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet = build_tiny_unet(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1, norm_num_groups=8, sample_size=16,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = write_tiny_clip_tokenizer_files(tokenizer_dir or tmp)
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=TINY_MAX_LENGTH)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_TEXT_DIM, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TINY_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
                              steps_offset=1, clip_sample=False)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler}


def build_tiny_sd_pipeline(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny Stable Diffusion pipeline folder (safetensors) and return its path.

    The VAE downsamples by 2, so 16x16 images give 8x8 latents, the UNet's sample size.
    Loading it back (``load_components`` or ``StableDiffusionPipeline.from_pretrained``) needs
    no network.
    """
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    comps = build_tiny_components(seed)
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def _pattern(style: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One procedurally generated RGB image in [0, 255] of a given style (seeded variety)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    color = rng.uniform(0.2, 1.0, size=3).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if style == "stripes":
        base = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * x + phase)
    elif style == "checker":
        k = int(rng.integers(2, 5))
        base = ((np.floor(x * k) + np.floor(y * k)) % 2).astype(np.float32)
    elif style == "blobs":
        cx, cy = rng.uniform(0.25, 0.75, size=2)
        base = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.03)
    elif style == "rings":
        r = np.sqrt((x - 0.5) ** 2 + (y - 0.5) ** 2)
        base = 0.5 + 0.5 * np.cos(2 * np.pi * 4 * r + phase)
    elif style == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        base = (np.cos(a) * x + np.sin(a) * y + 1.5) / 3.0
    else:
        raise ValueError(f"unknown style {style!r}; choose from {STYLES}")
    img = base[..., None] * color[None, None, :]
    img = img + rng.normal(0, 0.03, size=img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_tiny_imagefolder(out_dir: str | os.PathLike, n: int = 8, caption: str = "a photo",
                           seed: int = 0, size: int = 16, style: str = "stripes",
                           caption_column: str = "text") -> Path:
    """Write ``n`` generated PNGs + ``metadata.jsonl`` (Hugging Face imagefolder layout).

    Example:
        >>> import tempfile
        >>> d = write_tiny_imagefolder(tempfile.mkdtemp(), n=4, caption="sks stripes")
        >>> len((d / "metadata.jsonl").read_text().splitlines())
        4
    """
    from PIL import Image

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        name = f"{style}_{i:04d}.png"
        Image.fromarray(_pattern(style, size, rng)).save(out / name)
        rows.append({"file_name": name, caption_column: caption})
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return out


def write_example(out_dir: str | os.PathLike, *, images: int = 8, seed: int = 0) -> dict[str, Path]:
    """Write the walkthrough's pipeline and data under ``out_dir``; returns their paths by name.

    ``out_dir`` must not exist yet or be empty (nothing of the user's is overwritten).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; give a new one")
    out.mkdir(parents=True, exist_ok=True)
    return {"sd": build_tiny_sd_pipeline(out / "sd", seed=seed),
            "target": write_tiny_imagefolder(out / "target", n=images, caption="a photo of sks", seed=seed,
                                             style="checker"),
            "legal": write_tiny_imagefolder(out / "legal", n=images, caption="a photo of stripes", seed=seed + 1,
                                            style="stripes")}
