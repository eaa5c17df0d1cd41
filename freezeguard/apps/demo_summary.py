"""The demo's summary read off the evaluation: equal harm per attacker, the fresh-token attacker's
rows, the erase's effect on the target, the verdict (apps.evaluate.verdict) and the learner's end state.

Example:
    >>> from freezeguard.apps.demo_summary import equal_harm_summary
    >>> equal_harm_summary({"domains": {"frame": "target"}, "primary_metric": "loss"})   # no innocent domain
    {}
"""
from __future__ import annotations

from typing import Any

import torch

from freezeguard.apps.demo_config import DemoConfig
from freezeguard.apps.erase import Erased
from freezeguard.apps.evaluate.equal_harm import equal_harm_rows
from freezeguard.apps.evaluate.harness import EvalResult, heldout_loss
from freezeguard.apps.evaluate.toy_domains import toy_domains
from freezeguard.apps.evaluate.verdict import decide, figures_from_draws
from freezeguard.core.mask import FreezeMask
from freezeguard.integrations.diffusers import toy

FRESH_TOKEN = "fresh token"


def demo_summary(result: EvalResult, fresh: dict[str, Any] | None, cfg: DemoConfig, *,
                 erase: dict[str, Any] | None, timings: dict[str, float], learner: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's summary with the demo's config, equal harm (with ``cfg.harm_ratios``), the
    fresh-token attacker's run (``fresh``: its summary), the erase (``erase_summary``), the verdict,
    the phases' ``timings`` and the ``learner``'s end state (``learner_summary``)."""
    summary = result.summary()
    summary["config"] = cfg.to_json()
    if cfg.harm_ratios:
        summary["equal_harm"] = equal_harm_summary(summary)
    if fresh is not None:
        summary["fresh_token"] = {"domain": toy.fresh_prompt(cfg.target[0]),
                                  "removed_by_draw": fresh["removed_by_draw"]["standard"],
                                  "table": fresh["table"]["standard"]}
    if erase is not None:
        summary["erase"] = erase
    summary["verdict"] = verdict_summary(summary)
    summary["timings_s"] = timings
    summary["learner"] = learner
    return summary


def equal_harm_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """Per attacker: ``equal_harm_rows`` on the primary metric for the (first) target and innocent
    domains, with their names and the metric ({} without an innocent domain)."""
    roles = summary["domains"]
    target = next(d for d, r in roles.items() if r == "target")
    innocent = next((d for d, r in roles.items() if r == "innocent"), None)
    if innocent is None:
        return {}
    primary = summary["primary_metric"]
    out = {}
    for attacker, by_metric in summary.get("removed_by_draw", {}).items():
        draws = by_metric.get(primary, {})
        if target in draws and innocent in draws:
            out[attacker] = {"target": target, "innocent": innocent, "metric": primary,
                             "rows": equal_harm_rows(draws, target, innocent)}
    return out


def target_loss(model: torch.nn.Module, cfg: DemoConfig, loss_fn) -> float:
    """Held-out loss on the first target class (the evaluation's held-out batch)."""
    return heldout_loss(model, loss_fn, toy_domains(cfg.target[:1], (), heldout_n=cfg.heldout_n)[0].heldout)


def verdict_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The decision rule (``apps.evaluate.verdict``) on the summary's primary metric: the figures
    per attacker (the fresh-token attacker's harm is the standard user's on the legal domain: the
    legal fine-tune does not depend on the attacker's prompt), the verdict and its printed lines.
    The fresh-token rows join ``summary["equal_harm"]``."""
    roles, primary = summary["domains"], summary["primary_metric"]
    target = next(d for d, r in roles.items() if r == "target")
    innocent = next((d for d, r in roles.items() if r == "innocent"), None)
    draws = {a: by[primary] for a, by in summary.get("removed_by_draw", {}).items()}
    figures = {a: figures_from_draws(d[target], d[innocent]) for a, d in draws.items()
               if innocent is not None and target in d and innocent in d}
    fresh = summary.get("fresh_token")
    if fresh is not None and innocent is not None and "standard" in draws:
        fdraws = {fresh["domain"]: fresh["removed_by_draw"][primary][fresh["domain"]],
                  innocent: draws["standard"][innocent]}
        figures[FRESH_TOKEN] = figures_from_draws(fdraws[fresh["domain"]], fdraws[innocent])
        if "equal_harm" in summary:
            summary["equal_harm"][FRESH_TOKEN] = {"target": fresh["domain"], "innocent": innocent, "metric": primary,
                                                  "rows": equal_harm_rows(fdraws, fresh["domain"], innocent)}
    verdict = decide(figures)
    return {"mitigates": verdict.mitigates, "label": verdict.label, "lines": verdict.lines(),
            "figures": {a: {"target": f.target, "harm": f.harm, "random_at_equal_harm": f.random_at_equal_harm(),
                            "times_random": f.times_random(), "random_curve": f.random_curve}
                        for a, f in figures.items()}}



def erase_summary(erased: Erased | None, pretrained: torch.nn.Module, released: torch.nn.Module, cfg: DemoConfig,
                  loss_fn) -> dict[str, Any] | None:
    """What the erase did (None where the world erases nothing): the eraser, its anchor, the tensors it
    edited and the held-out loss on the target before and after it."""
    if erased is None:
        return None
    return {"eraser": erased.eraser, "anchor": cfg.anchor, "edited": erased.edited,
            "target_loss": {"pretrained": target_loss(pretrained, cfg, loss_fn),
                            "released": target_loss(released, cfg, loss_fn)}}


def learner_summary(learned: FreezeMask, logs: list[dict[str, Any]], cfg: DemoConfig) -> dict[str, Any]:
    """The learner's last log entry (its plain values), its start, budget, and how many tensors the
    learned mask froze; ``frozen_moved``: how far the data moved the mask from the initial one."""
    final = {k: v for k, v in logs[-1].items() if isinstance(v, (int, float, str))} if logs else {}
    return {"final": final, "init": cfg.init, "budget": cfg.learner.budget, "frozen": len(learned.frozen_names),
            "budget_by": cfg.learner.budget_by, "frozen_moved": final.get("frozen_moved"),
            "frozen_moved_share": final.get("frozen_moved_share")}
