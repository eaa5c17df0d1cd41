"""Reference masks: one-line rankings a learned mask must beat, and a cheap option for publishers.

Each function returns per-tensor scores (name -> float, higher = freeze first) to feed
``FreezeMask.from_scores(model, scores, ratio, by)`` or ``MaskLearner(init=scores)``:

- ``delta_scores``: mean |theta_pre - theta_ft| per tensor -- the tensors the publisher's own
  fine-tune on target + innocent data changed most;
- ``cross_attention_scores``: the cross-attention projections (diffusers ``attn2.to_q/k/v/out``,
  where the prompt enters the UNet) first, then the rest, each part by ``delta_scores``;
- ``saliency_scores``: a one-shot sensitivity ranking, |s_i| with s_i = <Delta_i, g_i> the
  releaser's signal (g the gradient of (innocent loss - target loss) / 2) averaged over many
  batches at the midpoint theta_ft + Delta / 2 (one point of the integrated-gradients path from
  theta_ft to theta_pre: sum_i of s_i along that path is the loss change of reverting the whole
  fine-tune). One fused ``ops.segment_dot`` per batch, no learner steps.

- ``contrast_scores``: ||Delta_target||^2 / ||Delta_legal||^2 per tensor, from two separate
  fine-tunes of the release (one on the target alone, one on the legal data alone): the tensors the
  target moves much and the legal data little.

``reference_masks`` builds the first three as FreezeMasks (the contrast needs its own two fine-tunes).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> pre = {k: v.clone() for k, v in model.state_dict().items()}
    >>> ft = {"weight": pre["weight"] + 1.0, "bias": pre["bias"] + 0.1}
    >>> s = delta_scores(model, pre, ft)
    >>> s["weight"] > s["bias"]
    True
"""
from __future__ import annotations

import copy
import re
from typing import Any, Callable, Iterable, Mapping

import torch

from freezeguard import ops
from freezeguard.apps.learn.checks import check_losses, check_targets
from freezeguard.core.mask import FreezeMask

# diffusers names: attn1 is self-attention, attn2 cross-attention (the prompt's keys and values).
CROSS_ATTENTION = re.compile(r"(^|\.)attn2\.to_(q|k|v|out)(\.|$)")
LossFn = Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor]


