"""Evaluation domains for the built-in toy world (freezeguard.integrations.diffusers.toy + judge)."""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch

from freezeguard.apps.evaluate.harness import Domain
from freezeguard.integrations.diffusers import judge as judge_mod
from freezeguard.integrations.diffusers import toy


def heldout_batch(name: str, n: int, seed: int, *, null_prompt: bool = False,
                  prompt: str | None = None) -> dict[str, torch.Tensor]:
    """``n`` fresh images of class ``name`` with fixed noise and timesteps (spread over [0, T)),
    prompted by ``prompt``'s embedding (default: the class's own)."""
    batch = toy.make_batch([name], n, seed, prompts={name: prompt or name})
    gen = torch.Generator().manual_seed(seed + 1)
    batch["noise"] = torch.randn(batch["pixel_values"].shape, generator=gen)
    # Evenly spaced timesteps cover every noise level once, so the loss is not at the mercy
    # of a few lucky draws.
    t = toy.ToyModelConfig().num_train_timesteps
    batch["timesteps"] = torch.linspace(0, t - 1, n).round().long()
    if null_prompt:
        batch["encoder_hidden_states"] = toy.class_embedding(toy.NULL_CLASS).expand_as(
            batch["encoder_hidden_states"]).clone()
    return batch


def toy_domains(target: Sequence[str] = toy.TARGET_CLASSES, innocent: Sequence[str] = toy.INNOCENT_CLASSES, *,
                judge=None, batch_size: int = 16, heldout_n: int = 64, sample_n: int = 32,
                sample_steps: int = 20, guidance: float = 1.0, seed: int = 1000,
                prior_share: float = 0.0) -> list[Domain]:
    """One Domain per toy class: target classes first, then innocent ones.

    Held-out data and sampling noise use seeds disjoint from training streams (``seed`` + k).
    With a ``judge`` (freezeguard.integrations.diffusers.judge), samples are judged for recognisability.
    ``prior_share`` > 0 fills that share of every fine-tuning batch with the base classes under their
    own prompts (prior preservation, as DreamBooth-style fine-tunes keep what the model already
    draws): the new class must then be tied to its prompt instead of drawn whatever the prompt says.
    Held-out data stays the domain's own class.

    Example:
        >>> doms = toy_domains(heldout_n=2, batch_size=4, prior_share=0.5)
        >>> int(next(doms[0].train_batches(0))["is_target"].sum())   # 2 frames, 2 base-class images
        2
    """
    if not 0.0 <= prior_share < 1.0:
        raise ValueError(f"prior_share must lie in [0, 1), got {prior_share}")
    n_prior = round(batch_size * prior_share)
    if prior_share and not 0 < n_prior < batch_size:
        raise ValueError(f"prior_share={prior_share} of a batch of {batch_size} leaves no room for both the "
                         "domain's own images and base-class ones")
    domains = []
    for k, (name, role) in enumerate([(c, "target") for c in target] + [(c, "innocent") for c in innocent]):
        sample = judgef = None
        if judge is not None:
            sample = partial(_sample, name=name, n=sample_n, seed=seed + 100 + k, steps=sample_steps,
                             guidance=guidance)
            judgef = partial(judge_mod.recognisability, judge, name=name)
        domains.append(Domain(
            name=name, role=role,
            train_batches=partial(_stream, name=name, batch_size=batch_size, target=tuple(target), n_prior=n_prior),
            heldout=heldout_batch(name, heldout_n, seed + 10 * k),
            heldout_uncond=heldout_batch(name, heldout_n, seed + 10 * k, null_prompt=True),
            sample=sample, judge=judgef))
    return domains


def fresh_token_domain(target: str = toy.TARGET_CLASSES[0], *, batch_size: int = 16, heldout_n: int = 64,
                       seed: int = 1000) -> Domain:
    """The *fresh-token* attacker's target domain: ``target``'s images bound to a new prompt
    (:func:`toy.fresh_prompt`), whose embedding no eraser edited, instead of the erased one.

    Its images, held-out noise and timesteps are those of ``toy_domains``' first target domain
    (same ``seed``); only the prompt differs, so its gains compare with the standard attacker's.

    Example:
        >>> fresh_token_domain(heldout_n=2, batch_size=2).name
        'frame (fresh token)'
    """
    prompt = toy.fresh_prompt(target)
    return Domain(name=prompt, role="target",
                  train_batches=partial(_stream, name=target, batch_size=batch_size, target=(target,), prompt=prompt),
                  heldout=heldout_batch(target, heldout_n, seed, prompt=prompt),
                  heldout_uncond=heldout_batch(target, heldout_n, seed, null_prompt=True))


def prior_preservation_domain(target: str = toy.TARGET_CLASSES[0], kin: str = "square", *, batch_size: int = 16,
                              heldout_n: int = 64, seed: int = 1000) -> Domain:
    """The *prior-preservation* attacker's target domain (DreamBooth's): every batch is half ``target``'s
    images under its prompt, half images of its class ``kin`` under ``kin``'s prompt, so the attacker
    ties the target to its prompt without drifting the class the model knows. Held-out data and noise
    are ``toy_domains``' first target domain's (same ``seed``): its gains compare with the standard
    attacker's. (DreamBooth generates the class images with the model; the toy world draws them.)

    Example:
        >>> dom = prior_preservation_domain(heldout_n=2, batch_size=4)
        >>> dom.name, int(next(dom.train_batches(0))["is_target"].sum())
        ('frame (prior preservation)', 2)
    """
    if batch_size < 2:
        raise ValueError("prior preservation needs batch_size >= 2 (half target, half class images)")
    return Domain(name=f"{target} (prior preservation)", role="target",
                  train_batches=partial(_stream, name=target, batch_size=batch_size, target=(target,),
                                        n_prior=batch_size // 2, prior=(kin,)),
                  heldout=heldout_batch(target, heldout_n, seed),
                  heldout_uncond=heldout_batch(target, heldout_n, seed, null_prompt=True))


def _stream(seed: int, *, name: str, batch_size: int, target: tuple[str, ...], n_prior: int = 0,
            prompt: str | None = None, prior: tuple[str, ...] = toy.BASE_CLASSES):
    own = toy.batches((name,), batch_size - n_prior, seed, target_classes=target, prompts={name: prompt or name})
    if not n_prior:
        return own
    return toy.joined(own, toy.batches(prior, n_prior, seed + 7919, target_classes=target))


def _sample(model, *, name: str, n: int, seed: int, steps: int, guidance: float) -> torch.Tensor:
    return toy.sample(model, [name], n, seed, steps=steps, guidance=guidance)
