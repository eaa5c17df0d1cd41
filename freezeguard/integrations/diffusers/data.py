"""Image-caption datasets in the Hugging Face ``imagefolder`` layout, with target/innocent roles.

A folder holds images plus ``metadata.jsonl`` (or ``metadata.csv``) whose rows name a
``file_name`` and a caption column (``text`` by default), as ``datasets.load_dataset(
"imagefolder", data_dir=...)`` expects. Everything that can be wrong with a folder is checked
when the dataset is built, before any long training work starts.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

ROLES = ("target", "innocent")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DatasetError(ValueError):
    """A data folder cannot be used (missing, no images, missing captions, mixed sizes...)."""


def _read_metadata(root: Path) -> list[dict[str, Any]]:
    jsonl, csv_path = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.is_file():
        rows = []
        for lineno, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{jsonl}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{jsonl}:{lineno}: each line must be a JSON object")
            rows.append(row)
        return rows
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    raise DatasetError(f"{root}: no metadata.jsonl (or metadata.csv) with captions; the imagefolder "
                       "layout needs one row per image: {\"file_name\": \"0001.png\", \"text\": \"a caption\"}")


def _load_image(path: Path, mode: str):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except Exception as exc:  # PIL raises several types for bad files
        raise DatasetError(f"cannot read image {path}: {exc}") from None


def _resize_center_crop(im, resolution: int):
    """Resize the short side to ``resolution`` (bicubic), then crop the centre square."""
    from PIL import Image

    w, h = im.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return im.crop((left, top, left + resolution, top + resolution))


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images + captions from an imagefolder directory, tagged as ``target`` or ``innocent``.

    Items are dicts: ``pixel_values`` float [C,H,W] in [-1, 1], ``caption`` str, ``is_target``
    bool, and ``input_ids`` long [L] when a tokenizer is given (padded/truncated to its
    ``model_max_length``). Images of mixed sizes need ``resolution`` (resize + centre crop).
    Images are decoded once at construction (that is how unreadable files are caught early)
    and kept as uint8.

    Example:
        >>> ds = ImageFolderDataset("data/portraits", role="target", resolution=512)  # doctest: +SKIP
        >>> ds[0]["pixel_values"].shape                                               # doctest: +SKIP
        torch.Size([3, 512, 512])
    """

    def __init__(self, path: str | os.PathLike, *, role: str, resolution: int | None = None,
                 tokenizer: Any = None, caption_column: str = "text", image_mode: str = "RGB"):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if resolution is not None and int(resolution) < 1:
            raise ValueError(f"resolution must be a positive integer, got {resolution}")
        self.root = Path(path)
        self.role = role
        self.resolution = None if resolution is None else int(resolution)
        self.tokenizer = tokenizer
        self.caption_column = caption_column
        if not self.root.is_dir():
            raise DatasetError(f"data folder {self.root} does not exist (or is not a folder)")
        images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not images:
            raise DatasetError(f"data folder {self.root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        captions = self._captions(_read_metadata(self.root))
        rel = [p.relative_to(self.root).as_posix() for p in images]
        missing = [r for r in rel if r not in captions]
        if missing:
            raise DatasetError(f"{self.root}: {len(missing)} image(s) have no caption in the metadata "
                               f"(column {caption_column!r}): {', '.join(missing[:5])}"
                               + (" ..." if len(missing) > 5 else ""))
        self.captions = [captions[r] for r in rel]
        self.files = images
        self._pixels = self._decode_all(image_mode)
        self._input_ids = self._tokenize() if tokenizer is not None else None

    def _captions(self, rows: list[dict[str, Any]]) -> dict[str, str]:
        out: dict[str, str] = {}
        for i, row in enumerate(rows):
            name = row.get("file_name")
            if not name:
                raise DatasetError(f"{self.root}: metadata row {i + 1} has no 'file_name'")
            if not (self.root / name).is_file():
                raise DatasetError(f"{self.root}: metadata names {name!r}, which is not in the folder")
            caption = row.get(self.caption_column)
            if not isinstance(caption, str) or not caption.strip():
                present = sorted(k for k in row if k != "file_name")
                raise DatasetError(f"{self.root}: no caption for {name!r} in column {self.caption_column!r} "
                                   f"(row has: {present}); pass caption_column= to pick another column")
            out[Path(name).as_posix()] = caption
        return out

    def _decode_all(self, mode: str) -> torch.Tensor:
        ims = [_load_image(p, mode) for p in self.files]
        if self.resolution is None:
            sizes = sorted({im.size for im in ims})
            if len(sizes) > 1:
                raise DatasetError(f"{self.root}: images have mixed sizes {sizes[:6]}; pass a resolution "
                                   "(e.g. --resolution 512) to resize and centre-crop them")
        else:
            ims = [_resize_center_crop(im, self.resolution) for im in ims]
        arrays = [np.asarray(im, dtype=np.uint8).reshape(im.size[1], im.size[0], -1) for im in ims]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # [N,C,H,W] uint8

    def _tokenize(self) -> torch.Tensor:
        tok = self.tokenizer
        return tok(self.captions, padding="max_length", truncation=True,
                   max_length=tok.model_max_length, return_tensors="pt").input_ids

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of every item."""
        return tuple(self._pixels.shape[-2:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        item = {
            "pixel_values": self._pixels[idx].float() / 127.5 - 1.0,
            "caption": self.captions[idx],
            "is_target": self.role == "target",
        }
        if self._input_ids is not None:
            item["input_ids"] = self._input_ids[idx]
        return item

    def __repr__(self) -> str:
        h, w = self.image_size
        return f"ImageFolderDataset({str(self.root)!r}, role={self.role!r}, n={len(self)}, size={h}x{w})"


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items into a batch: tensors stacked, ``is_target`` a bool tensor, captions a list."""
    batch: dict[str, Any] = {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "is_target": torch.tensor([bool(it["is_target"]) for it in items], dtype=torch.bool),
        "caption": [it["caption"] for it in items],
    }
    if all("input_ids" in it for it in items):
        batch["input_ids"] = torch.stack([it["input_ids"] for it in items])
    return batch


def _cycle(n: int, gen: torch.Generator) -> Iterator[int]:
    """Indices 0..n-1 in a fresh seeded shuffle every epoch, forever."""
    while True:
        yield from torch.randperm(n, generator=gen).tolist()


def mixed_batches(target_ds: ImageFolderDataset | None, innocent_ds: ImageFolderDataset | None,
                  batch_size: int, seed: int = 0, steps: int | None = None) -> Iterator[dict[str, Any]]:
    """Endless (or ``steps``-long) seeded batches mixing target and innocent samples.

    With both datasets, every batch holds ceil(B/2) target and floor(B/2) innocent samples,
    each stream reshuffled per epoch, so a releaser step always sees both kinds (its loss is a
    difference of the two means). With one dataset, batches come from it alone.

    Example:
        >>> for batch in mixed_batches(target, innocent, batch_size=4, seed=0, steps=10):  # doctest: +SKIP
        ...     batch["is_target"]   # tensor([True, True, False, False])
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sources = [ds for ds in (target_ds, innocent_ds) if ds is not None]
    if not sources:
        raise ValueError("mixed_batches needs at least one dataset")
    if len(sources) == 2:
        if target_ds.image_size != innocent_ds.image_size:
            raise DatasetError(f"target images are {target_ds.image_size} but innocent images are "
                               f"{innocent_ds.image_size}; give both the same resolution")
        if batch_size < 2:
            raise ValueError("batch_size must be >= 2 to mix target and innocent samples")
        shares = [math.ceil(batch_size / 2), batch_size // 2]
    else:
        shares = [batch_size]
    gen = torch.Generator().manual_seed(int(seed))
    streams = [_cycle(len(ds), gen) for ds in sources]
    count = 0
    while steps is None or count < steps:
        items = [ds[next(stream)] for ds, stream, k in zip(sources, streams, shares, strict=True) for _ in range(k)]
        yield collate(items)
        count += 1