def delta_scores(model: torch.nn.Module, pretrained_state: Mapping[str, torch.Tensor],
                 finetuned_state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Mean |theta_pre - theta_ft| of every parameter tensor of ``model``."""
    out = {}
    for name, _ in model.named_parameters():
        d = pretrained_state[name].detach().float() - finetuned_state[name].detach().float().to(
            pretrained_state[name].device)
        out[name] = float(d.abs().mean()) if d.numel() else 0.0
    return out


def contrast_scores(model: torch.nn.Module, pretrained_state: Mapping[str, torch.Tensor],
                    target_state: Mapping[str, torch.Tensor], legal_state: Mapping[str, torch.Tensor],
                    eps: float = 1e-12) -> dict[str, float]:
    """||theta_target - theta_pre||^2 / (||theta_legal - theta_pre||^2 + eps) of every parameter tensor.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> pre = {k: v.clone() for k, v in model.state_dict().items()}
        >>> target = {"weight": pre["weight"] + 1.0, "bias": pre["bias"] + 0.1}
        >>> legal = {"weight": pre["weight"] + 1.0, "bias": pre["bias"] + 0.01}
        >>> s = contrast_scores(model, pre, target, legal)
        >>> s["bias"] > s["weight"]          # the bias moves for the target, hardly for the legal data
        True
    """
    out = {}
    for name, _ in model.named_parameters():
        pre = pretrained_state[name].detach().float()
        t = float((target_state[name].detach().float().to(pre.device) - pre).pow(2).sum())
        legal = float((legal_state[name].detach().float().to(pre.device) - pre).pow(2).sum())
        out[name] = t / (legal + eps)
    return out


def cross_attention_scores(model: torch.nn.Module, pretrained_state: Mapping[str, torch.Tensor],
                           finetuned_state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Cross-attention projections first (each by mean |Delta|), then every other tensor by mean |Delta|."""
    delta = delta_scores(model, pretrained_state, finetuned_state)
    top = max(delta.values(), default=0.0) + 1.0
    return {n: (top + v if CROSS_ATTENTION.search(n) else v) for n, v in delta.items()}


def saliency_scores(model: torch.nn.Module, pretrained_state: Mapping[str, torch.Tensor],
                    finetuned_state: Mapping[str, torch.Tensor], loss_fn: LossFn,
                    batches: Iterable[Mapping[str, Any]], n_batches: int, *, signed: bool = False,
                    backend: str = "auto") -> dict[str, float]:
    """|mean over ``n_batches`` batches of s_i| at theta_ft + Delta / 2. ``signed``: -s_i instead,
    the direction the learner's data step pushes the logit (high = freezing the tensor raises the
    target's loss more than the innocent data's).

    ``model`` is not modified (a copy is loaded with the midpoint weights). Batches are used as
    ``MaskLearner.step`` uses them (``batch["is_target"]`` splits the releaser loss).
    """
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    work = copy.deepcopy(model)
    named = list(work.named_parameters())
    with torch.no_grad():
        delta = []
        for name, p in named:
            pre = pretrained_state[name].to(device=p.device, dtype=torch.float32)
            ft = finetuned_state[name].to(device=p.device, dtype=torch.float32)
            delta.append((pre - ft).to(p.dtype))
            p.copy_(ft + 0.5 * (pre - ft))
            p.requires_grad_(True)
    s = torch.zeros(len(named), dtype=torch.float32, device=named[0][1].device)
    it = iter(batches)
    work.train()
    for k in range(n_batches):
        batch = next(it)
        flags = check_targets(batch)
        losses = check_losses(loss_fn(work, batch), k)
        t = flags.to(device=losses.device, dtype=losses.dtype)
        mean_t = (losses * t).sum() / t.sum().clamp(min=1.0)
        mean_i = (losses * (1.0 - t)).sum() / (1.0 - t).sum().clamp(min=1.0)
        for _, p in named:
            p.grad = None
        ((mean_i - mean_t) / 2.0).backward()
        present = [i for i, (_, p) in enumerate(named) if p.grad is not None]
        part = ops.segment_dot([delta[i] for i in present], [named[i][1].grad for i in present], backend=backend)
        s[torch.tensor(present, device=s.device)] += part
    s /= n_batches
    values = (-s if signed else s.abs()).tolist()
    return {name: v for (name, _), v in zip(named, values, strict=True)}


#: The rankings computed from the two states alone (a learner's ``init="scores"`` start in ``learn()``).
RANKINGS: dict[str, Callable[..., dict[str, float]]] = {"delta": delta_scores,
                                                       "cross-attention": cross_attention_scores}


def reference_masks(model: torch.nn.Module, pretrained_state: Mapping[str, torch.Tensor],
                    finetuned_state: Mapping[str, torch.Tensor], ratio: float, *, by: str = "tensors",
                    loss_fn: LossFn | None = None, batches: Iterable[Mapping[str, Any]] | None = None,
                    saliency_batches: int = 0, backend: str = "auto") -> dict[str, FreezeMask]:
    """The reference masks at ``ratio``: "delta", "cross-attention" and, given ``loss_fn``,
    ``batches`` and ``saliency_batches`` > 0, "saliency". Each mask's metadata names its rule."""
    rankings = {name: rank(model, pretrained_state, finetuned_state) for name, rank in RANKINGS.items()}
    if loss_fn is not None and batches is not None and saliency_batches > 0:
        rankings["saliency"] = saliency_scores(model, pretrained_state, finetuned_state, loss_fn, batches,
                                               saliency_batches, backend=backend)
    out = {}
    for name, scores in rankings.items():
        mask = FreezeMask.from_scores(model, scores, ratio, by=by)
        mask.metadata["source"] = f"reference:{name}"
        out[name] = mask
    return out


__all__ = ["CROSS_ATTENTION", "RANKINGS", "delta_scores", "cross_attention_scores", "saliency_scores", "reference_masks"]
