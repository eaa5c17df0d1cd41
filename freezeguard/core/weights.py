"""Finding and reading model weights: safetensors only, one rule for every command.

A pickle checkpoint (``.bin``, ``.ckpt``, ``.pt``...) can run arbitrary code when loaded, and
masks, releases and fine-tunes are exactly the files people exchange; so freezeguard never
unpickles: every path that reads weights (``verify``, ``learn``, ``finetune``, ``evaluate``)
goes through this module, which refuses pickles with a message saying how to convert.

Sources: a model, a state dict, a ``.safetensors`` file, a diffusers model folder
(``diffusion_pytorch_model.safetensors``, sharded or not), a transformers-style folder, an
adapter-only save, or a pipeline folder (its ``unet/`` or ``transformer/`` is used).

Example:
    >>> import torch
    >>> from freezeguard.core.weights import load_tensors
    >>> sorted(load_tensors(torch.nn.Linear(2, 2)))
    ['bias', 'weight']
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# Looked for, in order, inside a folder: a diffusers model folder, a transformers-style one,
# then adapter-only saves (diffusers LoRA, peft).
FOLDER_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.safetensors.index.json",
                "model.safetensors", "model.safetensors.index.json",
                "pytorch_lora_weights.safetensors", "adapter_model.safetensors")
DENOISER_SUBFOLDERS = ("unet", "transformer")


class WeightsError(ValueError):
    """Weights that cannot be found or read safely (missing, pickled, truncated, not safetensors)."""


class SafetensorsSource(Mapping):
    """Read-only name -> tensor view over one or several safetensors files, loaded lazily.

    Only the headers are read up front; a tensor is read when it is asked for.
    """

    def __init__(self, files: list[Path]):
        self._where: dict[str, Any] = {}
        self._handles = []
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
                keys = list(h.keys())
            except Exception as exc:
                raise WeightsError(f"{f} is not a readable safetensors file: {exc}") from None
            self._handles.append(h)
            for k in keys:
                self._where[k] = h

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self._where[key].get_tensor(key)
        except KeyError:
            raise
        except Exception as exc:
            raise WeightsError(f"tensor {key!r} cannot be read (truncated or corrupted file?): {exc}") from None

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> shape from the headers alone (no tensor is read)."""
        return {k: tuple(h.get_slice(k).get_shape()) for k, h in self._where.items()}


def refuse_pickles(folder: Path, what: str) -> None:
    """Raise if ``folder`` holds pickle checkpoints but no safetensors weights."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise WeightsError(f"{what} folder {folder} holds only pickle checkpoints ({', '.join(pickles[:3])}); "
                           f"they are not read because loading them can run code: convert to safetensors "
                           f"(e.g. load once in a trusted environment and save_pretrained(..., "
                           f"safe_serialization=True))")


def weight_files(folder: Path, what: str = "input") -> list[Path]:
    """The safetensors files holding a folder's weights (one, or the shards of an index)."""
    for name in FOLDER_FILES:
        f = folder / name
        if f.is_file():
            if name.endswith(".index.json"):
                try:
                    weight_map = json.loads(f.read_text())["weight_map"]
                except (ValueError, KeyError, TypeError):
                    raise WeightsError(f"{f} is not a valid sharded-checkpoint index") from None
                return [folder / s for s in sorted(set(weight_map.values()))]
            return [f]
    for sub in DENOISER_SUBFOLDERS:
        if (folder / sub).is_dir():
            return weight_files(folder / sub, what)
    refuse_pickles(folder, what)
    raise WeightsError(f"{what} folder {folder} has no diffusers/safetensors weights "
                       f"(looked for {', '.join(FOLDER_FILES[:2])} and a unet/ or transformer/ subfolder)")


def load_tensors(source: Any, what: str = "input") -> Mapping[str, torch.Tensor]:
    """Name -> tensor mapping for a model, a state dict, a .safetensors file or a folder."""
    if isinstance(source, torch.nn.Module):
        return {n: p.detach() for n, p in source.named_parameters()}
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise WeightsError(f"{what} state dict has non-tensor entries: {bad[:5]}")
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise WeightsError(f"{what} path {path} does not exist")
        if path.is_dir():
            return SafetensorsSource(weight_files(path, what))
        if path.suffix in PICKLE_SUFFIXES:
            raise WeightsError(f"{what} {path} is a pickle checkpoint; it is not read because loading it "
                               f"can run code: convert it to .safetensors")
        return SafetensorsSource([path])
    raise WeightsError(f"{what} must be a model, a state dict, a .safetensors file or a folder, "
                       f"got {type(source).__name__}")


def weights_layout(source: Any, what: str = "input") -> dict[str, tuple[int, ...]]:
    """name -> shape of a source's tensors; for files, from the safetensors headers only."""
    tensors = load_tensors(source, what)
    if isinstance(tensors, SafetensorsSource):
        return tensors.shapes()
    return {k: tuple(v.shape) for k, v in tensors.items()}


__all__ = ["WeightsError", "SafetensorsSource", "load_tensors", "weight_files", "weights_layout", "refuse_pickles",
           "PICKLE_SUFFIXES"]
