"""Concept Ablation (Kumari et al., arXiv 2303.13516): distil the target concept onto an anchor concept.

Model-based variant (the authors' default, ``--loss_type_reverse model-based``): on images x of
the *anchor* concept, noised to x_t at a random timestep t,

    L = ‖ε_θ(x_t, c_target, t) − sg[ε_θ(x_t, c_anchor, t)]‖²

so that prompting the target makes the model denoise as for the anchor. The noise-based variant
regresses ε_θ(x_t, c_target, t) on the true noise of anchor images instead (it needs only
``loss_fn``). An optional prior-preservation term adds the ordinary loss of the anchor images
under the anchor prompt (the authors' ``--with_prior_preservation``, weight ``--prior_loss_weight``).

Defaults and their source (nupurkmr9/concept-ablation, ``diffusers/README.md`` and ``train.py``;
paper Sec. 4 "training details"): parameter group "cross-attn" (``to_k`` / ``to_v`` of the
cross-attention blocks; "full" trains every weight, the authors' "full-weight"); 100 steps at
batch 4 on 2 GPUs (8 images a step) with AdamW at 2e-6 × 8 = 1.6e-5 (``--scale_lr``), prior
preservation off for styles and objects. Scaled to the model at hand: the learning rate is
1.6x ``reference_lr``, the lr a user fine-tunes this model with (1.6e-5 against Stable
Diffusion's usual 1e-5), and the steps are the authors' 100 at the batch size of the anchor
stream. Anchor images: the authors generate them with the model itself from anchor prompts
(200 by default, 1000 in the paper); pass such a stream.

Example:
    >>> from freezeguard.integrations.diffusers import toy
    >>> from freezeguard.apps.baselines import concept_ablation
    >>> model = toy.build_model()
    >>> anchors = toy.batches(("square",), 8, seed=0)
    >>> res = concept_ablation(model, toy.build_scheduler(), toy.class_embedding("frame"),
    ...                        toy.class_embedding("square"), anchors, steps=2, reference_lr=1e-3)
    >>> len(res.losses)
    2
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from freezeguard.apps.baselines._common import (
    LossFn,
    as_iterator,
    check_condition,
    check_loss_fn,
    check_module,
    cross_attention_kv,
    next_batch,
)
from freezeguard.core.training import train_steps
from freezeguard.core.values import check_positive

PARAM_GROUPS = ("cross-attn", "full")
LOSS_TYPES = ("model", "noise")
#: The authors' effective lr (2e-6 x batch 4 x 2 GPUs) over Stable Diffusion's usual fine-tuning lr (1e-5).
LR_OVER_REFERENCE = 1.6
DEFAULT_STEPS = 100


@dataclass
class AblationResult:
    """The ablated model, the per-step training losses and the settings used.

    Example:
        >>> res = concept_ablation(unet, sched, c_target, c_anchor, anchors)   # doctest: +SKIP
        >>> res.losses[-1] < res.losses[0]                                   # doctest: +SKIP
        True
    """

    model: nn.Module
    trained: list[str]
    losses: list[float] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def _predict(model: nn.Module, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    out = model(noisy, t, encoder_hidden_states=cond, return_dict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


def _checked(stream: Iterator[Mapping[str, Any]], who: str) -> Iterator[dict[str, Any]]:
    while True:
        yield next_batch(stream, who)


def _images(batch: Mapping[str, Any]) -> torch.Tensor:
    for key in ("latents", "pixel_values"):
        if key in batch:
            return batch[key]
    raise ValueError("concept_ablation: anchor batches need 'pixel_values' (pixel-space models) or 'latents'")


@torch.no_grad()
def prediction_gap(model: nn.Module, noise_scheduler: Any, target_cond: torch.Tensor, anchor_cond: torch.Tensor,
                   images: torch.Tensor, *, seed: int = 0) -> float:
    """Mean ‖ε(x_t, c_target) − ε(x_t, c_anchor)‖² on ``images`` with seeded noise and timesteps.

    What Concept Ablation drives down; a fixed seed makes before/after comparable.

    Example:
        >>> prediction_gap(model, sched, c_frame, c_square, imgs)    # doctest: +SKIP
        0.0123
    """
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    x0 = images.to(device, torch.float32)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = torch.randint(0, int(noise_scheduler.config.num_train_timesteps), (x0.shape[0],), generator=gen).to(device)
    noisy = noise_scheduler.add_noise(x0, noise, t)
    was = model.training
    model.eval()
    try:
        tgt = _predict(model, noisy, t, target_cond.to(device).expand(x0.shape[0], -1, -1))
        anc = _predict(model, noisy, t, anchor_cond.to(device).expand(x0.shape[0], -1, -1))
    finally:
        model.train(was)
    return float(F.mse_loss(tgt.float(), anc.float()))


def concept_ablation(model: nn.Module, noise_scheduler: Any, target_cond: torch.Tensor, anchor_cond: torch.Tensor,
                     anchor_batches: Iterator[Mapping[str, Any]], *, reference_lr: float = 1e-5,
                     lr: float | None = None, steps: int = DEFAULT_STEPS, params: str = "cross-attn",
                     loss_type: str = "model", loss_fn: LossFn | None = None, prior_weight: float = 0.0,
                     weight_decay: float = 1e-2, seed: int = 0, inplace: bool = False) -> AblationResult:
    """Fine-tune a copy of ``model`` so the target prompt denoises like the anchor prompt.

    ``target_cond`` / ``anchor_cond``: [tokens, dim] text conditions; ``anchor_batches``: an endless
    stream of anchor-concept batches ("pixel_values" or "latents" [B, C, H, W]). ``noise_scheduler``:
    the model's DDPM-type training scheduler (``add_noise``). ``loss_fn`` is needed for
    ``loss_type="noise"`` and for ``prior_weight`` > 0. ``lr`` defaults to 1.6 x ``reference_lr``.

    Example:
        >>> res = concept_ablation(unet, sched, c_target, c_anchor, anchor_stream, reference_lr=1e-5)  # doctest: +SKIP
    """
    who = "concept_ablation"
    check_module(model, who)
    if not hasattr(noise_scheduler, "add_noise") or not hasattr(noise_scheduler, "config"):
        raise TypeError(f"{who}: noise_scheduler must be a DDPM-type scheduler with add_noise and config, "
                        f"got {type(noise_scheduler).__name__}")
    if params not in PARAM_GROUPS:
        raise ValueError(f"{who}: params must be one of {PARAM_GROUPS}, got {params!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"{who}: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    check_positive(reference_lr, "reference_lr", who)
    lr = LR_OVER_REFERENCE * reference_lr if lr is None else lr
    check_positive(lr, "lr", who)
    check_positive(steps, "steps", who, integer=True)
    check_positive(prior_weight, "prior_weight", who, allow_zero=True)
    if (loss_type == "noise" or prior_weight > 0) and loss_fn is None:
        raise ValueError(f"{who}: loss_type='noise' and prior_weight > 0 need loss_fn(model, batch) -> Tensor[B]")
    if loss_fn is not None:
        check_loss_fn(loss_fn, who)
    stream = as_iterator(anchor_batches, who)
    kv = cross_attention_kv(model)
    if params == "cross-attn" and not kv:
        raise ValueError(f"{who}: params='cross-attn' but the model has no cross-attention to_k/to_v; use params='full'")
    dim = kv[0][1].in_features if kv else None
    c_tgt = check_condition(target_cond, "target_cond", who, dim)
    c_anc = check_condition(anchor_cond, "anchor_cond", who, dim)
    if c_tgt.shape != c_anc.shape:
        raise ValueError(f"{who}: target_cond {tuple(c_tgt.shape)} and anchor_cond {tuple(c_anc.shape)} differ in shape")

    out = model if inplace else copy.deepcopy(model)
    if params == "cross-attn":
        trained = [f"{n}.weight" for n, _ in cross_attention_kv(out)]
    else:
        trained = [n for n, _ in out.named_parameters()]
    wanted = set(trained)
    train_params = [p for n, p in out.named_parameters() if n in wanted]
    # Only the trained group needs gradients (the anchor prediction is a stop-gradient anyway).
    flags = {n: p.requires_grad for n, p in out.named_parameters()}
    for n, p in out.named_parameters():
        p.requires_grad_(n in wanted)
    opt = torch.optim.AdamW(train_params, lr=lr, weight_decay=weight_decay)
    device = train_params[0].device
    gen = torch.Generator().manual_seed(seed)
    num_t = int(noise_scheduler.config.num_train_timesteps)
    result = AblationResult(out, trained, config={"lr": lr, "reference_lr": reference_lr, "steps": steps,
                                                  "params": params, "loss_type": loss_type,
                                                  "prior_weight": prior_weight, "weight_decay": weight_decay})
    def ablation_loss(m: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """Per-sample ablation loss (+ prior preservation) on one batch of anchor images."""
        x0 = _images(batch).to(device, torch.float32)
        b, g = x0.shape[0], batch["generator"]
        cond_t = c_tgt.to(device).expand(b, -1, -1)
        cond_a = c_anc.to(device).expand(b, -1, -1)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, num_t, (b,), generator=g).to(device)
        key = "latents" if "latents" in batch else "pixel_values"
        if loss_type == "model":
            noisy = noise_scheduler.add_noise(x0, noise, t)
            with torch.no_grad():
                goal = _predict(m, noisy, t, cond_a).float()
            diff = (_predict(m, noisy, t, cond_t).float() - goal) ** 2
            per_sample = diff.mean(dim=tuple(range(1, diff.ndim)))
        else:
            per_sample = loss_fn(m, {key: x0, "encoder_hidden_states": cond_t, "noise": noise, "timesteps": t})
        if prior_weight > 0:
            per_sample = per_sample + prior_weight * loss_fn(m, {key: x0, "encoder_hidden_states": cond_a,
                                                                 "generator": g})
        return per_sample

    # the one training loop; a non-finite loss stops it with an error naming the step
    result.losses = train_steps(out, opt, _checked(stream, who), ablation_loss, steps, generator=gen)
    for n, p in out.named_parameters():
        p.grad = None
        p.requires_grad_(flags[n])
    return result
