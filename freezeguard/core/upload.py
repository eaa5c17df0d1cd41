"""What a loader could read from an upload: every weights file, grouped the way loaders group them.

``verify`` must audit what users will load, not one file it picked. diffusers' loaders choose
among several files of one folder (``from_pretrained(variant="fp16")`` reads
``diffusion_pytorch_model.fp16.safetensors``; a sharded index names its shards; a pipeline's
``model_index.json`` names its component subfolders; ``load_lora_weights(path, weight_name=...)``
and ``from_single_file`` read any file they are pointed at). So an upload is read whole:

* every ``.safetensors`` (or ``.sft``) file under it is a *file set* of its own, except the shards
  an index names, which form one set with their index;
* a pipeline (``model_index.json``) puts each file in the part of its subfolder; the denoiser
  (``unet/``, ``transformer/``), files at the top and folders the index does not name are audited
  against the mask (part ``"denoiser"``); the other components (text encoders, VAE) are counted
  as parts the mask does not cover;
* anything a loader could read but freezeguard cannot (pickles, GGUF, ONNX, ...), a symlink or an
  index path leading outside the upload, a malformed index or a missing shard is *refused*: the
  audit cannot vouch for it, so the result is "cannot verify".

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import save_file
    >>> root = Path(tempfile.mkdtemp())
    >>> save_file({"w": torch.zeros(1)}, str(root / "diffusion_pytorch_model.safetensors"))
    >>> _ = (root / "model.ckpt").write_bytes(b"pickle")
    >>> upload = read_upload(root)
    >>> [(s.part, [f.name for f in s.files]) for s in upload.sets], upload.refused
    ([('denoiser', ['diffusion_pytorch_model.safetensors'])], [('model.ckpt', 'a weights file in a format verify does not read (pickle, GGUF, ONNX, ...): a loader could read it')])
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from freezeguard.core.weights import DENOISER_SUBFOLDERS, PICKLE_SUFFIXES, WeightsError, refuse_pickles

__all__ = ["FileSet", "Upload", "read_upload", "SAFETENSORS_SUFFIXES"]

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# Weights in formats freezeguard never reads (pickles run code; the others it has no reader for).
_UNREADABLE_SUFFIXES = PICKLE_SUFFIXES + (".pickle", ".gguf", ".onnx", ".msgpack", ".h5", ".npz", ".npy",
                                          ".joblib", ".tflite", ".pb", ".engine", ".plan", ".mlmodel",
                                          ".mlpackage", ".ggml", ".llamafile")
# A JSON index of shards above this size is not a real one (a diffusers index is a few MB at most).
_MAX_INDEX_BYTES = 64 * 2**20


@dataclass
class FileSet:
    """Files a loader reads together: one weights file, or the shards of one index.

    ``part``: ``"denoiser"`` (audited against the mask) or the pipeline component the set belongs
    to (``"text_encoder"``, ``"vae"``...), which the mask does not cover. ``label``: the path shown
    in reports (relative to the upload).
    """

    part: str
    files: list[Path]
    label: str
    adapter_config: Path | None = None  # a peft ``adapter_config.json`` beside the file: peft's loader reads it


@dataclass
class Upload:
    """An upload read whole: its file sets, and what could not be read (``(path, reason)``)."""

    root: Path
    sets: list[FileSet] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def _pipeline_parts(root: Path, refused: list[tuple[str, str]]) -> dict[str, str] | None:
    """Subfolder -> part, from ``model_index.json`` (None when the folder is not a pipeline)."""
    index = root / "model_index.json"
    if not index.is_file():
        return None
    try:
        entries = json.loads(index.read_text())
        if not isinstance(entries, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        refused.append(("model_index.json", "not a valid pipeline index: the loader's components are unknown"))
        return {}
    return {name: ("denoiser" if name in DENOISER_SUBFOLDERS else name)
            for name, value in entries.items() if isinstance(value, list) and not name.startswith("_")}


def _sniff(path: Path) -> str:
    """What a file with an unremarkable name holds: "safetensors", "pickle or zip checkpoint", or ""."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return "file that cannot be read"
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "pickle or zip checkpoint"
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return "safetensors"
    return ""


