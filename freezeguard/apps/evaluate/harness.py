"""The evaluation harness: does a mask stop illegal fine-tunes and spare legal ones?

For every attacker (a simulated user: AdamW at some lr for some steps), every mask (none = full
fine-tuning, random masks at the same ratio, the learned mask) and every domain (the target
and each innocent one), fine-tune a fresh copy of the released model on that domain alone and
measure, before and after, on held-out data:

- ``loss``: held-out denoising loss with fixed noise and timesteps (deterministic);
- ``prompt_gain``: unconditional minus prompt-conditioned held-out loss, i.e. how much the
  prompt helps denoising = how much the model *knows the concept* (when the domain has a null
  prompt);
- ``recognisability``: a judge's score on generated samples (when the domain has one).

A metric's *gain* is its improvement from before to after. For a mask, on a domain,
``removed = 1 - gain(mask) / gain(full fine-tune)``: the share of the full fine-tune's gain the
mask removed. On the target this is the **mitigation**; on an innocent domain it is the
**innocent impact** (want: high mitigation, impact near 0).

Example:
    >>> import freezeguard as fg
    >>> from freezeguard.apps.evaluate.harness import Attacker
    >>> result = fg.evaluate.evaluate_masks(model, {"full": None, "learned": mask},  # doctest: +SKIP
    ...                                     domains, loss_fn, [Attacker("user", lr=1e-3, steps=100)])
    >>> result.summary()["table"]["user"]["learned"]["mitigation"]      # doctest: +SKIP
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from freezeguard.apps.evaluate.metrics import METRIC_SIGN, mask_group, summarize  # noqa: F401  (re-exported)
from freezeguard.core.guard import make_adamw
from freezeguard.core.mask import FreezeMask
from freezeguard.core.training import train_steps

ROLES = ("target", "innocent")
LossFn = Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor]


@dataclass
class Attacker:
    """A simulated user fine-tune: AdamW (torch defaults but ``weight_decay``) at ``lr`` for ``steps``."""

    name: str
    lr: float
    steps: int
    weight_decay: float = 1e-2

    def __post_init__(self):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"attacker {self.name!r}: lr must be a positive number, got {self.lr}")
        if int(self.steps) < 1:
            raise ValueError(f"attacker {self.name!r}: steps must be >= 1, got {self.steps}")


def attacker_suite(lr: float, steps: int, *, lr_mult: float = 10.0, steps_mult: float = 3.0) -> list[Attacker]:
    """The attackers every mask and baseline faces: the standard user, then stronger ones.

    ``standard`` is the simulated user at ``lr`` for ``steps``; ``"<k>x lr"`` multiplies its
    learning rate and ``"<k>x steps"`` its step count (a multiplier of 1 drops that attacker).
    The evaluation, the demo and the benchmarks all build their attackers here, so a figure
    labelled "10x lr" means the same thing everywhere.

    Example:
        >>> [a.name for a in attacker_suite(1e-3, 100)]
        ['standard', '10x lr', '3x steps']
    """
    for what, mult in (("lr_mult", lr_mult), ("steps_mult", steps_mult)):
        if not (mult > 0 and math.isfinite(mult)):
            raise ValueError(f"attacker {what} must be a positive number, got {mult}")
    out = [Attacker("standard", lr, steps)]
    if lr_mult != 1.0:
        out.append(Attacker(f"{lr_mult:g}x lr", lr * lr_mult, steps))
    if steps_mult != 1.0:
        out.append(Attacker(f"{steps_mult:g}x steps", lr, max(1, round(steps * steps_mult))))
    return out


@dataclass
class Domain:
    """One fine-tuning domain: a training stream, held-out data and optional sample-based judging.

    ``train_batches(seed)`` returns an endless iterator of batches for ``loss_fn``.
    ``heldout`` is one batch with fixed ``noise`` and ``timesteps`` (deterministic loss);
    ``heldout_uncond``, the same batch with the null prompt, enables ``prompt_gain``.
    ``sample(model) -> images`` and ``judge(images) -> float in [0, 1]`` enable
    ``recognisability``.
    """

    name: str
    role: str
    train_batches: Callable[[int], Iterator[Mapping[str, Any]]]
    heldout: Mapping[str, Any]
    heldout_uncond: Mapping[str, Any] | None = None
    sample: Callable[[torch.nn.Module], torch.Tensor] | None = None
    judge: Callable[[torch.Tensor], float] | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"domain {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        for key in ("noise", "timesteps"):
            if key not in self.heldout:
                raise ValueError(f"domain {self.name!r}: the held-out batch needs fixed {key!r} "
                                 "so the loss is deterministic")


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, loss_fn: LossFn, batch: Mapping[str, Any]) -> float:
    """Mean per-sample loss on a fixed held-out batch, in eval mode."""
    was = model.training
    model.eval()
    try:
        return float(loss_fn(model, batch).mean())
    finally:
        model.train(was)


def measure(model: torch.nn.Module, loss_fn: LossFn, domain: Domain) -> dict[str, Any]:
    """Every metric the domain supports, for the model as it is now."""
    out: dict[str, Any] = {"loss": heldout_loss(model, loss_fn, domain.heldout)}
    if domain.heldout_uncond is not None:
        out["prompt_gain"] = heldout_loss(model, loss_fn, domain.heldout_uncond) - out["loss"]
    if domain.sample is not None and domain.judge is not None:
        images = domain.sample(model)
        out["recognisability"] = float(domain.judge(images))
        out["_samples"] = images
    return out


def finetune(model: torch.nn.Module, mask: FreezeMask | None, domain: Domain, loss_fn: LossFn,
             attacker: Attacker, *, seed: int = 0, curve_points: int = 5) -> list[tuple[int, float]]:
    """Fine-tune ``model`` in place on ``domain`` as ``attacker`` would; returns the held-out loss curve.

    The curve has ``curve_points`` + 1 points (step 0 included). The data stream and the
    training noise are seeded by ``seed`` alone, so every mask sees the same batches.
    """
    opt = make_adamw(model, mask, lr=attacker.lr, weight_decay=attacker.weight_decay)
    every = max(1, attacker.steps // max(1, curve_points))
    curve = [(0, heldout_loss(model, loss_fn, domain.heldout))]

    def record(step: int, _losses: torch.Tensor, _batch: Mapping[str, Any]) -> None:
        if step % every == 0 or step == attacker.steps:
            curve.append((step, heldout_loss(model, loss_fn, domain.heldout)))

    train_steps(model, opt, domain.train_batches(seed), loss_fn, attacker.steps,
                generator=torch.Generator().manual_seed(seed), on_step=record,
                stop_on_nonfinite=False)  # a diverging attacker is a result to measure, not an error
    return curve


@dataclass
class Run:
    """One fine-tune: attacker x mask x domain, with metrics before/after and the loss curve."""

    attacker: str
    mask: str
    domain: str
    role: str
    before: dict[str, float]
    after: dict[str, float]
    curve: list[tuple[int, float]]
    samples: torch.Tensor | None = None


@dataclass
class EvalResult:
    """All runs plus the masks' descriptions; ``summary()`` turns them into mitigation figures."""

    runs: list[Run] = field(default_factory=list)
    masks: dict[str, dict[str, Any]] = field(default_factory=dict)
    attackers: list[Attacker] = field(default_factory=list)
    primary_metric: str = "loss"
    before_samples: dict[str, torch.Tensor] = field(default_factory=dict)
    real_images: dict[str, torch.Tensor] = field(default_factory=dict)  # held-out training images per domain

    def summary(self) -> dict[str, Any]:
        return summarize(self)


