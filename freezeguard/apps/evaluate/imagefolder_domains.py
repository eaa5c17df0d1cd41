"""Evaluation domains from imagefolder data for a local diffusers Stable Diffusion pipeline."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from freezeguard.apps.evaluate.harness import Domain
from freezeguard.integrations.diffusers.data import ImageFolderDataset, collate


def _latent_shape(comps, pixel_shape: tuple[int, ...]) -> tuple[int, ...]:
    b, _, h, w = pixel_shape
    if comps.vae is None:
        return tuple(pixel_shape)
    factor = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    return (b, comps.vae.config.latent_channels, h // factor, w // factor)


def _fixed_batch(comps, items: list[dict[str, Any]], seed: int, *, empty_prompt: bool) -> dict[str, Any]:
    batch = collate(items)
    gen = torch.Generator().manual_seed(seed)
    batch["noise"] = torch.randn(_latent_shape(comps, tuple(batch["pixel_values"].shape)), generator=gen)
    n = len(items)
    t = int(comps.noise_scheduler.config.num_train_timesteps)
    batch["timesteps"] = torch.linspace(0, t - 1, n).round().long()
    if empty_prompt and "input_ids" in batch and comps.tokenizer is not None:
        empty = comps.tokenizer([""] * n, padding="max_length", truncation=True,
                                max_length=comps.tokenizer.model_max_length, return_tensors="pt")
        batch["input_ids"] = empty.input_ids
    return batch


def imagefolder_domains(comps, target_dir: str, innocent_dirs: Sequence[str], *, heldout: int = 4,
                        batch_size: int = 4, resolution: int | None = None, seed: int = 0) -> list[Domain]:
    """One Domain per imagefolder: the last ``heldout`` images are held out, the rest train.

    Example:
        >>> domains = imagefolder_domains(load_components("sd"), "data/target", ["data/legal"])  # doctest: +SKIP
    """
    domains = []
    for k, (path, role) in enumerate([(target_dir, "target")] + [(p, "innocent") for p in innocent_dirs]):
        ds = ImageFolderDataset(path, role=role, resolution=resolution, tokenizer=comps.tokenizer)
        if len(ds) <= heldout:
            raise ValueError(f"{path}: {len(ds)} image(s) but {heldout} are held out; add images or lower --heldout")
        train_idx = list(range(len(ds) - heldout))
        held = [ds[i] for i in range(len(ds) - heldout, len(ds))]

        def stream(s: int, ds=ds, idx=train_idx):
            gen = torch.Generator().manual_seed(s)
            while True:
                order = torch.randint(0, len(idx), (batch_size,), generator=gen).tolist()
                yield collate([ds[idx[i]] for i in order])

        domains.append(Domain(name=f"{role}:{ds.root.name}", role=role, train_batches=stream,
                              heldout=_fixed_batch(comps, held, seed + 10 * k, empty_prompt=False),
                              heldout_uncond=_fixed_batch(comps, held, seed + 10 * k, empty_prompt=True)))
    return domains
