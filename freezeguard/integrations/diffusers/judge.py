"""The judge: a small CNN that tells how recognisable generated toy images are, per class.

Held-out denoising loss mostly measures generic denoising (docs/DESIGN.md section 7); what a
FreezeAsGuard publisher cares about is whether the fine-tuned model *produces recognisable
images of the target*. For the built-in data, a classifier trained on the procedural classes
answers that: recognisability of class c = the judge's mean probability of c on images
generated for prompt c.

Example:
    >>> from freezeguard.integrations.diffusers import judge, toy
    >>> j = judge.train_judge(steps=5, cache_dir=False, progress=False)
    >>> images = toy.make_batch(["disc"], n_per_class=4, seed=1)["pixel_values"]
    >>> judge.recognisability(j, images, "disc") >= 0.0
    True
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from freezeguard.core.files import atomic_path
from freezeguard.integrations.diffusers import toy


class Judge(nn.Module):
    """Two conv layers and a linear head over 16x16 grayscale images; ``classes`` names the outputs."""

    def __init__(self, classes: Sequence[str] = toy.ALL_CLASSES, width: int = 16):
        super().__init__()
        self.classes = tuple(classes)
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * (toy.RESOLUTION // 4) ** 2, len(self.classes)),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Generated samples are blurrier and noisier than the procedural ones; training on
    # perturbed images keeps the judge from calling every imperfect sample "unrecognisable".
    noise = torch.randn(x.shape, generator=gen) * torch.rand(x.shape[0], 1, 1, 1, generator=gen) * 0.3
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(x.shape[0], 1, 1, 1, generator=gen) * 0.5
    return ((1 - mix) * x + mix * blur + noise).clamp(-1, 1)


def cache_path(cache_dir: str | os.PathLike | None, classes: Sequence[str] = toy.ALL_CLASSES, *,
               steps: int = 300, batch_size: int = 64, seed: int = 0) -> Path:
    """Where ``train_judge`` caches a judge trained with these settings."""
    key = hashlib.sha256(json.dumps([list(classes), steps, batch_size, seed, "v1"]).encode()).hexdigest()[:12]
    return Path(cache_dir or toy.default_cache_dir()) / f"judge-{key}.safetensors"


def train_judge(classes: Sequence[str] = toy.ALL_CLASSES, *, steps: int = 300, batch_size: int = 64,
                seed: int = 0, cache_dir: str | os.PathLike | None | bool = None,
                progress: bool = True) -> Judge:
    """Train (or load from cache) the judge on fresh procedural images of ``classes``."""
    if not classes:
        raise ValueError("the judge needs at least one class")
    judge = Judge(classes)
    path = None
    if cache_dir is not False:
        path = cache_path(cache_dir, classes, steps=steps, batch_size=batch_size, seed=seed)
        if path.exists():
            judge.load_state_dict(load_file(str(path)))
            return judge.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = Judge(classes)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(judge.parameters(), lr=2e-3)
        stream = toy.batches(tuple(classes), batch_size, seed=seed + 7)
        for _ in tqdm(range(steps), desc="train judge", disable=not progress, leave=False):
            batch = next(stream)
            loss = F.cross_entropy(judge(_augment(batch["pixel_values"], gen)), batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # a concurrent or interrupted run never leaves half a cache file
            save_file(judge.state_dict(), str(tmp))
    return judge.eval()


@torch.no_grad()
def class_probabilities(judge: Judge, images: torch.Tensor) -> torch.Tensor:
    """Softmax over the judge's classes, [B, C]."""
    if images.ndim != 4 or images.shape[1:] != (1, toy.RESOLUTION, toy.RESOLUTION):
        raise ValueError(f"judge expects [B,1,{toy.RESOLUTION},{toy.RESOLUTION}] images, got {tuple(images.shape)}")
    return judge(images.float().cpu()).softmax(-1)


def recognisability(judge: Judge, images: torch.Tensor, name: str) -> float:
    """Mean probability the judge gives class ``name`` on ``images`` (0 = never, 1 = always)."""
    if name not in judge.classes:
        raise ValueError(f"the judge does not know class {name!r}; it knows {', '.join(judge.classes)}")
    return float(class_probabilities(judge, images)[:, judge.classes.index(name)].mean())


def accuracy(judge: Judge, classes: Sequence[str] = toy.ALL_CLASSES, n_per_class: int = 32, seed: int = 123) -> float:
    """Accuracy on fresh procedural images (a sanity check of the judge itself)."""
    batch = toy.make_batch(list(classes), n_per_class, seed)
    pred = class_probabilities(judge, batch["pixel_values"]).argmax(-1)
    want = torch.tensor([judge.classes.index(c) for c in classes]).repeat_interleave(n_per_class)
    return float((pred == want).float().mean())
