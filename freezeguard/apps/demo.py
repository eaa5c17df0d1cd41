"""The end-to-end demo on the built-in toy world: FreezeAsGuard as its authors run it, with a verdict.

Phases (each with a progress bar), in the default "relearn" world (docs/evaluation.md):
1. the judge and the published model, pretrained on the base classes *and the target* (cached),
   then the target erased toward an anchor with UCE (the authors' eraser): the release;
2. the publisher's relearn fine-tune of the release on target + innocent data (theta_ft);
3. the bilevel MaskLearner between the release and theta_ft at the demo's freeze ratio;
4. simulated users relearn from the release under no mask (erase only) / random masks at several
   ratios / a reference mask / the learned mask, on the target and the innocent domain, for the
   standard, the 3x-steps and the fresh-token attacker (the target bound to a new prompt); then
   the decision rule (apps.evaluate.verdict) says whether the learned mask mitigates; a report folder.

``world="new concept"`` is the earlier setting (pretraining never saw the target, nothing erased).
Baselines (UCE and Concept Ablation on the release, IMMA, UDP) with ``baselines=`` /
``freezeguard demo --baselines``. Everything is seeded; the same config gives the same figures on
the same machine/torch build.

Example:
    >>> from freezeguard.apps.demo import DemoConfig, run_demo
    >>> result = run_demo(DemoConfig.quick(), out_dir="demo-report")     # doctest: +SKIP
    >>> result["verdict"]["label"]                                      # doctest: +SKIP
    'DOES NOT MITIGATE'
"""
from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from freezeguard.apps.baselines import measure_cost
from freezeguard.apps.baselines.harness import Protection, contenders, resolve_methods, step_overrides, toy_inputs
from freezeguard.apps.erase import Erased, erase_toy
from freezeguard.apps.evaluate.equal_harm import equal_harm_rows
from freezeguard.apps.evaluate.harness import attacker_suite, evaluate_masks, heldout_loss
from freezeguard.apps.evaluate.report import write_report
from freezeguard.apps.evaluate.toy_domains import fresh_token_domain, toy_domains
from freezeguard.apps.evaluate.verdict import decide, figures_from_draws
from freezeguard.apps.learn import reference_masks as ref
from freezeguard.apps.learn.config import NAMED_INITS, LearnerConfig
from freezeguard.apps.learn.learner import MaskLearner
from freezeguard.core.mask import FreezeMask
from freezeguard.integrations.diffusers import judge as judge_mod
from freezeguard.integrations.diffusers import toy

FRESH_TOKEN = "fresh token"


@dataclass(frozen=True)
class World:
    """One toy world of the evaluation (docs/evaluation.md): who the target is, what the model knew.

    ``kin`` is the class the target belongs to, which the model knows: the erase's anchor (UCE maps a
    person onto "celebrity") and the prior-preservation attacker's class images (DreamBooth's "a dog").
    ``known`` are the classes the published model is pretrained on beside ``PretrainConfig.classes``;
    ``erases``: the publisher erases the target before release (the model knew it).
    """

    target: tuple[str, ...]
    innocent: tuple[str, ...]
    kin: str
    known: tuple[str, ...]
    erases: bool

    def judge_classes(self) -> tuple[str, ...]:
        """The classes the demo's judge tells apart in this world."""
        return tuple(dict.fromkeys(toy.ALL_CLASSES + self.known + self.target + self.innocent))


_OTHER_MEMBERS = tuple(m for m in toy.FAMILY_MEMBERS if m != toy.FAMILY_MEMBERS[0])
# The worlds. The shapes world's target, a frame, is new spatial knowledge; the family world's is one
# member of a family the model draws (procedural faces), so relearning or learning it can reuse what
# the model knows of the family. Each has an arm where the model knew the target and the publisher
# erased it (the authors' setting) and one where the target is new and nothing is erased.
WORLDS = {
    "relearn": World(toy.TARGET_CLASSES, toy.INNOCENT_CLASSES, "square", toy.TARGET_CLASSES, erases=True),
    "new concept": World(toy.TARGET_CLASSES, toy.INNOCENT_CLASSES, "square", (), erases=False),
    "family relearn": World(toy.FAMILY_MEMBERS[:1], toy.INNOCENT_CLASSES, toy.FAMILY,
                            (toy.FAMILY,) + toy.FAMILY_MEMBERS, erases=True),
    "family new member": World(toy.FAMILY_MEMBERS[:1], toy.INNOCENT_CLASSES, toy.FAMILY,
                               (toy.FAMILY,) + _OTHER_MEMBERS, erases=False),
}


