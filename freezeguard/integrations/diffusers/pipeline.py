"""Load the trainable parts of a local diffusers pipeline folder, and save a fine-tune.

Only local folders are read (``local_files_only=True``): nothing is downloaded. The denoiser is
the folder's ``unet/`` (SD-1.x, SD-2.x, SDXL) or ``transformer/`` (SD3, Flux). For training, the
scheduler is rebuilt as the training scripts do: a ``DDPMScheduler`` from the stored scheduler's
config (a pipeline often ships an inference scheduler such as PNDM), or the stored
``FlowMatchEulerDiscreteScheduler`` for rectified-flow models. Folders without ``vae`` /
``text_encoder`` / ``tokenizer`` (pixel-space or unconditional models) load with those parts set
to ``None``.

Text conditioning: SD-1.x/2.x run their one CLIP text encoder on the batch's ``input_ids``;
SDXL, SD3 and Flux (several text encoders, pooled embeddings) load the folder's diffusers
pipeline and use its own ``encode_prompt`` on the batch's captions (``prompt_encoder``).
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from freezeguard.core.files import replace_dir
from freezeguard.core.weights import DENOISER_SUBFOLDERS, PICKLE_SUFFIXES, WeightsError, weight_files
from freezeguard.integrations.diffusers.loss import make_loss_fn
from freezeguard.integrations.diffusers.models import family_of


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
    unet: torch.nn.Module           # the denoiser: a UNet or, for SD3 / Flux, a transformer
    noise_scheduler: Any
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: Any = None
    prompt_encoder: Any = None      # captions -> conditioning (SDXL, SD3, Flux): the pipeline's encode_prompt
    subfolder: str = "unet"         # where the denoiser lives: "unet" or "transformer"

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def to(self, device: str | torch.device) -> "SDComponents":
        for module in (self.unet, self.vae, self.text_encoder):
            if module is not None:
                module.to(device)
        if self.prompt_encoder is not None:
            self.prompt_encoder.to(device)
        return self

    def loss_fn(self):
        """``make_loss_fn`` over these components (VAE / text encoder / prompt encoder when present)."""
        return make_loss_fn(self.noise_scheduler, vae=self.vae, text_encoder=self.text_encoder,
                            prompt_encoder=self.prompt_encoder)


class PromptEncoder:
    """``captions -> {"encoder_hidden_states", "pooled_projections"}`` through a pipeline's ``encode_prompt``.

    Holds the pipeline's text encoders (frozen, no gradients). Used for SDXL, SD3 and Flux, whose
    conditioning needs several text encoders and a pooled embedding.
    """

    def __init__(self, pipe: Any, kind: str):
        self.pipe, self.kind = pipe, kind
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            enc = getattr(pipe, name, None)
            if enc is not None:
                enc.requires_grad_(False).eval()

    def to(self, device: str | torch.device) -> "PromptEncoder":
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            enc = getattr(self.pipe, name, None)
            if enc is not None:
                enc.to(device)
        return self

    def _device(self) -> torch.device:
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            enc = getattr(self.pipe, name, None)
            if enc is not None:
                return next(enc.parameters()).device
        return torch.device("cpu")

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        device = self._device()
        if self.kind == "flux":
            embeds, pooled, _ = self.pipe.encode_prompt(prompt=list(captions), prompt_2=None, device=device)
        elif self.kind == "sd3":
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=list(captions), prompt_2=None, prompt_3=None,
                                                           device=device, do_classifier_free_guidance=False)
        else:  # SDXL
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=list(captions), device=device,
                                                           num_images_per_prompt=1,
                                                           do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


# model_index.json names the class of each part; only these libraries are imported from it (a
# folder from someone else must not make freezeguard, or diffusers for it, import and call
# arbitrary code).
TRUSTED_LIBRARIES = ("diffusers", "transformers")


def _holds_weights(folder: Path) -> bool:
    return any(f.suffix in PICKLE_SUFFIXES or f.name.endswith(".safetensors") for f in folder.iterdir())


def _read_index(root: Path) -> dict:
    index_path = root / "model_index.json"
    try:
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{index_path} is not valid JSON: {exc}") from None
    if not isinstance(index, dict):
        raise PipelineError(f"{index_path} is not a JSON object")
    return index


def _check_index(root: Path) -> None:
    """Every part model_index.json names comes from a trusted library (or is absent)."""
    for name, entry in _read_index(root).items():
        if name.startswith("_") or not isinstance(entry, (list, tuple)) or not any(entry):
            continue
        library = entry[0]
        if library not in TRUSTED_LIBRARIES:
            raise PipelineError(f"model_index.json names {library}.{entry[1] if len(entry) > 1 else '?'} for "
                                f"{name!r}; freezeguard only loads classes from {', '.join(TRUSTED_LIBRARIES)}")


def _class_from_index(index: dict, name: str, default: tuple[str, str]) -> type:
    entry = index.get(name)
    library, cls_name = (list(entry) + [None, None])[:2] if isinstance(entry, (list, tuple)) else (None, None)
    if not library or not cls_name:
        library, cls_name = default
    if library not in TRUSTED_LIBRARIES or not str(cls_name).isidentifier():
        raise PipelineError(f"model_index.json names {library}.{cls_name} for {name!r}; freezeguard only loads "
                            f"classes from {', '.join(TRUSTED_LIBRARIES)}")
    try:
        return getattr(importlib.import_module(library), cls_name)
    except (ImportError, AttributeError) as exc:
        raise PipelineError(f"model_index.json names {library}.{cls_name} for {name!r}, which cannot be "
                            f"imported here: {exc}") from None


def denoiser_subfolder(root: str | os.PathLike) -> str:
    """``"unet"`` or ``"transformer"``: the pipeline folder's denoiser (the first with a config.json)."""
    for name in DENOISER_SUBFOLDERS:
        if (Path(root) / name / "config.json").is_file():
            return name
    raise PipelineError(f"{root} is not a diffusers pipeline folder: no unet/config.json or transformer/config.json")


