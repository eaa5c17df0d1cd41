"""The built-in toy world: procedural classes, embeddings, the tiny model, sampling and the judge."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from freezeguard.integrations.diffusers import judge, toy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", toy.ALL_CLASSES + toy.EXTRA_CLASSES)
def test_draw_range_shape_and_determinism(name):
    a = toy.draw(name, np.random.default_rng(3))
    b = toy.draw(name, np.random.default_rng(3))
    assert a.shape == (toy.RESOLUTION, toy.RESOLUTION) and a.dtype == np.float32
    assert a.min() >= -1 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert a.std() > 0.3, "every class must have visible structure (foreground and background)"


def test_classes_differ_and_roles_are_disjoint():
    every = toy.ALL_CLASSES + toy.EXTRA_CLASSES
    imgs = {c: toy.make_batch([c], 8, seed=0)["pixel_values"].mean(0) for c in every}
    for i, a in enumerate(every):
        for b in every[i + 1:]:
            assert not torch.allclose(imgs[a], imgs[b], atol=0.05), (a, b)
    assert not set(toy.BASE_CLASSES) & (set(toy.TARGET_CLASSES) | set(toy.INNOCENT_CLASSES))
    assert not set(toy.TARGET_CLASSES) & set(toy.INNOCENT_CLASSES)
    assert not set(toy.EXTRA_CLASSES) & set(toy.ALL_CLASSES)   # outside the demo's world and judge


def test_unknown_class_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown toy class 'dog'"):
        toy.draw("dog", np.random.default_rng(0))


def test_class_embeddings_fixed_distinct_and_null_is_zero():
    e = toy.class_embedding("disc")
    assert e.shape == (toy.EMBED_LEN, toy.EMBED_DIM)
    assert torch.equal(e, toy.class_embedding("disc"))
    assert not torch.allclose(e, toy.class_embedding("square"))
    assert torch.count_nonzero(toy.class_embedding(toy.NULL_CLASS)) == 0


def test_make_batch_and_streams():
    b = toy.make_batch(["disc", "frame"], 3, seed=1)
    assert b["pixel_values"].shape == (6, 1, 16, 16)
    assert b["is_target"].tolist() == [False] * 3 + [True] * 3
    assert b["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    s1, s2 = toy.batches(toy.BASE_CLASSES, 8, seed=5, cond_dropout=0.5), toy.batches(toy.BASE_CLASSES, 8, seed=5, cond_dropout=0.5)
    x, y = next(s1), next(s2)
    assert torch.equal(x["pixel_values"], y["pixel_values"]) and torch.equal(x["encoder_hidden_states"], y["encoder_hidden_states"])
    dropped = (x["encoder_hidden_states"].abs().sum((1, 2)) == 0)
    assert 0 < int(dropped.sum()) < 8  # seed 5 drops some prompts, not all
    m = next(toy.mixed_batches(toy.TARGET_CLASSES, toy.INNOCENT_CLASSES, 6, seed=0))
    assert m["is_target"].tolist() == [True] * 3 + [False] * 3
    with pytest.raises(ValueError):
        next(toy.mixed_batches(toy.TARGET_CLASSES, toy.INNOCENT_CLASSES, 1, seed=0))


def test_model_loss_and_sampling_are_deterministic():
    model = toy.build_model(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), toy.build_model(seed=0).parameters(), strict=True))
    loss_fn = toy.make_loss_fn()
    batch = toy.make_batch(["disc"], 4, seed=0)
    batch["noise"] = torch.randn(4, 1, 16, 16)
    batch["timesteps"] = torch.tensor([0, 100, 500, 999])
    losses = loss_fn(model, batch)
    assert losses.shape == (4,) and torch.isfinite(losses).all()
    a = toy.sample(model, ["disc"], 2, seed=0, steps=2)
    b = toy.sample(model, ["disc"], 2, seed=0, steps=2, guidance=2.0)
    assert a.shape == (2, 1, 16, 16) and a.abs().max() <= 1
    assert torch.equal(a, toy.sample(model, ["disc"], 2, seed=0, steps=2))
    assert not torch.equal(a, b)


def test_pretrained_model_is_cached(tmp_path):
    cfg = toy.PretrainConfig(steps=2, batch_size=4)
    m1 = toy.pretrained_model(cfg, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.glob("toy-*.safetensors"))
    assert len(files) == 1
    m2 = toy.pretrained_model(cfg, cache_dir=tmp_path, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters(), strict=True))
    fresh = toy.build_model(cfg.model, seed=cfg.seed)
    assert not all(torch.equal(a, b) for a, b in zip(m1.parameters(), fresh.parameters(), strict=True)), "training changed nothing"
    assert toy.PretrainConfig(steps=3).key() != cfg.key()


def test_judge_learns_the_classes(tmp_path):
    j = judge.train_judge(steps=150, cache_dir=tmp_path, progress=False)
    assert judge.accuracy(j, n_per_class=16) > 0.9
    batch = toy.make_batch(["checker"], 8, seed=9)["pixel_values"]
    assert judge.recognisability(j, batch, "checker") > 0.5
    assert judge.recognisability(j, batch, "disc") < 0.2
    j2 = judge.train_judge(steps=150, cache_dir=tmp_path, progress=False)  # from cache
    assert torch.equal(judge.class_probabilities(j, batch), judge.class_probabilities(j2, batch))
    with pytest.raises(ValueError, match="does not know class"):
        judge.recognisability(j, batch, "dog")
    with pytest.raises(ValueError, match="expects"):
        judge.class_probabilities(j, torch.zeros(2, 3, 16, 16))