# The work of a forked evaluation worker: set by evaluate_masks just before its pool forks.
_FORKED: tuple | None = None


def _forked_job(i: int):
    model, masks, domains, loss_fn, jobs, seed, curve_points, threads = _FORKED
    torch.set_num_threads(threads)
    attacker, mask_name, d = jobs[i]
    tuned = copy.deepcopy(model)
    curve = finetune(tuned, masks[mask_name], domains[d], loss_fn, attacker, seed=seed, curve_points=curve_points)
    return curve, measure(tuned, loss_fn, domains[d])


def evaluate_masks(model: torch.nn.Module, masks: Mapping[str, FreezeMask | None], domains: Sequence[Domain],
                   loss_fn: LossFn, attackers: Sequence[Attacker], *, seed: int = 0,
                   curve_points: int = 5, progress: bool = True, workers: int = 1) -> EvalResult:
    """Fine-tune a copy of ``model`` for every attacker x mask x domain and measure each.

    ``masks`` maps a display name to a mask (``None`` = full fine-tuning, required under the
    name "full" as the reference). Random masks named ``random#0``, ``random#1``... are averaged
    as one group "random" in the summary.

    ``workers`` > 1 runs the fine-tunes in that many forked processes (CPU, POSIX), each with
    the caller's torch thread count: every fine-tune is seeded on its own, so the figures are
    those of ``workers=1``, in less wall time on a multi-core machine (the tiny demo model's ops
    are too small to share one fine-tune across cores). Use it with one torch thread: a process
    that forks after OpenMP started its thread pool can hang.

    Example:
        >>> result = evaluate_masks(model, {"full": None, "random#0": rnd, "learned": learned},
        ...                         domains, loss_fn, [Attacker("user", 1e-3, 100)])  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if "full" not in masks or masks["full"] is not None:
        raise ValueError('masks must include "full": None (the full fine-tune is the reference)')
    if not domains or not any(d.role == "target" for d in domains):
        raise ValueError("evaluate_masks needs at least one target domain")
    if not attackers:
        raise ValueError("evaluate_masks needs at least one attacker")
    for mask in masks.values():
        if mask is not None:
            mask.check_model(model)
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise ValueError(f"domain names must be unique, got {names}")

    result = EvalResult(attackers=list(attackers))
    result.masks = {name: ({"ratio_tensors": 0.0, "ratio_params": 0.0} if m is None else
                           {"ratio_tensors": m.ratio("tensors"), "ratio_params": m.ratio("params")})
                    for name, m in masks.items()}
    before = {}
    for d in domains:
        if isinstance(d.heldout.get("pixel_values"), torch.Tensor):
            result.real_images[d.name] = d.heldout["pixel_values"][:8].detach().cpu()
        before[d.name] = measure(model, loss_fn, d)
        if "_samples" in before[d.name]:
            result.before_samples[d.name] = before[d.name].pop("_samples")
    metrics = set.intersection(*(set(b) for b in before.values()))
    result.primary_metric = "recognisability" if "recognisability" in metrics else "loss"

    jobs = [(a, m, k) for a in attackers for m in masks for k in range(len(domains))]
    bar = tqdm(total=len(jobs), desc="evaluate (fine-tunes)", disable=not progress)

    def record(job, curve, after):
        attacker, mask_name, k = job
        d = domains[k]
        samples = after.pop("_samples", None)
        result.runs.append(Run(attacker.name, mask_name, d.name, d.role, before[d.name], after, curve, samples))
        bar.set_postfix_str(f"{attacker.name}/{mask_name}/{d.name}")
        bar.update(1)

    workers = max(1, min(int(workers), len(jobs)))
    if workers == 1 or next(model.parameters()).device.type != "cpu":
        for job in jobs:
            attacker, mask_name, k = job
            tuned = copy.deepcopy(model)
            curve = finetune(tuned, masks[mask_name], domains[k], loss_fn, attacker, seed=seed,
                             curve_points=curve_points)
            record(job, curve, measure(tuned, loss_fn, domains[k]))
    else:
        import multiprocessing

        global _FORKED
        _FORKED = (model, dict(masks), list(domains), loss_fn, jobs, seed, curve_points, torch.get_num_threads())
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for job, (curve, after) in zip(jobs, pool.imap(_forked_job, range(len(jobs))), strict=True):
                    record(job, curve, after)
        finally:
            _FORKED = None
    bar.close()
    return result