def check_pipeline_folder(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path if it looks like a local diffusers pipeline with a denoiser, else raise."""
    root = Path(path)
    if not root.is_dir():
        raise PipelineError(f"model folder {root} does not exist (a local diffusers pipeline folder is "
                            "needed; nothing is downloaded)")
    sub = denoiser_subfolder(root)
    _check_index(root)
    # One rule for every command and every part (denoiser, VAE, text encoders): safetensors only,
    # pickles refused (freezeguard.core.weights), checked before anything is loaded.
    parts = [sub] + sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != sub and _holds_weights(p))
    for part in parts:
        try:
            weight_files(root / part, f"{root.name}/{part}")
        except WeightsError as exc:
            raise PipelineError(str(exc)) from None
    return root


def _load_part(cls: type, folder: Path, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` on a local folder, safetensors only; every failure as a PipelineError."""
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise PipelineError(f"cannot load {what} from {folder}: {str(exc).strip()[:500]}") from None


def load_components(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> SDComponents:
    """Load the denoiser, vae, text encoder(s), tokenizer and the training noise scheduler from a local folder."""
    from diffusers import DDPMScheduler

    root = check_pipeline_folder(path)
    sub = denoiser_subfolder(root)
    if sub != "unet" or (root / "text_encoder_2").is_dir():
        return _load_with_pipeline(root, sub, dtype)
    index = _read_index(root)
    # use_safetensors: never fall back to unpickling a .bin that sits beside (or instead of) the
    # safetensors weights; check_pipeline_folder has already refused a folder with pickles only.
    local = {"use_safetensors": True}

    def sub(name: str) -> str | None:
        return str(root / name) if (root / name).is_dir() else None

    unet_cls = _class_from_index(index, "unet", ("diffusers", "UNet2DConditionModel"))
    unet = _load_part(unet_cls, root / "unet", "the UNet", torch_dtype=dtype, **local)
    vae = text_encoder = tokenizer = None
    if sub("vae"):
        vae = _load_part(_class_from_index(index, "vae", ("diffusers", "AutoencoderKL")), root / "vae", "the VAE",
                         torch_dtype=dtype, **local)
        vae.requires_grad_(False).eval()
    if sub("text_encoder"):
        text_encoder = _load_part(_class_from_index(index, "text_encoder", ("transformers", "CLIPTextModel")),
                                  root / "text_encoder", "the text encoder", dtype=dtype, **local)
        text_encoder.requires_grad_(False).eval()
    if sub("tokenizer"):
        tokenizer = _load_part(_class_from_index(index, "tokenizer", ("transformers", "CLIPTokenizer")),
                               root / "tokenizer", "the tokenizer")
    if sub("scheduler"):
        try:
            stored = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
            noise_scheduler = DDPMScheduler.from_config(stored)
        except (OSError, ValueError, TypeError) as exc:
            raise PipelineError(f"cannot read {root / 'scheduler' / 'scheduler_config.json'}: {exc}") from None
    else:
        noise_scheduler = DDPMScheduler()
    return SDComponents(path=root, unet=unet, noise_scheduler=noise_scheduler, vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer)


def _load_with_pipeline(root: Path, sub: str, dtype: torch.dtype) -> SDComponents:
    """SDXL / SD3 / Flux: the folder's diffusers pipeline, its encode_prompt for the captions."""
    from diffusers import DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    index = _read_index(root)
    # optional parts saved as absent (e.g. SD3 without its T5) must be passed as None explicitly
    absent = {k: None for k, v in index.items() if isinstance(v, list) and not any(v)}
    try:
        pipe = DiffusionPipeline.from_pretrained(str(root), dtype=dtype, local_files_only=True,
                                                 use_safetensors=True, **absent)
    except (OSError, ValueError, TypeError, ImportError) as exc:
        raise PipelineError(f"{root}: cannot load it as a local diffusers pipeline: {exc}") from None
    denoiser = getattr(pipe, sub)
    try:
        fam = family_of(denoiser)
    except TypeError as exc:
        raise PipelineError(f"{root}: {exc}") from None
    stored = getattr(pipe, "scheduler", None)
    if fam.objective == "flow_matching":
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(stored.config) if stored is not None \
            else fam.scheduler()
    else:
        scheduler = DDPMScheduler.from_config(stored.config) if stored is not None else fam.scheduler()
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        vae.requires_grad_(False).eval()
    denoiser.requires_grad_(True)
    kind = fam.kind if fam.kind != "unet" else "sdxl"
    return SDComponents(path=root, unet=denoiser, noise_scheduler=scheduler, vae=vae,
                        tokenizer=getattr(pipe, "tokenizer", None), prompt_encoder=PromptEncoder(pipe, kind),
                        subfolder=sub)


def save_unet(unet: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Save a UNet with ``save_pretrained`` as safetensors into ``path`` (a unet/ folder)."""
    out = Path(path)
    unet.save_pretrained(str(out), safe_serialization=True)
    return out


def save_pipeline_with_unet(src: str | os.PathLike, dst: str | os.PathLike, unet: torch.nn.Module,
                            extra: Callable[[Path], None] | None = None) -> Path:
    """Copy pipeline folder ``src`` to ``dst`` with its denoiser (``unet/`` or ``transformer/``) replaced by ``unet``.

    The whole copy is built in a temporary folder beside ``dst`` and swapped in by renames once it
    is complete and fsynced (``files.replace_dir``): an earlier ``dst`` survives any failure (a full
    disk, a kill) intact, and files get the user's umask. ``extra(folder)`` may add files (a log).

    Example:
        >>> save_pipeline_with_unet("models/sd15", "runs/sd15-ft", comps.unet)  # doctest: +SKIP
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise PipelineError(f"refusing to overwrite the source pipeline {src}; choose another --out")
    sub = denoiser_subfolder(src)

    def fill(tmp: Path) -> None:
        for entry in src.iterdir():
            if entry.name == sub:
                continue
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name)
            else:
                shutil.copy2(entry, tmp / entry.name)
        (tmp / sub).mkdir()
        save_unet(unet, tmp / sub)
        if extra is not None:
            extra(tmp)

    replace_dir(dst, fill)
    return dst
