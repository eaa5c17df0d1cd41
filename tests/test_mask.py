"""FreezeMask: construction, budgets, queries, apply_, reference txt files, LoRA exclusions."""
from __future__ import annotations

import math

import pytest
import torch

import freezeguard as fg
from freezeguard.core.mask_files import FreezeMaskFileError


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2),
                               torch.nn.LayerNorm(2))


def test_from_names_and_queries():
    model = _model()
    mask = fg.FreezeMask.from_names(model, ["2.weight", "0.bias"])
    assert mask.frozen_names == ["0.bias", "2.weight"]
    assert mask.is_frozen("2.weight") and not mask.is_frozen("0.weight")
    assert mask.ratio("tensors") == pytest.approx(2 / 6)
    total = sum(p.numel() for p in model.parameters())
    assert mask.ratio("params") == pytest.approx((8 + 16) / total)
    assert mask.metadata["model_fingerprint"] == fg.model_fingerprint(model)
    with pytest.raises(KeyError, match="nope"):
        fg.FreezeMask.from_names(model, ["nope"])


def test_random_meets_budget_and_is_seeded():
    model = _model()
    a = fg.FreezeMask.random(model, 0.5, by="tensors", seed=3)
    assert len(a.frozen_names) == 3
    assert a == fg.FreezeMask.random(model, 0.5, by="tensors", seed=3)
    assert a.metadata["budget_by"] == "tensors" and float(a.metadata["target_ratio"]) == 0.5
    p = fg.FreezeMask.random(model, 0.5, by="params", seed=0)
    assert p.metadata["budget_by"] == "params"
    with pytest.raises(ValueError):
        fg.FreezeMask.random(model, 1.5)


def test_from_scores_takes_top():
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    scores = {n: float(i) for i, n in enumerate(names)}
    mask = fg.FreezeMask.from_scores(model, scores, ratio=2 / 6)
    assert mask.frozen_names == sorted(names[-2:])


def test_apply_and_check_model():
    model = _model()
    mask = fg.FreezeMask.from_names(model, ["0.weight"])
    mask.apply_(model)
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    mask.check_model(_model())
    other = torch.nn.Sequential(torch.nn.Linear(4, 9))
    with pytest.raises(ValueError, match="missing from the model"):
        mask.check_model(other)


def test_from_reference_txt(tmp_path):
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    path = tmp_path / "mask.txt"
    # numpy.savetxt style numbers are accepted, a trailing blank line is ignored
    path.write_text("1\n0\n1.000000000000000000e+00\n0\n0\n0.0\n\n")
    mask = fg.FreezeMask.from_reference_txt(model, path)
    assert mask.frozen_names == sorted([names[0], names[2]])
    path.write_text("1\n0\n")
    with pytest.raises(FreezeMaskFileError, match="2 entries but the model has 6"):
        fg.FreezeMask.from_reference_txt(model, path)
    path.write_text("1\n0\n2\n0\n0\n0\n")
    with pytest.raises(FreezeMaskFileError, match=":3: expected 0 or 1"):
        fg.FreezeMask.from_reference_txt(model, path)
    with pytest.raises(FreezeMaskFileError, match="does not exist"):
        fg.FreezeMask.from_reference_txt(model, tmp_path / "missing.txt")


def test_lora_exclude_modules_names_owners_of_frozen_tensors():
    model = _model()
    mask = fg.FreezeMask.from_names(model, ["2.weight", "3.bias"])
    assert mask.lora_exclude_modules(model) == ["2", "3"]


def test_repr_mentions_counts():
    model = _model()
    r = repr(fg.FreezeMask.random(model, 0.5, seed=0))
    assert "3/6" in r and math.isfinite(float(r.split(", ")[1].split("%")[0]))
