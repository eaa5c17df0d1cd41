"""The attackers every contender faces: who fine-tunes, how hard, and with which optimizer.

An :class:`Attacker` is a simulated user's fine-tune (AdamW at some lr for some steps, or LoRA
adapters on the attention projections). :func:`attacker_suite` builds the standard user and the
stronger ones the evaluation, the demo and the benchmarks all use, so a figure labelled "10x lr"
means the same everywhere; :func:`attacker_optimizer` gives an attacker's optimizer over a model,
with the mask enforced. The harness (``apps.evaluate.harness``) runs them.

Example:
    >>> [a.name for a in attacker_suite(1e-3, 100)]
    ['standard', '10x lr', '3x steps']
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from freezeguard.apps.baselines._common import add_lora, attention_projection_names
from freezeguard.apps.evaluate.channel_masks import ChannelMask
from freezeguard.core.guard import make_adamw
from freezeguard.core.mask import FreezeMask


@dataclass
class Attacker:
    """A simulated user fine-tune: AdamW (torch defaults but ``weight_decay``) at ``lr`` for ``steps``.

    With ``lora_rank`` the attacker trains rank-``lora_rank`` LoRA adapters on the attention
    projections instead of the weights -- only on projections the mask leaves trainable: an
    adapter on a frozen tensor is a way around the mask, which guard/wrap refuse.
    """

    name: str
    lr: float
    steps: int
    weight_decay: float = 1e-2
    lora_rank: int | None = None

    def __post_init__(self):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"attacker {self.name!r}: lr must be a positive number, got {self.lr}")
        if int(self.steps) < 1:
            raise ValueError(f"attacker {self.name!r}: steps must be >= 1, got {self.steps}")
        if self.lora_rank is not None and (not isinstance(self.lora_rank, int) or self.lora_rank < 1):
            raise ValueError(f"attacker {self.name!r}: lora_rank must be an int >= 1, got {self.lora_rank!r}")


def has_attention(model: torch.nn.Module) -> bool:
    """Whether ``model`` has attention projections a LoRA attacker can adapt."""
    return bool(attention_projection_names(model))


def attacker_suite(lr: float, steps: int, *, lr_mult: float = 10.0, steps_mult: float = 3.0,
                   lora_rank: int | None = None) -> list[Attacker]:
    """The attackers every mask and baseline faces: the standard user, then stronger ones.

    ``standard`` is the simulated user at ``lr`` for ``steps``; ``"<k>x lr"`` multiplies its
    learning rate and ``"<k>x steps"`` its step count (a multiplier of 1 drops that attacker).
    With ``lora_rank`` (pass it where the model has attention, see :func:`has_attention`) a LoRA
    attacker follows at ``lr_mult`` x ``lr`` for ``steps``: LoRA trains at 10x a full fine-tune's
    lr in diffusers' scripts (1e-4 against 1e-5). The evaluation, the demo and the benchmarks all
    build their attackers here, so a figure labelled "10x lr" means the same thing everywhere.

    Example:
        >>> [a.name for a in attacker_suite(1e-3, 100)]
        ['standard', '10x lr', '3x steps']
        >>> attacker_suite(1e-3, 100, lora_rank=4)[-1].name
        'LoRA r4'
    """
    for what, mult in (("lr_mult", lr_mult), ("steps_mult", steps_mult)):
        if not (mult > 0 and math.isfinite(mult)):
            raise ValueError(f"attacker {what} must be a positive number, got {mult}")
    out = [Attacker("standard", lr, steps)]
    if lr_mult != 1.0:
        out.append(Attacker(f"{lr_mult:g}x lr", lr * lr_mult, steps))
    if steps_mult != 1.0:
        out.append(Attacker(f"{steps_mult:g}x steps", lr, max(1, round(steps * steps_mult))))
    if lora_rank is not None:
        out.append(Attacker(f"LoRA r{lora_rank}", lr * lr_mult, steps, lora_rank=lora_rank))
    return out


def attacker_optimizer(model: torch.nn.Module, mask: FreezeMask | ChannelMask | None,
                       attacker: Attacker) -> torch.optim.Optimizer | None:
    """The attacker's AdamW: :func:`make_adamw` (mask enforced), or for a LoRA attacker an AdamW
    over adapters it puts, in place, on ``model``'s attention projections that the mask leaves trainable.
    Under a :class:`ChannelMask` (random output channels): the unguarded AdamW, the mask's frozen rows
    restored after every step.

    None for a LoRA attacker when the mask freezes every attention projection: the guard refuses an
    adapter on a frozen module, so this attacker has nothing to train (its fine-tune changes nothing)."""
    if isinstance(mask, ChannelMask):
        if attacker.lora_rank is not None:
            raise ValueError(f"attacker {attacker.name!r}: LoRA under an output-channel mask is not modelled")
        opt = make_adamw(model, None, lr=attacker.lr, weight_decay=attacker.weight_decay)
        mask.enforce(model, opt)
        return opt
    if attacker.lora_rank is None:
        return make_adamw(model, mask, lr=attacker.lr, weight_decay=attacker.weight_decay)
    projections = attention_projection_names(model)
    if not projections:
        raise ValueError(f"attacker {attacker.name!r}: the model has no attention projection to put LoRA on")
    names = [n for n in projections if mask is None or not mask.is_frozen(f"{n}.weight")]
    if not names:
        return None
    model.requires_grad_(False)
    params = add_lora(model, names, attacker.lora_rank, seed=0)
    return torch.optim.AdamW(params, lr=attacker.lr, weight_decay=attacker.weight_decay)


__all__ = ["Attacker", "has_attention", "attacker_suite", "attacker_optimizer"]