# The demo's learner. Chosen by benchmarks/learner_sweep.py (benchmarks/RESULTS.md, "The learned mask must be
# learned"): by tensors the releaser spends the budget on biases and norms (the innocent term keeps the large
# tensors both domains need trainable), so the budget counts parameters; the projected budget, 4 signal batches
# per logit step and an RMS-normalised signal let the data reorder the logits.
# freeze_ratio, 90% of the parameters: at 0.5 no mask, chosen any way (random, reference rankings, whole parts
# of the UNet, the learner), blocks or spares measurably more than another on the held-out loss (at most ~8% of
# either domain's gain, target and innocent in step); at 0.9 freezing matters (random masks block ~19% of the
# target's gain) and masks differ (benchmarks/RESULTS.md, "The learned mask must be learned" / "Evaluation
# power"). Chosen on random and reference masks.
# signal_density with init="constant" (DemoConfig.init): rank tensors by the signal per parameter (the budget's
# unit), from a constant start, so the data alone sets the order: benchmarks/eval_power.py --variants at ratio
# 0.9 (RESULTS.md, "The learned mask must be learned" / "Learner variants") -- uniform start +2.2, constant
# start -0.0, constant start with the density +4.7 points of the target's gain beyond random at equal harm.
# innocent_weight 1 (the default): the releaser weighs both domains' losses equally (the authors'): 0.5 learns
# the same mask and 0.25 one 0.2 points further beyond random at 0.8 points more harm (eval_power --variants,
# RESULTS.md, "The learned mask must be learned" / "Against the stronger attackers, other weights ..."). Unnamed
# fields are LearnerConfig's defaults (the authors' T = 0.2, c "auto", user_interval 5, the AdamW user's betas,
# eps and weight decay).
DEMO_LEARNER = LearnerConfig(freeze_ratio=0.9, budget_by="params", mask_lr=0.05, user_lr=1e-3,
                             user_optimizer="adamw", budget="projected", signal_batches=4, signal_norm="rms",
                             signal_density=True, init="constant")