def _read_index(index: Path, root: Path, rel: str) -> tuple[list[Path] | None, str]:
    """The shard files an index names, or None and the reason it cannot be used."""
    if index.stat().st_size > _MAX_INDEX_BYTES:
        return None, "index file too large to be a shard index"
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None, "not a valid sharded-checkpoint index (no weight_map of file names)"
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = index.parent / name
        if os.path.isabs(name) or ".." in Path(name).parts or not _inside(shard, root):
            return None, f"names a shard outside the upload: {name!r}"
        if not shard.is_file():
            return None, f"names a shard that is not in the upload: {name!r}"
        if not shard.name.endswith(SAFETENSORS_SUFFIXES):
            return None, f"names a shard that is not safetensors: {name!r}"
        shards.append(shard)
    return shards, ""


def read_upload(path: str | os.PathLike) -> Upload:
    """Every file set a loader could read from ``path`` (a weights file or a folder).

    Raises :class:`~freezeguard.core.weights.WeightsError` when ``path`` is missing, is a pickle,
    or holds no safetensors weights at all.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"finetuned path {path} does not exist")
    if path.is_file():
        if path.name.endswith(_UNREADABLE_SUFFIXES):
            raise WeightsError(f"finetuned {path} is a pickle or other checkpoint format verify does not read "
                               f"(loading a pickle can run code): convert it to .safetensors")
        config = path.parent / "adapter_config.json"
        return Upload(root=path.parent, sets=[FileSet("denoiser", [path], path.name,
                                                      config if config.is_file() else None)])
    root = path.resolve()
    upload = Upload(root=root)
    parts = _pipeline_parts(root, upload.refused)
    weights: list[Path] = []
    indexes: list[Path] = []
    def unreadable(exc: OSError) -> None:  # os.walk skips what it cannot list: that is not "nothing there"
        where = Path(exc.filename).relative_to(root).as_posix() if exc.filename else "."
        upload.refused.append((where, f"cannot be read ({exc.strerror}): a loader with other rights could"))

    for folder, dirs, files in os.walk(root, followlinks=False, onerror=unreadable):
        here = Path(folder)
        for name in sorted(dirs + files):
            p = here / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink() and not _inside(p, root):
                upload.refused.append((rel, "a symlink pointing outside the upload"))
                continue
            if name in dirs:
                continue
            lower = name.lower()
            if lower.endswith(SAFETENSORS_SUFFIXES):
                weights.append(p)
            elif lower.endswith(_UNREADABLE_SUFFIXES):
                upload.refused.append((rel, "a weights file in a format verify does not read (pickle, GGUF, "
                                            "ONNX, ...): a loader could read it"))
            elif lower.endswith(".json") and ".index" in lower and lower != "model_index.json":
                indexes.append(p)
            else:
                kind = _sniff(p)
                if kind == "safetensors":
                    weights.append(p)
                elif kind:
                    upload.refused.append((rel, f"a {kind} (under a name verify does not read as weights): "
                                                f"a loader told its path could read it"))
    sharded: set[Path] = set()
    sets: list[tuple[Path, list[Path]]] = []
    for index in sorted(indexes):
        rel = index.relative_to(root).as_posix()
        try:
            shards, why = _read_index(index, root, rel)
        except OSError as exc:
            shards, why = None, f"cannot be read ({exc.strerror})"
        if shards is None:
            upload.refused.append((rel, why))
            continue
        sets.append((index, shards))
        sharded.update(s.resolve() for s in shards)
    sets += [(w, [w]) for w in sorted(weights) if w.resolve() not in sharded]
    for anchor, files in sorted(sets):
        rel = anchor.relative_to(root)
        part = "denoiser"
        if parts is not None and len(rel.parts) > 1:
            part = parts.get(rel.parts[0], "denoiser")
        config = anchor.parent / "adapter_config.json"
        upload.sets.append(FileSet(part, files, rel.as_posix(), config if config.is_file() else None))
    if not upload.sets:
        refuse_pickles(root, "finetuned")
    if not upload.sets and not upload.refused:
        raise WeightsError(f"finetuned folder {path} has no safetensors weights")
    return upload
