"""Load the trainable parts of a local diffusers Stable Diffusion folder, and save a fine-tune.

Only local folders are read (``local_files_only=True``): nothing is downloaded. For training,
the scheduler is rebuilt as a ``DDPMScheduler`` from the stored scheduler's config, as the
diffusers training scripts do (a pipeline often ships an inference scheduler such as PNDM).
Folders without ``vae`` / ``text_encoder`` / ``tokenizer`` (pixel-space or unconditional
models) load with those parts set to ``None``.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from freezeguard.core.weights import WeightsError, weight_files
from freezeguard.integrations.diffusers.loss import make_loss_fn


class PipelineError(ValueError):
    """A folder is not a usable local diffusers pipeline."""


@dataclass
class SDComponents:
    """The pieces of a pipeline that training needs.

    Example:
        >>> comps = load_components("models/sd15")              # doctest: +SKIP
        >>> loss_fn = make_loss_fn(comps.noise_scheduler, vae=comps.vae,
        ...                        text_encoder=comps.text_encoder)    # doctest: +SKIP
    """

    path: Path
    unet: torch.nn.Module
    noise_scheduler: Any
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: Any = None

    def to(self, device: str | torch.device) -> "SDComponents":
        for module in (self.unet, self.vae, self.text_encoder):
            if module is not None:
                module.to(device)
        return self

    def loss_fn(self):
        """``make_loss_fn`` over these components (VAE / text encoder when present)."""
        return make_loss_fn(self.noise_scheduler, vae=self.vae, text_encoder=self.text_encoder)


def _class_from_index(index: dict, name: str, default: tuple[str, str]) -> type:
    library, cls_name = (index.get(name) or [None, None])[:2]
    if not library or not cls_name:
        library, cls_name = default
    try:
        return getattr(importlib.import_module(library), cls_name)
    except (ImportError, AttributeError) as exc:
        raise PipelineError(f"model_index.json names {library}.{cls_name} for {name!r}, which cannot be "
                            f"imported here: {exc}") from None


def check_pipeline_folder(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path if it looks like a local diffusers pipeline with a UNet, else raise."""
    root = Path(path)
    if not root.is_dir():
        raise PipelineError(f"model folder {root} does not exist (a local diffusers pipeline folder is "
                            "needed; nothing is downloaded)")
    unet_dir = root / "unet"
    if not (unet_dir / "config.json").is_file():
        raise PipelineError(f"{root} is not a diffusers pipeline folder: no unet/config.json")
    try:  # one rule for every command: safetensors only, pickles refused (freezeguard.core.weights)
        weight_files(unet_dir, "unet")
    except WeightsError as exc:
        raise PipelineError(str(exc)) from None
    return root


def load_components(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> SDComponents:
    """Load unet, vae, text_encoder, tokenizer and a DDPM noise scheduler from a local folder."""
    from diffusers import DDPMScheduler

    root = check_pipeline_folder(path)
    index_path = root / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    # use_safetensors: never fall back to unpickling a .bin that sits beside (or instead of) the
    # safetensors weights; check_pipeline_folder has already refused a folder with pickles only.
    local = {"local_files_only": True, "use_safetensors": True}

    def sub(name: str) -> str | None:
        return str(root / name) if (root / name).is_dir() else None

    unet_cls = _class_from_index(index, "unet", ("diffusers", "UNet2DConditionModel"))
    unet = unet_cls.from_pretrained(str(root / "unet"), torch_dtype=dtype, **local)
    vae = text_encoder = tokenizer = None
    if sub("vae"):
        vae = _class_from_index(index, "vae", ("diffusers", "AutoencoderKL")).from_pretrained(
            sub("vae"), torch_dtype=dtype, **local)
        vae.requires_grad_(False).eval()
    if sub("text_encoder"):
        text_encoder = _class_from_index(index, "text_encoder", ("transformers", "CLIPTextModel")).from_pretrained(
            sub("text_encoder"), dtype=dtype, **local)
        text_encoder.requires_grad_(False).eval()
    if sub("tokenizer"):
        tokenizer = _class_from_index(index, "tokenizer", ("transformers", "CLIPTokenizer")).from_pretrained(
            sub("tokenizer"), local_files_only=True)
    if sub("scheduler"):
        stored = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        noise_scheduler = DDPMScheduler.from_config(stored)
    else:
        noise_scheduler = DDPMScheduler()
    return SDComponents(path=root, unet=unet, noise_scheduler=noise_scheduler, vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer)


def save_unet(unet: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Save a UNet with ``save_pretrained`` as safetensors into ``path`` (a unet/ folder)."""
    out = Path(path)
    unet.save_pretrained(str(out), safe_serialization=True)
    return out


def save_pipeline_with_unet(src: str | os.PathLike, dst: str | os.PathLike, unet: torch.nn.Module) -> Path:
    """Copy pipeline folder ``src`` to ``dst`` with its UNet replaced by ``unet``.

    Example:
        >>> save_pipeline_with_unet("models/sd15", "runs/sd15-ft", comps.unet)  # doctest: +SKIP
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise PipelineError(f"refusing to overwrite the source pipeline {src}; choose another --out")
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.name == "unet":
            continue
        target = dst / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target, dirs_exist_ok=True)
        else:
            shutil.copy2(entry, target)
    unet_dir = dst / "unet"
    if unet_dir.exists():
        shutil.rmtree(unet_dir)  # drop stale shards of an earlier run
    save_unet(unet, unet_dir)
    return dst