@dataclass
class DemoConfig:
    """Every knob of the demo; defaults are the full demo (a few minutes on 2 CPU cores)."""

    pretrain: toy.PretrainConfig = field(default_factory=toy.PretrainConfig)
    # The world (docs/evaluation.md; WORLDS). "relearn", the authors' setting: pretraining includes the
    # target (the released model knew it, as SD-1.5 knows public figures), the publisher erases it
    # toward ``anchor`` with ``eraser`` and releases the erased model; theta_ft relearns target +
    # innocent from it; attackers relearn the target from it. "new concept": pretraining never saw the
    # target, nothing is erased (the setting of every figure before the erase pipeline). "family
    # relearn" / "family new member": the same two arms with a member of a known family as the target.
    world: str = "relearn"
    # None: the world's (WORLDS[world]); replace(world=...) resets the ones it is not given
    target: tuple[str, ...] | None = None
    innocent: tuple[str, ...] | None = None
    anchor: str | None = None
    eraser: str = "uce"
    batch_size: int = 16
    # publisher's relearn fine-tune (theta_ft)
    publisher_steps: int = 200
    publisher_lr: float = 1e-3
    # mask learning: the learner's settings (DEMO_LEARNER; why each was chosen is said there), read
    # as cfg.learner.freeze_ratio and changed as cfg.replace(learner=cfg.learner.replace(...)). Its
    # seed is the demo's ``seed`` and its init follows the demo's ``init`` (kept in step by
    # __post_init__).
    learner: LearnerConfig = field(default_factory=lambda: DEMO_LEARNER)
    learner_steps: int = 200
    init: str = "constant"             # "uniform" | "constant" | a reference mask's name ("delta", ...)
    # reference masks shown beside learned and random (apps.learn.reference_masks)
    # One reference beside learned and random keeps the demo under 10 minutes on 2 cores;
    # benchmarks/eval_relearn.py adds saliency and the eraser's own tensors.
    references: tuple[str, ...] = ("delta",)
    saliency_batches: int = 64
    # evaluation
    attacker_lr: float = 1e-3
    attacker_steps: int = 100
    # The decision rule needs the standard, 3x-steps and fresh-token attackers; the 10x-lr one is left
    # to benchmarks/eval_relearn.py (--strong-lr-mult 10 adds it here, at more time).
    strong_lr_mult: float = 1.0
    # The 3x-steps attacker (--strong-steps-mult 3) costs 3x the standard one: with the reference
    # masks the demo would pass 10 minutes on 2 cores. benchmarks/learner_sweep.py measures all three.
    strong_steps_mult: float = 3.0
    fresh_token: bool = True
    random_seeds: int = 1
    # Random masks also at these freeze ratios (random_seeds each): they trace what blocking the
    # target costs the legal user, so every mask is also compared with random *at equal harm*
    # (apps.evaluate.equal_harm), not only at one ratio, where a mask that spares the legal user
    # also blocks less. () leaves them out.
    # One ratio keeps the demo under 10 minutes on 2 cores; eval_power.py --random-ratios adds more.
    harm_ratios: tuple[float, ...] = (0.5, 0.7)
    # draws of the attack's randomness (data order, noise) every fine-tune is repeated under; each contender is
    # averaged over them. One draw keeps the demo under 10 minutes on 2 cores, but can move every figure by more
    # than the gap between masks (benchmarks/RESULTS.md, "The learned mask must be learned").
    attack_seeds: int = 1
    # The metric of the headline (mitigation, learned/random). Held-out loss: over 5 draws of the attack its
    # gaps between masks repeat (reliability 0.88; one draw 0.59), recognisability's do not (0.00;
    # benchmarks/RESULTS.md, "The learned mask must be learned" / "Evaluation power"). Chosen on that
    # measurement, before any mask was compared on it. Every metric is still in the report.
    primary_metric: str = "loss"
    judge_steps: int = 300
    heldout_n: int = 64
    sample_n: int = 32
    sample_steps: int = 15
    guidance: float = 1.0
    # baselines facing the same attackers (freezeguard.apps.baselines): the two cheap ones by default
    # (the erase itself is UCE: the other protections are for benchmarks and --baselines)
    baselines: tuple[str, ...] = ()
    baseline_steps: int | None = None  # cap on iterative baselines' steps (None: each paper's, scaled)
    # fine-tunes of the evaluation run in this many forked processes (one torch thread each): the
    # demo's budget is 2 cores; the figures do not depend on it
    workers: int = 2
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoConfig":
        """A shortened configuration (tests, a first look): every phase, far fewer steps."""
        small = toy.ToyModelConfig(block_out_channels=(8, 16), attention_head_dim=4, norm_num_groups=4)
        return cls(pretrain=toy.PretrainConfig(model=small, steps=30, batch_size=8), batch_size=8,
                   publisher_steps=10, learner_steps=10, attacker_steps=4, strong_steps_mult=3.0, baseline_steps=2,
                   random_seeds=1, judge_steps=30, heldout_n=8, sample_n=4, sample_steps=3, saliency_batches=4)

    def __post_init__(self) -> None:
        if self.world not in WORLDS:
            raise ValueError(f"unknown world {self.world!r}; choose from {', '.join(WORLDS)}")
        world = WORLDS[self.world]
        self.target = tuple(self.target) if self.target is not None else world.target
        self.innocent = tuple(self.innocent) if self.innocent is not None else world.innocent
        self.anchor = self.anchor if self.anchor is not None else world.kin
        # The learner follows the demo's seed and start (a reference name: the learner's "scores").
        init = self.init if self.init in ("uniform", "constant") else "scores"
        if (self.learner.seed, self.learner.init) != (self.seed, init):
            self.learner = self.learner.replace(seed=self.seed, init=init)

    def to_json(self) -> dict[str, Any]:
        """The demo's settings, the learner's under "learner" (the report's "config")."""
        return {**asdict(self), "learner": self.learner.to_json()}

    def pretrain_config(self) -> toy.PretrainConfig:
        """The published model's pretraining: ``pretrain``, plus the world's known classes (the target
        among them where the world erases it)."""
        extra = tuple(c for c in WORLDS[self.world].known if c not in self.pretrain.classes)
        return dataclasses.replace(self.pretrain, classes=self.pretrain.classes + extra) if extra else self.pretrain

    def replace(self, **changes: Any) -> "DemoConfig":
        """A copy with ``changes`` (the learner's: ``learner=self.learner.replace(...)``)."""
        if changes.get("world", self.world) != self.world:
            for name in ("target", "innocent", "anchor"):     # another world: its own, unless given
                changes.setdefault(name, None)
        return dataclasses.replace(self, **changes)


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


