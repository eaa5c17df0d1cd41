"""The demo's evaluation: the contenders (random masks, the reference masks, the learned one, the
baselines, random masks at the harm ratios), the simulated users who attack them, and one evaluation
run on the target and innocent domains, plus the fresh-token attacker's (apps.evaluate.harness).

Example:
    >>> from freezeguard.apps.demo_config import DemoConfig
    >>> from freezeguard.apps.demo_evaluation import attackers
    >>> [a.name for a in attackers(DemoConfig.quick())]
    ['standard', '3x steps']
"""
from __future__ import annotations

from typing import Any

import torch

from freezeguard.apps.baselines.harness import Protection, contenders, step_overrides, toy_inputs
from freezeguard.apps.demo_config import DemoConfig
from freezeguard.apps.evaluate.harness import EvalResult, attacker_suite, evaluate_masks
from freezeguard.apps.evaluate.toy_domains import fresh_token_domain, toy_domains
from freezeguard.core.mask import FreezeMask
from freezeguard.integrations.diffusers.judge import Judge


def attackers(cfg: DemoConfig):
    """The simulated user the mask is judged against, and the stronger ones (see attacker_suite)."""
    return attacker_suite(cfg.attacker_lr, cfg.attacker_steps, lr_mult=cfg.strong_lr_mult,
                          steps_mult=cfg.strong_steps_mult)


def random_masks_at(model: torch.nn.Module, ratios, count: int, *, by: str, seed: int) -> dict[str, FreezeMask]:
    """``random@R#k`` -> ``count`` random masks at each freeze ratio R (seeds ``seed + k``, as the
    random masks at the demo's own ratio): the points that trace the price of blocking."""
    return {f"random@{ratio:g}#{k}": FreezeMask.random(model, ratio, by=by, seed=seed + k)
            for ratio in ratios for k in range(count)}



def contender_masks(model: torch.nn.Module, cfg: DemoConfig, methods: list[str], learned: FreezeMask,
                    scores: dict[str, dict[str, float]], *, progress: bool) -> dict[str, Any]:
    """Every contender by name, in the report's order: the random masks at the demo's ratio (seeds
    ``cfg.seed + k``), the reference masks (the bar the learner must clear), the learned mask, the
    baselines ``methods`` (apps.baselines), then the random masks at ``cfg.harm_ratios``."""
    inputs = None
    if methods:
        inputs = toy_inputs(model, reference_lr=cfg.attacker_lr, reference_steps=cfg.attacker_steps,
                            batch_size=cfg.batch_size, target=cfg.target, innocent=cfg.innocent,
                            sample_steps=cfg.sample_steps, seed=cfg.seed, config=cfg.pretrain.model,
                            known=cfg.pretrain_config().classes)
    found = contenders(model, methods, inputs, mask=learned, random_seeds=cfg.random_seeds,
                       budget_by=cfg.learner.budget_by, seed=cfg.seed,
                       overrides=step_overrides(cfg.baseline_steps), progress=progress)
    masks: dict[str, Any] = {}
    for name, entry in found.items():
        if name == "learned":
            for ref_name in cfg.references:
                masks[f"ref: {ref_name}"] = FreezeMask.from_scores(model, scores[ref_name], cfg.learner.freeze_ratio,
                                                                    by=cfg.learner.budget_by)
        masks[name] = entry
    masks.update(random_masks_at(model, [r for r in cfg.harm_ratios if r != cfg.learner.freeze_ratio],
                                 cfg.random_seeds, by=cfg.learner.budget_by, seed=cfg.seed))
    return masks


def baseline_seconds(masks: dict[str, Any]) -> float:
    """The seconds the baselines took to protect the model (combinations, named ``a+b``, counted once)."""
    return sum(p.cost.seconds for k, p in masks.items()
               if isinstance(p, Protection) and p.cost is not None and "+" not in k)


def evaluate_contenders(model: torch.nn.Module, masks: dict[str, Any], cfg: DemoConfig, judge: Judge, loss_fn, *,
                        progress: bool, workers: int) -> tuple[EvalResult, dict[str, Any] | None]:
    """Every contender attacked by every attacker on the target and innocent domains; then, with
    ``cfg.fresh_token``, by the fresh-token attacker (the standard user, the target's images bound to a
    new prompt). Returns the evaluation and the fresh-token run's summary (None without it)."""
    domains = toy_domains(cfg.target, cfg.innocent, judge=judge, batch_size=cfg.batch_size,
                          heldout_n=cfg.heldout_n, sample_n=cfg.sample_n, sample_steps=cfg.sample_steps,
                          guidance=cfg.guidance)
    result = evaluate_masks(model, masks, domains, loss_fn, attackers(cfg), seed=cfg.seed + 31,
                            attack_seeds=cfg.attack_seeds, progress=progress, primary_metric=cfg.primary_metric,
                            workers=workers)
    if not cfg.fresh_token:
        return result, None
    fresh = evaluate_masks(model, masks, [fresh_token_domain(cfg.target[0], batch_size=cfg.batch_size,
                                                             heldout_n=cfg.heldout_n)],
                           loss_fn, attackers(cfg)[:1], seed=cfg.seed + 31, attack_seeds=cfg.attack_seeds,
                           progress=progress, primary_metric=cfg.primary_metric, workers=workers)
    return result, fresh.summary()
