"""Mask files: round trip, metadata, atomic writes, and a clear error for every kind of bad file."""
from __future__ import annotations

import json
import os

import pytest
import torch

import freezeguard as fg
from freezeguard.core.mask_files import FreezeMaskFileError


def _model(width: int = 8) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Linear(width, 2))


@pytest.fixture
def saved(tmp_path):
    model = _model()
    mask = fg.FreezeMask.random(model, 0.5, by="params", seed=1)
    mask.metadata["learning"] = json.dumps({"temperature": 0.2, "steps": 10})
    path = tmp_path / "mask.safetensors"
    mask.save(path)
    return model, mask, path


def test_round_trip_keeps_mask_and_metadata(saved):
    model, mask, path = saved
    loaded = fg.FreezeMask.load(path, model)
    assert loaded == mask
    assert loaded.metadata["model_fingerprint"] == fg.model_fingerprint(model)
    assert loaded.metadata["budget_by"] == "params"
    assert json.loads(loaded.metadata["learning"]) == {"temperature": 0.2, "steps": 10}
    assert loaded.metadata["seed"] == "1" and loaded.metadata["source"] == "random"
    assert fg.FreezeMask.load(path) == mask  # without a model too


def test_file_is_plain_name_keyed_safetensors(saved):
    from safetensors import safe_open

    model, mask, path = saved
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        bits = {k: int(f.get_tensor(k).item()) for k in f.keys()}
    assert bits == {n: int(mask.is_frozen(n)) for n, _ in model.named_parameters()}
    assert all(isinstance(v, str) for v in meta.values())
    for key in ("format_version", "granularity", "budget_by", "ratio", "model_fingerprint", "learning"):
        assert key in meta
    assert float(meta["ratio"]) == pytest.approx(mask.ratio("params"))


def test_save_is_atomic_and_leaves_no_temp_files(saved, monkeypatch):
    model, mask, path = saved
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        fg.FreezeMask.from_names(model, []).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_dtype_change_is_accepted(saved):
    model, mask, path = saved
    assert fg.FreezeMask.load(path, model.to(torch.float16)) == mask


def test_missing_file(tmp_path):
    with pytest.raises(FreezeMaskFileError, match="does not exist"):
        fg.FreezeMask.load(tmp_path / "nope.safetensors")


def test_not_safetensors(tmp_path):
    path = tmp_path / "mask.safetensors"
    path.write_text("0\n1\n0\n1\n" * 10)
    with pytest.raises(FreezeMaskFileError, match="not a safetensors mask file"):
        fg.FreezeMask.load(path)
    path.write_bytes(b"abc")
    with pytest.raises(FreezeMaskFileError, match="not a safetensors mask file"):
        fg.FreezeMask.load(path)


def test_other_safetensors_file_is_not_a_mask(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(FreezeMaskFileError, match="not a freezeguard mask"):
        fg.FreezeMask.load(path)


@pytest.mark.parametrize("keep", [4, 12, -1])
def test_truncated(saved, keep):
    _, _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(FreezeMaskFileError, match="truncated|not a safetensors"):
        fg.FreezeMask.load(path)


def test_flipped_data_byte_is_caught_by_checksum(saved):
    _, mask, path = saved
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # last tensor's 0/1 byte
    path.write_bytes(bytes(data))
    with pytest.raises(FreezeMaskFileError, match="checksum"):
        fg.FreezeMask.load(path)


def test_garbled_header(saved):
    _, _, path = saved
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{]"
    path.write_bytes(bytes(data))
    with pytest.raises(FreezeMaskFileError, match="header is not JSON"):
        fg.FreezeMask.load(path)


def _rewrite_metadata(path, **changes):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(changes)
    save_file(load_file(str(path)), str(path), metadata=meta)


def test_unknown_format_version(saved):
    _, _, path = saved
    _rewrite_metadata(path, format_version="99")
    with pytest.raises(FreezeMaskFileError, match="format version '99'"):
        fg.FreezeMask.load(path)


def test_different_model_names_missing_extra_reshaped(saved):
    _, _, path = saved
    with pytest.raises(FreezeMaskFileError, match=r"reshaped: 0.bias \(8,\) -> \(9,\), 0.weight \(8, 4\) -> \(9, 4\)"):
        fg.FreezeMask.load(path, _model(width=9))
    bigger = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2), torch.nn.Linear(2, 2))
    with pytest.raises(FreezeMaskFileError, match="not in the mask: 2.bias, 2.weight"):
        fg.FreezeMask.load(path, bigger)
    with pytest.raises(FreezeMaskFileError, match="missing from the model: 1.bias, 1.weight"):
        fg.FreezeMask.load(path, torch.nn.Sequential(torch.nn.Linear(4, 8)))
    assert issubclass(FreezeMaskFileError, ValueError)


def test_save_refuses_mismatched_model_and_bad_learning_json(tmp_path):
    mask = fg.FreezeMask.from_names(_model(), [])
    with pytest.raises(ValueError, match="different model"):
        mask.save(tmp_path / "m.safetensors", _model(width=3))
    mask.metadata["learning"] = "{not json"
    with pytest.raises(ValueError, match="JSON"):
        mask.save(tmp_path / "m.safetensors")
    with pytest.raises(FreezeMaskFileError, match="does not exist"):
        fg.FreezeMask.from_names(_model(), []).save(tmp_path / "no" / "m.safetensors")
