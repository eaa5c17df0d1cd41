"""The built-in tiny world of the demo: procedural 16x16 shape classes and a tiny pixel UNet.

Nothing is downloaded. Images are drawn procedurally (seeded), and each class is "prompted" by a
fixed random embedding [L, D] derived from its name, playing the part of a frozen text encoder.
The classes are split by role so the FreezeAsGuard question is meaningful at this scale:

- *base* classes (solid shapes and wide bars) are what the published model is pretrained on;
- the *target* (illegal) class, "frame", is a thin square outline: one-to-two-pixel lines that no
  base class has, so producing it needs new spatial knowledge (the analogue of a real person's
  face). Measured: the hardest of the new classes to learn by fine-tuning;
- the *innocent* (legal) class, "checker", is a checkerboard, the product of the horizontal and
  vertical bars the model already draws, so fine-tuning on it needs little new knowledge.

Example:
    >>> from freezeguard.integrations.diffusers import toy
    >>> batch = toy.make_batch(["disc", "frame"], n_per_class=2, seed=0)
    >>> batch["pixel_values"].shape, batch["encoder_hidden_states"].shape
    (torch.Size([4, 1, 16, 16]), torch.Size([4, 4, 32]))
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from freezeguard.core.files import atomic_path
from freezeguard.core.training import train_steps
from freezeguard.integrations.diffusers.loss import make_loss_fn as _make

RESOLUTION = 16
EMBED_LEN = 4      # "prompt tokens" per class
EMBED_DIM = 32     # = the UNet's cross_attention_dim

BASE_CLASSES = ("disc", "square", "hbars", "vbars", "diamond")
TARGET_CLASSES = ("frame",)
INNOCENT_CLASSES = ("checker",)
ALL_CLASSES = BASE_CLASSES + TARGET_CLASSES + INNOCENT_CLASSES
# Drawable, but outside the demo's world (and its judge): a solid "triangle", a new shape as
# coarse as the base classes, for experiments with an innocent domain unlike the thin target
# (benchmarks/eval_power.py --innocent triangle).
EXTRA_CLASSES = ("triangle",)
# The known family of the second world (docs/evaluation.md): procedural faces. "person" draws a face
# of random geometry (the shared class, as "a photo of a person"); "person k" always draws member k's
# own geometry (head size and shape, eye spacing and height, mouth width and height), each bound to
# its own prompt, as a public figure's name is. Members differ in every coordinate of the geometry.
FAMILY = "person"
FAMILY_SIZE = 8
FAMILY_MEMBERS = tuple(f"{FAMILY} {k}" for k in range(FAMILY_SIZE))
NULL_CLASS = ""    # the unconditional prompt (all-zero embedding), for classifier-free guidance


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy + 0.5, xx + 0.5


# head half-width, head half-height, eye half-spacing, eye height above the centre, mouth half-width,
# mouth depth below the centre (pixels at 16x16)
_FACE_RANGES = np.array([[4.0, 6.5], [5.0, 7.2], [1.4, 3.2], [0.8, 2.8], [0.8, 3.4], [1.8, 3.8]], dtype=np.float64)


def member_geometry(k: int) -> np.ndarray:
    """Member ``k``'s face geometry (see ``_FACE_RANGES``): a fixed Latin-hypercube point, so any two
    members differ in every coordinate by at least 1/FAMILY_SIZE of its range.

    Example:
        >>> bool((abs(member_geometry(0) - member_geometry(1)) > 0).all())
        True
    """
    if not 0 <= k < FAMILY_SIZE:
        raise ValueError(f"family member {k} out of range 0..{FAMILY_SIZE - 1}")
    perms = np.random.default_rng(20261207).permuted(np.tile(np.arange(FAMILY_SIZE), (len(_FACE_RANGES), 1)), axis=1)
    lo, hi = _FACE_RANGES[:, 0], _FACE_RANGES[:, 1]
    return lo + (hi - lo) * (perms[:, k] + 0.5) / FAMILY_SIZE


def _face(yy: np.ndarray, xx: np.ndarray, geometry: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    a, b, spacing, eye_h, mouth_w, mouth_d = geometry * rng.uniform(0.95, 1.05)   # a little pose/scale jitter
    cy, cx = size / 2 + rng.uniform(-1.0, 1.0, 2)
    head = ((yy - cy) / b) ** 2 + ((xx - cx) / a) ** 2 <= 1.0
    spacing = min(spacing, a - 1.2)            # the eyes stay inside a narrow head
    eyes = np.zeros_like(head)
    for side in (-1.0, 1.0):
        eyes |= (yy - (cy - eye_h)) ** 2 + (xx - (cx + side * spacing)) ** 2 <= 1.0
    mouth = (np.abs(yy - (cy + mouth_d)) <= 0.6) & (np.abs(xx - cx) <= mouth_w)
    return head & ~eyes & ~mouth


def draw(name: str, rng: np.random.Generator, size: int = RESOLUTION) -> np.ndarray:
    """One image of class ``name``: float32 [size, size] in [-1, 1], with seeded variety."""
    yy, xx = _grid(size)
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    r = rng.uniform(0.2, 0.32) * size
    if name == FAMILY:
        lo, hi = _FACE_RANGES[:, 0], _FACE_RANGES[:, 1]
        on = _face(yy, xx, rng.uniform(lo, hi), rng, size)
    elif name in FAMILY_MEMBERS:
        on = _face(yy, xx, member_geometry(int(name.rsplit(" ", 1)[1])), rng, size)
    elif name == "disc":
        on = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
    elif name == "square":
        on = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    elif name == "diamond":
        on = np.abs(yy - cy) + np.abs(xx - cx) <= r * 1.2
    elif name in ("hbars", "vbars"):
        period = rng.uniform(4.0, 6.0)
        coord = yy if name == "hbars" else xx
        on = np.sin(2 * np.pi * coord / period + rng.uniform(0, 2 * np.pi)) > 0
    elif name == "frame":
        half = r * 0.95
        outer = (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
        inner = (np.abs(yy - cy) <= half - 1.6) & (np.abs(xx - cx) <= half - 1.6)
        on = outer & ~inner
    elif name == "triangle":
        # a solid upward triangle: a new shape, but as coarse as the base classes
        on = (yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) * 0.6)
    elif name == "checker":
        cell = int(rng.integers(2, 4))
        oy, ox = rng.integers(0, cell, 2)
        on = (((yy.astype(int) + oy) // cell + (xx.astype(int) + ox) // cell) % 2) == 1
    else:
        raise ValueError(f"unknown toy class {name!r}; known: "
                         f"{', '.join(ALL_CLASSES + EXTRA_CLASSES + (FAMILY,) + FAMILY_MEMBERS)}")
    fg_level = rng.uniform(0.6, 1.0)
    bg_level = rng.uniform(-1.0, -0.6)
    img = np.where(on, fg_level, bg_level).astype(np.float32)
    img += rng.normal(0.0, 0.03, img.shape).astype(np.float32)
    return np.clip(img, -1.0, 1.0)


def class_embedding(name: str) -> torch.Tensor:
    """The fixed "text encoding" [EMBED_LEN, EMBED_DIM] of a class (zeros for the null prompt).

    Seeded by a hash of the name, so it is the same on every machine and every run.
    """
    if name == NULL_CLASS:
        return torch.zeros(EMBED_LEN, EMBED_DIM)
    seed = int.from_bytes(hashlib.sha256(f"freezeguard-toy/{name}".encode()).digest()[:4], "little")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(EMBED_LEN, EMBED_DIM, generator=gen)


def fresh_prompt(name: str) -> str:
    """The prompt a *fresh-token* attacker binds class ``name`` to: a new name, hence a new random
    embedding that no eraser edited and no pretraining saw.

    Example:
        >>> fresh_prompt("frame")
        'frame (fresh token)'
    """
    return f"{name} (fresh token)"


def make_batch(classes: Sequence[str], n_per_class: int, seed: int, *,
               target_classes: Sequence[str] = TARGET_CLASSES,
               prompts: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """A batch with ``n_per_class`` fresh images of each class (class-major order).

    Keys: "pixel_values" [B,1,16,16], "encoder_hidden_states" [B,L,D], "labels" (index into
    ``classes``) and "is_target" (class in ``target_classes``). ``prompts`` maps a class to the
    name whose embedding prompts it (default: its own; :func:`fresh_prompt` for a fresh token).
    """
    if n_per_class < 1 or not classes:
        raise ValueError("make_batch needs at least one class and n_per_class >= 1")
    rng = np.random.default_rng(seed)
    images, embeds, labels, is_target = [], [], [], []
    for k, name in enumerate(classes):
        emb = class_embedding((prompts or {}).get(name, name))
        for _ in range(n_per_class):
            images.append(draw(name, rng))
            embeds.append(emb)
            labels.append(k)
            is_target.append(name in target_classes)
    return {
        "pixel_values": torch.from_numpy(np.stack(images))[:, None],
        "encoder_hidden_states": torch.stack(embeds),
        "labels": torch.tensor(labels),
        "is_target": torch.tensor(is_target),
    }


def batches(classes: Sequence[str], batch_size: int, seed: int, *, cond_dropout: float = 0.0,
            target_classes: Sequence[str] = TARGET_CLASSES,
            prompts: Mapping[str, str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """An endless seeded stream of random-class batches (a fresh procedural draw each time).

    ``cond_dropout`` replaces that share of prompts by the null prompt (classifier-free guidance
    training, as in Stable Diffusion's pretraining). ``prompts`` as in :func:`make_batch`.
    """
    rng = np.random.default_rng(seed)
    null = class_embedding(NULL_CLASS)
    embeds = {c: class_embedding((prompts or {}).get(c, c)) for c in classes}
    while True:
        names = [classes[i] for i in rng.integers(0, len(classes), batch_size)]
        imgs = np.stack([draw(c, rng) for c in names])
        drop = rng.random(batch_size) < cond_dropout
        yield {
            "pixel_values": torch.from_numpy(imgs)[:, None],
            "encoder_hidden_states": torch.stack([null if d else embeds[c] for c, d in zip(names, drop, strict=True)]),
            "labels": torch.tensor([classes.index(c) for c in names]),
            "is_target": torch.tensor([c in target_classes for c in names]),
        }


def mixed_batches(target: Sequence[str], innocent: Sequence[str], batch_size: int,
                  seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches, half target and half innocent samples (the learner's input)."""
    if batch_size < 2:
        raise ValueError("mixed batches need batch_size >= 2 (half target, half innocent)")
    t = batches(target, batch_size // 2, seed, target_classes=target)
    i = batches(innocent, batch_size - batch_size // 2, seed + 1, target_classes=target)
    return joined(t, i)


def joined(*streams: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches, each one batch of every stream concatenated. ``labels`` index each stream's
    own class list, so they are left out (no loss needs them)."""
    while True:
        parts = [next(s) for s in streams]
        yield {k: torch.cat([p[k] for p in parts]) for k in ("pixel_values", "encoder_hidden_states", "is_target")}


# ---------------------------------------------------------------------------------------------
# the tiny model
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToyModelConfig:
    """Architecture of the tiny pixel-space class-conditional UNet (all sizes small on purpose)."""

    block_out_channels: tuple[int, ...] = (16, 32)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"

    def to_json(self) -> dict:
        return asdict(self)


def build_model(config: ToyModelConfig = ToyModelConfig(), seed: int = 0):
    """A freshly initialised tiny ``UNet2DConditionModel`` (1 channel, 16x16), seeded."""
    from diffusers import UNet2DConditionModel

    n = len(config.block_out_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=RESOLUTION, in_channels=1, out_channels=1,
            block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
            down_block_types=down, up_block_types=up, cross_attention_dim=EMBED_DIM,
            attention_head_dim=config.attention_head_dim, norm_num_groups=config.norm_num_groups,
        )


def build_scheduler(config: ToyModelConfig = ToyModelConfig()):
    """The training noise scheduler (DDPM, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         clip_sample=True)


def make_loss_fn(config: ToyModelConfig = ToyModelConfig()) -> Callable:
    """Per-sample diffusion loss of the toy model (freezeguard.integrations.diffusers's loss, pixel space)."""
    return _make(build_scheduler(config))


@torch.no_grad()
def sample(model, classes: Sequence[str], n_per_class: int, seed: int, *, steps: int = 20,
           guidance: float = 1.0, config: ToyModelConfig = ToyModelConfig()) -> torch.Tensor:
    """Generate ``n_per_class`` images per class with DDIM: float [B,1,16,16] in [-1, 1].

    Deterministic for a given seed. ``guidance`` > 1 applies classifier-free guidance against
    the null prompt (the model is pretrained with prompt dropout).
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                          clip_sample=True, set_alpha_to_one=True)
    sched.set_timesteps(steps)
    device = next(model.parameters()).device
    cond = torch.stack([class_embedding(c) for c in classes for _ in range(n_per_class)]).to(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(cond), 1, RESOLUTION, RESOLUTION, generator=gen).to(device)
    null = class_embedding(NULL_CLASS).to(device).expand_as(cond)
    was_training = model.training
    model.eval()
    for t in sched.timesteps:
        if guidance == 1.0:
            eps = model(x, t, encoder_hidden_states=cond, return_dict=False)[0]
        else:
            both = model(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([cond, null]), return_dict=False)[0]
            e_c, e_u = both.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        x = sched.step(eps, t, x).prev_sample
    model.train(was_training)
    return x.clamp(-1, 1).cpu()


# ---------------------------------------------------------------------------------------------
# pretraining (the "published" model), cached
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainConfig:
    """How the published toy model is pretrained on the base classes."""

    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    classes: tuple[str, ...] = BASE_CLASSES
    steps: int = 800
    batch_size: int = 32
    lr: float = 2e-3
    cond_dropout: float = 0.1
    seed: int = 0

    def key(self) -> str:
        """Short hash naming the cache entry (any change in the config retrains)."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def train(model, stream: Iterator[dict], steps: int, lr: float, loss_fn: Callable, *, seed: int,
          progress: str | None = None) -> list[float]:
    """Plain AdamW (no weight decay) on ``stream`` at a constant lr, seeded; returns the per-step losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    with tqdm(total=steps, desc=progress, disable=progress is None, leave=False) as bar:
        return train_steps(model, opt, stream, loss_fn, steps, generator=torch.Generator().manual_seed(seed),
                           progress=bar)


def default_cache_dir() -> Path:
    """``$FREEZEGUARD_CACHE`` or ``~/.cache/freezeguard``."""
    return Path(os.environ.get("FREEZEGUARD_CACHE", Path.home() / ".cache" / "freezeguard"))


def pretrained_model(config: PretrainConfig = PretrainConfig(), cache_dir: str | os.PathLike | None = None,
                     *, progress: bool = True, device: str | torch.device = "cpu"):
    """The published toy model: pretrained on the base classes, loaded from cache when present.

    The cache entry is ``<cache_dir>/toy-<hash of config>.safetensors``; with ``cache_dir=None``
    the default cache is used, ``cache_dir=False`` disables caching.
    """
    model = build_model(config.model, seed=config.seed)
    path = None
    if cache_dir is not False:
        path = Path(cache_dir or default_cache_dir()) / f"toy-{config.key()}.safetensors"
        if path.exists():
            model.load_state_dict(load_file(str(path)))
            return model.to(device)
    model.to(device)
    stream = batches(config.classes, config.batch_size, seed=config.seed, cond_dropout=config.cond_dropout)
    train(model, stream, config.steps, config.lr, make_loss_fn(config.model), seed=config.seed,
          progress="pretrain tiny model" if progress else None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # unique temporary name, fsync, rename
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                      metadata={"config": json.dumps(asdict(config))})
    return model
