"""IMMA: model immunization against malicious adaptation (Zheng & Yeh, arXiv 2311.18815).

A bilevel problem: find released weights θ such that a simulated adaptation φ*(θ) on the harmful
concept ends in a *high* loss,

    max_θ  L_target(θ, φ*(θ)) − w·L_innocent(θ)     with  φ*(θ) = argmin_φ L_target(θ, φ),

solved as in the authors' code by alternating first-order steps on one data stream: an *inner*
step adapts the simulated attacker (AdamW on φ, descending the target loss), an *outer* step
updates the defended weights of θ by gradient ascent on the target loss evaluated at the adapted
weights (the attacker's φ is held fixed; no second-order term). The attacker keeps its state
across rounds (the authors' default, ``--reinitialize_lora`` off); ``reset_every`` restarts it.

The adaptation is LoRA on the attention projections (the authors' text-to-image relearning and
LoRA experiments) or a full fine-tune (their DreamBooth experiment) -- choose the one you defend
against. The innocent term (``innocent_weight``) is the regulariser that keeps the model's
behaviour elsewhere: the ordinary loss on θ of data the model already knows, in the manner of
DreamBooth's prior preservation (IMMA's ``defend_dreambooth.py``; weight 1.0 = diffusers'
``prior_loss_weight`` default): ``preserve_batches`` (e.g. the model's pretraining classes), or,
without it, the batch's non-target samples -- which also *teaches* θ those samples when they are
new to it. The authors' text-to-image script has no such term: pass 0.

Defaults and their source (amberyzheng/IMMA ``README.md`` and ``train/defend_text_to_image_lora.py``;
paper Sec. 4): inner (attacker) lr 1e-4 = the lr of the LoRA attack they defend against; outer
lr 1e-5 = 0.1 x the inner lr; one inner step per outer step; AdamW (β 0.9/0.999, weight decay
1e-2), gradient norm clipped to 1.0; defended weights: every attention projection (``to_q``,
``to_k``, ``to_v``, ``to_out``); LoRA rank 4; as many steps as the attack (50 epochs x 20 images).
Scaled to the model at hand: ``reference_lr`` is the attacker's lr on this model (inner lr =
reference_lr, outer lr = 0.1 x reference_lr) and ``steps`` the attacker's steps.

Example:
    >>> from freezeguard.integrations.diffusers import toy
    >>> from freezeguard.apps.baselines import imma
    >>> model = toy.build_model()
    >>> stream = toy.mixed_batches(toy.TARGET_CLASSES, toy.INNOCENT_CLASSES, 4, seed=0)
    >>> res = imma(model, toy.make_loss_fn(), stream, steps=2, reference_lr=1e-3)
    >>> [h["phase"] for h in res.history]
    ['inner', 'outer']
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from freezeguard.apps.baselines._common import (
    LossFn,
    add_lora,
    as_iterator,
    attention_projection_names,
    check_loss_fn,
    check_module,
    next_batch,
    per_sample_losses,
    target_flags,
)
from freezeguard.core.names import canonical_name
from freezeguard.core.values import check_positive

ADAPTATIONS = ("lora", "full")
DEFENDED = ("attention", "all")
#: The authors' outer (defender) lr over their inner (attacker) lr: 1e-5 / 1e-4.
OUTER_OVER_INNER = 0.1


@dataclass
class IMMAResult:
    """The immunized model, the names of the defended weights and a per-step log.

    Example:
        >>> res = imma(unet, loss_fn, stream, steps=10)                # doctest: +SKIP
        >>> res.history[1]["phase"], "target_loss" in res.history[1]    # doctest: +SKIP
        ('outer', True)
    """

    model: nn.Module
    defended: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def select(batch: Mapping[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """The samples of ``batch`` where ``keep`` is True (per-sample tensors indexed, the rest shared).

    Example:
        >>> select({"x": torch.arange(3), "g": None}, torch.tensor([True, False, True]))["x"]
        tensor([0, 2])
    """
    n = keep.numel()
    return {k: (v[keep.to(v.device)] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v)
            for k, v in batch.items()}


def _clip_(params: list[torch.Tensor], max_norm: float) -> None:
    grads = [p for p in params if p.grad is not None]
    if grads and max_norm > 0:
        torch.nn.utils.clip_grad_norm_(grads, max_norm)


def imma(model: nn.Module, loss_fn: LossFn, batches: Iterator[Mapping[str, Any]], *, steps: int = 1000,
         reference_lr: float = 1e-4, inner_lr: float | None = None, outer_lr: float | None = None,
         adaptation: str = "lora", defended: str = "attention", lora_rank: int = 4, inner_steps: int = 1,
         outer_steps: int = 1, innocent_weight: float = 1.0,
         preserve_batches: Iterator[Mapping[str, Any]] | None = None, max_grad_norm: float = 1.0,
         weight_decay: float = 1e-2, reset_every: int | None = None, seed: int = 0,
         inplace: bool = False) -> IMMAResult:
    """Immunize a copy of ``model`` against adaptation on the target samples of ``batches``.

    ``batches``: an endless stream of batches for ``loss_fn`` with ``batch["is_target"]`` (target
    samples drive both levels; non-target ones feed the innocent regulariser unless
    ``preserve_batches`` is given). Returns the immunized model with the simulated attacker removed.

    Example:
        >>> res = imma(unet, loss_fn, mixed_stream, steps=100, reference_lr=1e-3, adaptation="full")  # doctest: +SKIP
    """
    who = "imma"
    check_module(model, who)
    check_loss_fn(loss_fn, who)
    if adaptation not in ADAPTATIONS:
        raise ValueError(f"{who}: adaptation must be one of {ADAPTATIONS}, got {adaptation!r}")
    if defended not in DEFENDED:
        raise ValueError(f"{who}: defended must be one of {DEFENDED}, got {defended!r}")
    check_positive(steps, "steps", who, integer=True)
    check_positive(reference_lr, "reference_lr", who)
    inner_lr = reference_lr if inner_lr is None else inner_lr
    outer_lr = OUTER_OVER_INNER * inner_lr if outer_lr is None else outer_lr
    check_positive(inner_lr, "inner_lr", who)
    check_positive(outer_lr, "outer_lr", who)
    check_positive(inner_steps, "inner_steps", who, integer=True)
    check_positive(outer_steps, "outer_steps", who, integer=True)
    check_positive(innocent_weight, "innocent_weight", who, allow_zero=True)
    check_positive(max_grad_norm, "max_grad_norm", who, allow_zero=True)
    if reset_every is not None:
        check_positive(reset_every, "reset_every", who, integer=True)
    stream = as_iterator(batches, who)
    preserve = as_iterator(preserve_batches, who) if preserve_batches is not None else None
    proj = attention_projection_names(model)
    if (adaptation == "lora" or defended == "attention") and not proj:
        raise ValueError(f"{who}: the model has no attention projections (to_q/to_k/to_v/to_out); "
                         "use adaptation='full' and defended='all'")

    released = model if inplace else copy.deepcopy(model)
    if defended == "attention":
        prefixes = tuple(f"{m}." for m in proj)
        names = [n for n, _ in released.named_parameters() if n.startswith(prefixes)]
    else:
        names = [n for n, _ in released.named_parameters()]
    rparams = dict(released.named_parameters())
    def_params = [rparams[n] for n in names]
    outer_opt = torch.optim.AdamW(def_params, lr=outer_lr, weight_decay=weight_decay)

    def new_attacker() -> tuple[nn.Module, dict[str, nn.Parameter], torch.optim.Optimizer]:
        attacked = copy.deepcopy(released)
        if adaptation == "lora":
            trainable = add_lora(attacked, attention_projection_names(attacked), lora_rank, seed=seed)
        else:
            trainable = list(attacked.parameters())
        by_name = {canonical_name(n): p for n, p in attacked.named_parameters()}
        return attacked, {n: by_name[n] for n in names}, torch.optim.AdamW(trainable, lr=inner_lr,
                                                                          weight_decay=weight_decay)

    attacked, adv, inner_opt = new_attacker()
    result = IMMAResult(released, names, config={
        "steps": steps, "reference_lr": reference_lr, "inner_lr": inner_lr, "outer_lr": outer_lr,
        "adaptation": adaptation, "defended": defended, "lora_rank": lora_rank, "inner_steps": inner_steps,
        "outer_steps": outer_steps, "innocent_weight": innocent_weight,
        "preserve": "preserve_batches" if preserve is not None else "non-target samples",
        "max_grad_norm": max_grad_norm,
        "weight_decay": weight_decay, "reset_every": reset_every})
    gen = torch.Generator().manual_seed(seed)
    period = inner_steps + outer_steps
    released.train()
    attacked.train()
    for step in range(steps):
        if reset_every is not None and step and step % reset_every == 0:
            attacked, adv, inner_opt = new_attacker()
            attacked.train()
        batch = next_batch(stream, who)
        flags = target_flags(batch, None, who)
        batch["generator"] = gen
        phase = "inner" if step % period < inner_steps else "outer"
        log: dict[str, Any] = {"step": step, "phase": phase}
        if not flags.any():
            log["skipped"] = "no target samples in the batch"
            result.history.append(log)
            continue
        target = select(batch, flags)
        if phase == "inner":
            loss = per_sample_losses(loss_fn, attacked, target, who).mean()
            attacked.zero_grad(set_to_none=True)  # also the base weights the inner optimizer doesn't own
            loss.backward()
            _clip_([p for g in inner_opt.param_groups for p in g["params"]], max_grad_norm)
            inner_opt.step()
            log["target_loss"] = float(loss.detach())
        else:
            attacked.zero_grad(set_to_none=True)
            loss = per_sample_losses(loss_fn, attacked, target, who).mean()
            grads = torch.autograd.grad(loss, [adv[n] for n in names], allow_unused=True)
            outer_opt.zero_grad(set_to_none=True)
            reg_batch = None
            if innocent_weight > 0 and preserve is not None:
                reg_batch = dict(next_batch(preserve, who), generator=gen)
            elif innocent_weight > 0 and (~flags).any():
                reg_batch = select(batch, ~flags)
            if reg_batch is not None:
                reg = per_sample_losses(loss_fn, released, reg_batch, who).mean()
                (innocent_weight * reg).backward()
                log["innocent_loss"] = float(reg.detach())
            for p, g in zip(def_params, grads, strict=True):
                if g is None:
                    continue
                # ascent on the adapted target loss = descent on its negative
                p.grad = -g if p.grad is None else p.grad - g
            _clip_(def_params, max_grad_norm)
            before = [p.detach().clone() for p in def_params]
            outer_opt.step()
            with torch.no_grad():
                # The attacker's weights are θ + φ: move them with θ so that φ is unchanged.
                for n, p, old in zip(names, def_params, before, strict=True):
                    adv[n].add_(p.detach() - old)
            log["target_loss"] = float(loss.detach())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{who}: the target loss became {float(loss)}; lower outer_lr (now {outer_lr:g})")
        result.history.append(log)
    for p in released.parameters():
        p.grad = None
    return result
