"""The publisher's side of the demo on the toy world, one function per step: the release (the
pretrained model, erased where the world says so), the publisher's fine-tune (theta_ft), the reference
rankings and the learned mask between the two. Each takes the demo's settings (a DemoConfig).

Example (each step a few seconds at DemoConfig.quick()):
    >>> from freezeguard.apps.demo_config import DemoConfig
    >>> from freezeguard.apps.toy_pipeline import learn_mask, publisher_finetune, release
    >>> from freezeguard.integrations.diffusers import toy
    >>> cfg = DemoConfig.quick()
    >>> loss_fn = toy.make_loss_fn(cfg.pretrain.model)
    >>> pretrained, released, erased = release(cfg, cache_dir=False)             # doctest: +SKIP
    >>> ft_state = publisher_finetune(released, cfg, loss_fn, progress=False)      # doctest: +SKIP
    >>> mask, logs = learn_mask(released, ft_state, cfg, loss_fn, progress=False)  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from freezeguard.apps.demo_config import DemoConfig
from freezeguard.apps.erase import Erased, erase_toy
from freezeguard.apps.learn import reference_masks as ref
from freezeguard.apps.learn.config import NAMED_INITS
from freezeguard.apps.learn.learner import MaskLearner
from freezeguard.apps.toy_worlds import WORLDS
from freezeguard.integrations.diffusers import toy


def release(cfg: DemoConfig, cache_dir: str | Path | None | bool = None, *, progress: bool = False,
            device: str | torch.device = "cpu") -> tuple[torch.nn.Module, torch.nn.Module, Erased | None]:
    """(pretrained model, released model, the erase or None): in the relearn world the released model
    is the pretrained one with the target erased toward ``cfg.anchor`` (``apps.erase.erase_toy``)."""
    pretrain = cfg.pretrain_config()
    pretrained = toy.pretrained_model(pretrain, cache_dir=cache_dir, progress=progress, device=device)
    if not WORLDS[cfg.world].erases:
        return pretrained, pretrained, None
    erased = erase_toy(pretrained, eraser=cfg.eraser, target=cfg.target, innocent=cfg.innocent, anchor=cfg.anchor,
                       known=pretrain.classes,
                       reference_lr=cfg.attacker_lr, reference_steps=cfg.attacker_steps, batch_size=cfg.batch_size,
                       sample_steps=cfg.sample_steps, config=cfg.pretrain.model, steps=cfg.baseline_steps,
                       seed=cfg.seed)
    return pretrained, erased.model, erased


def publisher_finetune(model: torch.nn.Module, cfg: DemoConfig, loss_fn, *, progress: bool,
                       only: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The publisher's full fine-tune on target + innocent data; returns theta_ft. ``only``: on these
    classes alone instead (the contrast reference's two separate fine-tunes)."""
    tuned = copy.deepcopy(model)
    if only is None:
        stream = toy.mixed_batches(cfg.target, cfg.innocent, cfg.batch_size, seed=cfg.seed + 11)
    else:
        stream = toy.batches(only, cfg.batch_size, seed=cfg.seed + 11, target_classes=cfg.target)
    toy.train(tuned, stream, cfg.publisher_steps, cfg.publisher_lr, loss_fn, seed=cfg.seed + 12,
              progress="publisher relearn fine-tune" if progress else None)
    return {k: v.detach().clone() for k, v in tuned.state_dict().items()}


def reference_scores(model: torch.nn.Module, ft_state: dict, cfg: DemoConfig, loss_fn,
                     names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """The reference rankings ``names`` (of "delta", "cross-attention", "saliency", "contrast") between
    the released weights and theta_ft; saliency averages s over ``cfg.saliency_batches`` mixed batches;
    the contrast runs two more publisher fine-tunes, on the target alone and on the legal data alone."""
    pre_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {}
    for name in names:
        if name == "delta":
            out[name] = ref.delta_scores(model, pre_state, ft_state)
        elif name == "cross-attention":
            out[name] = ref.cross_attention_scores(model, pre_state, ft_state)
        elif name == "saliency":
            stream = toy.mixed_batches(cfg.target, cfg.innocent, cfg.batch_size, seed=cfg.seed + 41)
            gen = torch.Generator().manual_seed(cfg.seed + 42)
            out[name] = ref.saliency_scores(model, pre_state, ft_state, loss_fn,
                                            (dict(b, generator=gen) for b in stream), cfg.saliency_batches)
        elif name == "contrast":
            alone = {c: publisher_finetune(model, cfg, loss_fn, progress=False, only=c)
                     for c in (cfg.target, cfg.innocent)}
            out[name] = ref.contrast_scores(model, pre_state, alone[cfg.target], alone[cfg.innocent])
        else:
            raise ValueError(f"unknown reference mask {name!r}; known: delta, cross-attention, saliency, contrast")
    return out


def learn_mask(model: torch.nn.Module, ft_state: dict, cfg: DemoConfig, loss_fn, *, progress: bool,
               scores: dict[str, dict[str, float]] | None = None):
    """Run the MaskLearner between the released weights and theta_ft; returns (mask, logs).

    ``cfg.init`` names the logits' start: "uniform", "constant" or a reference ranking (taken
    from ``scores`` when given, else computed)."""
    pre_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    init = cfg.init
    if init not in NAMED_INITS:
        init = (scores or {}).get(init) or reference_scores(model, ft_state, cfg, loss_fn, (init,))[init]
    learner = MaskLearner(copy.deepcopy(model), pre_state, ft_state, loss_fn, cfg.learner, init=init)
    stream = toy.mixed_batches(cfg.target, cfg.innocent, cfg.batch_size, seed=cfg.seed + 21)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # The demo reports how far the data moved the mask in its summary (``mask_moved``); the
        # learner's warning about an unmoved mask would only repeat it mid-progress-bar.
        warnings.filterwarnings("ignore", message="MaskLearner: after")
        torch.manual_seed(cfg.seed + 22)  # the learner's loss draws noise from the global RNG
        logs = learner.fit(stream, cfg.learner_steps, progress=progress, desc="learn mask")
    return learner.hard_mask(), logs
