"""The demo's settings: its learner (DEMO_LEARNER, and why each setting was chosen) and DemoConfig.

Example:
    >>> from freezeguard.apps.demo_config import DemoConfig
    >>> cfg = DemoConfig.quick()
    >>> cfg.learner.freeze_ratio, cfg.anchor        # the demo's learner; the relearn world's anchor
    (0.9, 'square')
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from freezeguard.apps.learn.config import LearnerConfig
from freezeguard.apps.toy_worlds import WORLDS
from freezeguard.integrations.diffusers import toy

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

