"""freezeguard.integrations.diffusers.data: imagefolder datasets, roles, early errors, mixed batches."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402
from support.tiny_models import build_tiny_components, write_tiny_clip_tokenizer_files, write_tiny_imagefolder  # noqa: E402

from freezeguard.integrations.diffusers import DatasetError, ImageFolderDataset, mixed_batches  # noqa: E402


def _metadata(folder, rows):
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_dataset_items(tmp_path):
    d = write_tiny_imagefolder(tmp_path / "t", n=5, caption="a photo of sks", seed=0, size=12, style="rings")
    ds = ImageFolderDataset(d, role="target")
    assert len(ds) == 5 and ds.image_size == (12, 12)
    item = ds[3]
    assert item["pixel_values"].shape == (3, 12, 12) and item["pixel_values"].dtype == torch.float32
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert item["pixel_values"].std() > 0.05  # an image, not a constant
    assert item["is_target"] is True and item["caption"] == "a photo of sks"
    assert ImageFolderDataset(d, role="innocent")[0]["is_target"] is False
    # pixel values decode back to the PNG's bytes
    png = torch.from_numpy(__import__("numpy").array(Image.open(ds.files[3]))).permute(2, 0, 1).float()
    torch.testing.assert_close((item["pixel_values"] + 1) * 127.5, png, atol=1e-4, rtol=0)


def test_styles_and_seeds_differ(tmp_path):
    a = ImageFolderDataset(write_tiny_imagefolder(tmp_path / "a", n=2, seed=0, style="stripes"), role="target")
    b = ImageFolderDataset(write_tiny_imagefolder(tmp_path / "b", n=2, seed=1, style="stripes"), role="target")
    c = ImageFolderDataset(write_tiny_imagefolder(tmp_path / "c", n=2, seed=0, style="checker"), role="target")
    assert not torch.equal(a[0]["pixel_values"], b[0]["pixel_values"])
    assert not torch.equal(a[0]["pixel_values"], c[0]["pixel_values"])
    with pytest.raises(ValueError, match="unknown style"):
        write_tiny_imagefolder(tmp_path / "d", n=1, style="nope")


def test_tokenizer_gives_fixed_length_ids(tmp_path):
    tok = build_tiny_components(seed=0, tokenizer_dir=tmp_path / "tok")["tokenizer"]
    assert (tmp_path / "tok" / "vocab.json").is_file()
    d = write_tiny_imagefolder(tmp_path / "t", n=2, caption="a photo of sks dog")
    item = ImageFolderDataset(d, role="target", tokenizer=tok)[0]
    assert item["input_ids"].shape == (tok.model_max_length,)
    assert item["input_ids"][0] == tok.bos_token_id


def test_caption_column(tmp_path):
    d = write_tiny_imagefolder(tmp_path / "t", n=2, caption="hello", caption_column="prompt")
    assert ImageFolderDataset(d, role="target", caption_column="prompt")[0]["caption"] == "hello"
    with pytest.raises(DatasetError, match="no caption.*'text'"):
        ImageFolderDataset(d, role="target")


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", role="target")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", role="target")


def test_missing_metadata_or_captions(tmp_path):
    d = write_tiny_imagefolder(tmp_path / "t", n=3)
    (d / "metadata.jsonl").unlink()
    with pytest.raises(DatasetError, match="metadata.jsonl"):
        ImageFolderDataset(d, role="target")
    _metadata(d, [{"file_name": "stripes_0000.png", "text": "a"}, {"file_name": "stripes_0001.png", "text": "b"}])
    with pytest.raises(DatasetError, match="have no caption.*stripes_0002.png"):
        ImageFolderDataset(d, role="target")
    _metadata(d, [{"file_name": f"stripes_000{i}.png", "text": ""} for i in range(3)])
    with pytest.raises(DatasetError, match="no caption"):
        ImageFolderDataset(d, role="target")
    _metadata(d, [{"file_name": "missing.png", "text": "x"}])
    with pytest.raises(DatasetError, match="not in the folder"):
        ImageFolderDataset(d, role="target")
    (d / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(DatasetError, match="not valid JSON"):
        ImageFolderDataset(d, role="target")


def test_mixed_sizes_need_a_resolution(tmp_path):
    d = write_tiny_imagefolder(tmp_path / "t", n=2, size=16)
    Image.new("RGB", (24, 20), (255, 0, 0)).save(d / "big.png")
    with open(d / "metadata.jsonl", "a") as fh:
        fh.write(json.dumps({"file_name": "big.png", "text": "red"}) + "\n")
    with pytest.raises(DatasetError, match="mixed sizes.*resolution"):
        ImageFolderDataset(d, role="target")
    ds = ImageFolderDataset(d, role="target", resolution=8)
    assert ds.image_size == (8, 8)
    red = ds[ds.files.index(d / "big.png")]["pixel_values"]
    torch.testing.assert_close(red[:, 4, 4], torch.tensor([1.0, -1.0, -1.0]))


def test_unreadable_image(tmp_path):
    d = write_tiny_imagefolder(tmp_path / "t", n=2)
    (d / "stripes_0001.png").write_bytes(b"definitely not a png")
    with pytest.raises(DatasetError, match="cannot read image.*stripes_0001.png"):
        ImageFolderDataset(d, role="target")


def test_bad_role_and_resolution(tmp_path):
    d = write_tiny_imagefolder(tmp_path / "t", n=1)
    with pytest.raises(ValueError, match="role"):
        ImageFolderDataset(d, role="illegal")
    with pytest.raises(ValueError, match="resolution"):
        ImageFolderDataset(d, role="target", resolution=0)


def test_mixed_batches_balance_and_determinism(tmp_path):
    tgt = ImageFolderDataset(write_tiny_imagefolder(tmp_path / "t", n=3, caption="sks", style="checker"), role="target")
    inn = ImageFolderDataset(write_tiny_imagefolder(tmp_path / "i", n=4, caption="dog", seed=1), role="innocent")
    batches = list(mixed_batches(tgt, inn, batch_size=5, seed=7, steps=6))
    assert len(batches) == 6
    for b in batches:
        assert b["pixel_values"].shape == (5, 3, 16, 16)
        assert b["is_target"].dtype == torch.bool and b["is_target"].tolist() == [True] * 3 + [False] * 2
        assert b["caption"] == ["sks"] * 3 + ["dog"] * 2
    again = list(mixed_batches(tgt, inn, batch_size=5, seed=7, steps=6))
    other = list(mixed_batches(tgt, inn, batch_size=5, seed=8, steps=6))
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(batches, again, strict=True))
    assert not all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(batches, other, strict=True))
    # each target epoch (3 samples) visits every target image once
    first_epoch = torch.cat([b["pixel_values"][:3] for b in batches[:1]])
    assert len({tuple(x.flatten()[:20].tolist()) for x in first_epoch}) == 3


def test_mixed_batches_single_dataset_and_errors(tmp_path):
    tgt = ImageFolderDataset(write_tiny_imagefolder(tmp_path / "t", n=3), role="target")
    b = next(mixed_batches(tgt, None, batch_size=2, seed=0))
    assert b["is_target"].tolist() == [True, True]
    with pytest.raises(ValueError, match=">= 2"):
        next(mixed_batches(tgt, tgt, batch_size=1, seed=0))
    small = ImageFolderDataset(write_tiny_imagefolder(tmp_path / "s", n=2, size=8), role="innocent")
    with pytest.raises(DatasetError, match="same resolution"):
        next(mixed_batches(tgt, small, batch_size=2, seed=0))
    with pytest.raises(ValueError, match="at least one"):
        next(mixed_batches(None, None, batch_size=2, seed=0))


def test_tokenizer_files_are_plain_bpe(tmp_path):
    out = write_tiny_clip_tokenizer_files(tmp_path)
    vocab = json.loads((out / "vocab.json").read_text())
    assert "<|startoftext|>" in vocab and "<|endoftext|>" in vocab
    assert (out / "merges.txt").read_text().startswith("#version")