def _phase(name: str, progress: bool) -> None:
    if progress:
        print(f"[freezeguard demo] {name}", flush=True)


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


def attackers(cfg: DemoConfig):
    """The simulated user the mask is judged against, and the stronger ones (see attacker_suite)."""
    return attacker_suite(cfg.attacker_lr, cfg.attacker_steps, lr_mult=cfg.strong_lr_mult,
                          steps_mult=cfg.strong_steps_mult)


def random_masks_at(model: torch.nn.Module, ratios, count: int, *, by: str, seed: int) -> dict[str, FreezeMask]:
    """``random@R#k`` -> ``count`` random masks at each freeze ratio R (seeds ``seed + k``, as the
    random masks at the demo's own ratio): the points that trace the price of blocking."""
    return {f"random@{ratio:g}#{k}": FreezeMask.random(model, ratio, by=by, seed=seed + k)
            for ratio in ratios for k in range(count)}


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


def _target_loss(model: torch.nn.Module, cfg: DemoConfig, loss_fn) -> float:
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


def run_demo(cfg: DemoConfig = DemoConfig(), out_dir: str | Path | None = "freezeguard-demo",
             cache_dir: str | Path | None | bool = None, *, progress: bool = True,
             device: str | torch.device = "cpu", workers: int | None = None) -> dict[str, Any]:
    """Run every phase; write the report to ``out_dir`` (None: no files). Returns the summary.

    ``workers``: processes for the evaluation's fine-tunes (default ``cfg.workers``; same figures,
    less wall time; see ``evaluate_masks``).

    The figures are seeded; on another device (``device="cuda"``) they differ slightly from CPU's.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    loss_fn = toy.make_loss_fn(cfg.pretrain.model)

    _phase("1/4 judge + published model (cached after the first run)"
           + (f", then {cfg.eraser} erases {'/'.join(cfg.target)} toward {cfg.anchor}" if WORLDS[cfg.world].erases else ""),
           progress)
    judge = judge_mod.train_judge(WORLDS[cfg.world].judge_classes(), steps=cfg.judge_steps, seed=cfg.seed,
                                  cache_dir=cache_dir, progress=progress)
    pretrained, model, erased = release(cfg, cache_dir, progress=progress, device=device)
    timings["pretrain"] = time.perf_counter() - t0

    # The publisher's cost of FreezeAsGuard: its own fine-tune (theta_ft) plus the mask learner.
    with measure_cost(device) as fag_cost:
        _phase("2/4 publisher's relearn fine-tune (target + innocent)", progress)
        t = time.perf_counter()
        ft_state = publisher_finetune(model, cfg, loss_fn, progress=progress)
        timings["publisher_finetune"] = time.perf_counter() - t

        _phase(f"3/4 reference rankings, then learn a mask ({cfg.learner.freeze_ratio:.0%} of "
               f"{cfg.learner.budget_by})", progress)
        t = time.perf_counter()
        wanted = tuple(dict.fromkeys(cfg.references + (() if cfg.init in ("uniform", "constant") else (cfg.init,))))
        scores = reference_scores(model, ft_state, cfg, loss_fn, wanted)
        timings["reference_masks"] = time.perf_counter() - t
        t = time.perf_counter()
        learned, logs = learn_mask(model, ft_state, cfg, loss_fn, progress=progress, scores=scores)
        timings["learn_mask"] = time.perf_counter() - t

    methods = resolve_methods(cfg.baselines) if cfg.baselines else []
    _phase("4/4 evaluate full / random / learned" + "".join(f" / {m}" for m in methods)
           + " on target and innocent", progress)
    t = time.perf_counter()
    inputs = None
    if methods:
        inputs = toy_inputs(model, reference_lr=cfg.attacker_lr, reference_steps=cfg.attacker_steps,
                            batch_size=cfg.batch_size, target=cfg.target, innocent=cfg.innocent,
                            sample_steps=cfg.sample_steps, seed=cfg.seed, config=cfg.pretrain.model,
                            known=cfg.pretrain_config().classes)
    # the random masks are drawn as before: same ratio, seeds cfg.seed + k
    contenders_ = contenders(model, methods, inputs, mask=learned, random_seeds=cfg.random_seeds,
                             budget_by=cfg.learner.budget_by, seed=cfg.seed,
                             overrides=step_overrides(cfg.baseline_steps), progress=progress)
    # the reference masks (the bar the learner must clear) sit between the random masks and the learned one
    masks: dict[str, Any] = {}
    for name, entry in contenders_.items():
        if name == "learned":
            for ref_name in cfg.references:
                masks[f"ref: {ref_name}"] = FreezeMask.from_scores(model, scores[ref_name], cfg.learner.freeze_ratio,
                                                                    by=cfg.learner.budget_by)
        masks[name] = entry
    masks.update(random_masks_at(model, [r for r in cfg.harm_ratios if r != cfg.learner.freeze_ratio],
                                 cfg.random_seeds, by=cfg.learner.budget_by, seed=cfg.seed))
    timings["baselines"] = sum(p.cost.seconds for k, p in masks.items()
                               if isinstance(p, Protection) and p.cost is not None and "+" not in k)
    domains = toy_domains(cfg.target, cfg.innocent, judge=judge, batch_size=cfg.batch_size,
                          heldout_n=cfg.heldout_n, sample_n=cfg.sample_n, sample_steps=cfg.sample_steps,
                          guidance=cfg.guidance)
    result = evaluate_masks(model, masks, domains, loss_fn, attackers(cfg), seed=cfg.seed + 31,
                            attack_seeds=cfg.attack_seeds, progress=progress, primary_metric=cfg.primary_metric,
                            workers=cfg.workers if workers is None else workers)
    result.masks["learned"]["cost"] = fag_cost.to_json()
    fresh = None
    if cfg.fresh_token:
        # the fresh-token attacker: the standard user, the target's images bound to a new prompt
        fresh = evaluate_masks(model, masks, [fresh_token_domain(cfg.target[0], batch_size=cfg.batch_size,
                                                                 heldout_n=cfg.heldout_n)],
                               loss_fn, attackers(cfg)[:1], seed=cfg.seed + 31, attack_seeds=cfg.attack_seeds,
                               progress=progress, primary_metric=cfg.primary_metric,
                               workers=cfg.workers if workers is None else workers).summary()
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    summary = result.summary()
    summary["config"] = cfg.to_json()
    if cfg.harm_ratios:
        summary["equal_harm"] = equal_harm_summary(summary)
    if fresh is not None:
        summary["fresh_token"] = {"domain": toy.fresh_prompt(cfg.target[0]),
                                  "removed_by_draw": fresh["removed_by_draw"]["standard"],
                                  "table": fresh["table"]["standard"]}
    if erased is not None:
        summary["erase"] = {"eraser": erased.eraser, "anchor": cfg.anchor, "edited": erased.edited,
                            "target_loss": {"pretrained": _target_loss(pretrained, cfg, loss_fn),
                                            "released": _target_loss(model, cfg, loss_fn)}}
    summary["verdict"] = verdict_summary(summary)
    summary["timings_s"] = timings
    final = {k: v for k, v in logs[-1].items() if isinstance(v, (int, float, str))} if logs else {}
    frozen = len(learned.frozen_names)
    summary["learner"] = {"final": final, "init": cfg.init, "budget": cfg.learner.budget, "frozen": frozen,
                          "budget_by": cfg.learner.budget_by, "frozen_moved": final.get("frozen_moved"),
                          "frozen_moved_share": final.get("frozen_moved_share")}
    if out_dir is not None:
        summary["report_dir"] = str(write_report(result, summary, out_dir, mask=learned))
    return summary
