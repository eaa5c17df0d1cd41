"""Mask files: a FreezeMask as a small, name-keyed ``.safetensors`` file.

Layout of a mask file (format version 1):

- one 0-dim ``uint8`` tensor per parameter name of the model, 1 = frozen, 0 = trainable. Any
  safetensors reader can list which tensors are frozen without freezeguard;
- string-only metadata: ``format`` ("freezeguard.core.mask"), ``format_version``, ``granularity``,
  ``budget_by``, ``ratio`` (realised, on the budget basis), ``model_fingerprint``
  (:func:`freezeguard.model_fingerprint`, when known), ``layout`` (JSON name -> shape),
  ``learning`` (JSON of the learning settings, "{}" when none), ``extra`` (JSON of any other
  string metadata of the mask) and ``checksum`` (sha256 over names, shapes and bits).

safetensors never unpickles, but it also does not checksum the tensor bytes; the ``checksum``
entry is what turns a flipped byte into a clear error instead of a silently different mask.

Example:
    >>> import os, tempfile, torch, freezeguard as fg
    >>> model = torch.nn.Linear(3, 2)
    >>> path = os.path.join(tempfile.mkdtemp(), "mask.safetensors")
    >>> fg.FreezeMask.from_names(model, ["bias"]).save(path)
    >>> fg.FreezeMask.load(path, model).frozen_names
    ['bias']
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from freezeguard.core.files import write_bytes

FORMAT = "freezeguard.core.mask"
FORMAT_VERSION = "1"
SUPPORTED_VERSIONS = ("1",)
# A mask file holds one 1-byte tensor per name plus JSON; a header beyond this is not ours and
# would only make us parse a huge JSON blob from an untrusted file.
_MAX_HEADER_BYTES = 64 * 2**20


class FreezeMaskFileError(ValueError):
    """A mask file cannot be used: missing, not safetensors, damaged, unknown version, or made
    for a different model. The message names the file and what is wrong."""


def layout_checksum(layout: Mapping[str, tuple[int, ...]], frozen: set[str] | frozenset[str]) -> str:
    """sha256 over sorted ``name|shape|bit`` lines (what the file must reproduce exactly)."""
    h = hashlib.sha256()
    for name in sorted(layout):
        h.update(f"{name}|{tuple(layout[name])}|{int(name in frozen)}\n".encode())
    return h.hexdigest()


def write_mask_file(path: str | os.PathLike, layout: Mapping[str, tuple[int, ...]],
                    frozen: set[str] | frozenset[str], metadata: Mapping[str, str]) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or full disk therefore leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str)}
    if bad:
        raise TypeError(f"mask file metadata must be strings; got {bad}")
    tensors = {name: torch.tensor(int(name in frozen), dtype=torch.uint8) for name in sorted(layout)}
    meta = dict(metadata)
    meta.update({"format": FORMAT, "format_version": FORMAT_VERSION,
                 "layout": json.dumps({n: list(s) for n, s in sorted(layout.items())}, separators=(",", ":")),
                 "checksum": layout_checksum(layout, frozen)})
    data = st_save(tensors, metadata=meta)
    if not path.parent.exists():
        raise FreezeMaskFileError(f"cannot write mask file {path}: folder {path.parent} does not exist")
    # A unique temporary name, fsync, rename; the file then gets the umask's permissions (a mask
    # is published with the model), not mkstemp's 0600.
    write_bytes(path, data)


def _read_header(path: Path, f, size: int) -> tuple[dict, int]:
    """Parse the safetensors header by hand, reading only the header, so every failure gets a
    specific message and a huge file is refused without reading it. Returns (header, data bytes)."""
    head = f.read(8)
    if len(head) < 8:
        raise FreezeMaskFileError(f"{path} is not a safetensors mask file (only {len(head)} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n == 0 or n > _MAX_HEADER_BYTES:
        raise FreezeMaskFileError(f"{path} is not a safetensors mask file (header length {n} is implausible)")
    if size < 8 + n:
        raise FreezeMaskFileError(f"{path} is truncated: header says {n} bytes, file has {size - 8} after the length")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FreezeMaskFileError(f"{path} is not a safetensors mask file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise FreezeMaskFileError(f"{path} is not a safetensors mask file (header is not a JSON object)")
    data_len = size - 8 - n
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items()
                if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    except (TypeError, ValueError, IndexError, KeyError):
        raise FreezeMaskFileError(f"{path} is corrupted: a tensor entry has invalid data_offsets") from None
    if ends and max(ends) > data_len:
        raise FreezeMaskFileError(f"{path} is truncated: tensors need {max(ends)} data bytes, file has {data_len}")
    return header, data_len


def read_mask_file(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], set[str], dict[str, str]]:
    """Read and validate a mask file; returns ``(layout, frozen_names, metadata)``.

    Raises :class:`FreezeMaskFileError` for every problem with the file itself.
    """
    path = Path(path)
    if not path.exists():
        raise FreezeMaskFileError(f"mask file {path} does not exist")
    if path.is_dir():
        raise FreezeMaskFileError(f"mask file {path} is a folder, not a file")
    # Only the header is read until the file is known to be a mask of plausible size: a mask
    # holds one byte per tensor, so a 3 GiB file is refused after reading a few bytes.
    size = path.stat().st_size
    with open(path, "rb") as f:
        header, data_len = _read_header(path, f, size)
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise FreezeMaskFileError(f"{path} is corrupted: its metadata is not a JSON object")
        if meta.get("format") != FORMAT:
            raise FreezeMaskFileError(f"{path} is a safetensors file but not a freezeguard mask "
                                      f"(metadata format={meta.get('format')!r}, expected {FORMAT!r})")
        entries = sum(1 for k in header if k != "__metadata__")
        if data_len > entries:  # one byte per tensor; anything beyond is not a mask's
            raise FreezeMaskFileError(f"{path} is not a valid mask file: {data_len} data bytes for {entries} "
                                      f"one-byte entries")
        f.seek(0)
        raw = f.read()
    version = meta.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise FreezeMaskFileError(f"{path} has mask format version {version!r}; this freezeguard reads "
                                  f"{', '.join(SUPPORTED_VERSIONS)} (upgrade freezeguard to read newer masks)")
    try:
        tensors = st_load(raw)
    except Exception as exc:  # safetensors' own error type differs across versions
        raise FreezeMaskFileError(f"{path} is corrupted: {exc}") from None
    try:
        layout = {n: tuple(int(d) for d in s) for n, s in json.loads(meta["layout"]).items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise FreezeMaskFileError(f"{path} is corrupted: its 'layout' metadata is missing or not valid JSON") from None
    if set(layout) != set(tensors):
        raise FreezeMaskFileError(f"{path} is corrupted: its tensors and its layout name different parameters")
    frozen: set[str] = set()
    for name, t in tensors.items():
        if t.dtype not in (torch.uint8, torch.bool) or t.numel() != 1 or int(t.item()) not in (0, 1):
            raise FreezeMaskFileError(f"{path} is corrupted: entry {name!r} is not a single 0/1 byte")
        if int(t.item()):
            frozen.add(name)
    if meta.get("checksum") != layout_checksum(layout, frozen):
        raise FreezeMaskFileError(f"{path} is corrupted: checksum does not match its contents")
    return layout, frozen, dict(meta)


def read_reference_txt(path: str | os.PathLike, expected: int) -> list[bool]:
    """Parse a mask written by the authors' code: one 0/1 per line, 1 = frozen.

    Numbers such as ``1.0`` or ``0.000000e+00`` (numpy ``savetxt``) are accepted; anything that
    is not exactly 0 or 1, or a line count different from ``expected``, is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FreezeMaskFileError(f"reference mask file {path} does not exist")
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines()]
    except UnicodeDecodeError:
        raise FreezeMaskFileError(f"{path} is not a text file of 0/1 lines") from None
    while lines and not lines[-1]:
        lines.pop()
    bits = []
    for i, ln in enumerate(lines, 1):
        try:
            v = float(ln)
        except ValueError:
            raise FreezeMaskFileError(f"{path}:{i}: expected 0 or 1, got {ln!r}") from None
        if v not in (0.0, 1.0):
            raise FreezeMaskFileError(f"{path}:{i}: expected 0 or 1, got {ln!r}")
        bits.append(v == 1.0)
    if len(bits) != expected:
        raise FreezeMaskFileError(f"{path} has {len(bits)} entries but the model has {expected} parameter "
                                  f"tensors (one 0/1 line per tensor of model.parameters() is expected)")
    return bits
