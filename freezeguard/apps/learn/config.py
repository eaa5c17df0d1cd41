"""LearnerConfig: every hyperparameter of the MaskLearner, validated once, in one frozen record.

``MaskLearner``, ``freezeguard learn`` and the demo build their learner from it; the learner's
saved state stores it (JSON) and ``MaskLearner.load(..., config=...)`` compares it field by
field, so a resumed run cannot silently continue under other settings. The meaning of each field
is in ``LearnerConfig``'s docstring (and docs/DESIGN.md section 4).

Example:
    >>> cfg = LearnerConfig(freeze_ratio=0.3, budget="projected")
    >>> cfg.replace(mask_lr=1.0).mask_lr, cfg.c_sparsity
    (1.0, 'auto')
    >>> LearnerConfig.from_json(cfg.to_json()) == cfg
    True
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from freezeguard.apps.learn.logits import BUDGET_BASES

USER_OPTIMIZERS = ("sgd", "adamw")
BUDGETS = ("penalty", "projected")
SIGNAL_NORMS = (None, "rms")
INITS = ("uniform", "constant", "scores")   # "scores": a reference ranking given to the learner


def _number(name: str, value: Any, *, allow_zero: bool = True) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _choice(name: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


@dataclass(frozen=True)
class LearnerConfig:
    """The MaskLearner's hyperparameters (defaults: the authors' scripts, c_sparsity "auto").

    Fields:
        freeze_ratio: budget rho in [0, 1], by tensor count or parameter count (``budget_by``).
        temperature, mask_lr, user_lr, user_interval: the reference's T, eta_m, eta_u and releaser
            period (defaults from the authors' scripts).
        c_sparsity: weight c of the budget penalty c (rho - mean m)^2. "auto" (default): the c whose
            first penalty step takes the soft ratio exactly to rho (``apps.learn.budget``; ~5e3, the
            authors' value, for the SD-1.5 UNet at rho = T = 0.2, but ~4e2 for a 208-tensor model
            at rho = 0.5). A number is used as given (the authors' behaviour).
        budget: "penalty" (the authors' penalty, weight ``c_sparsity``) or "projected": after every
            releaser step (and at the start) all logits move by one common shift so that the soft
            ratio equals rho exactly; the data alone orders the tensors and nothing saturates to
            meet the budget (``c_sparsity`` is then unused).
        signal_batches: releaser batches whose sensitivities s = <Delta, g> are averaged before one
            logit step (1: the authors' one batch per releaser step). The schedule is then
            ``signal_batches`` releaser batches followed by ``user_interval - 1`` user batches.
        signal_norm: None (the authors') or "rms": divide s by its root mean square over tensors
            before the step, so ``mask_lr`` is a step in logit units whatever the scale of Delta
            and of the loss (a departure from the authors; then mask_lr ~ 1e-2..1e-1 suits).
        signal_density: divide each tensor's s by its share of the budget (S w_i: 1 by tensors,
            n_i / mean n by parameters) before the step, so the logits order tensors by the
            releaser's gain *per unit of budget*, as a greedy knapsack does. Without it, by
            parameters, a large tensor's total s outweighs any small one's and the projection pays
            for unfreezing one large tensor with every small one. No change by tensors (the
            authors' budget); a departure from the authors by parameters.
        innocent_weight: w in the releaser's objective (w mean innocent loss - mean target loss) / 2:
            how much keeping the legal domain's quality counts against hurting the target's
            (1: the authors' equal weights; 0 ignores the legal domain). On the demo's world 0.5
            gives the same mask and 0.25 a slightly more harmful one (benchmarks/RESULTS.md).
        init: the initial logits: "uniform" (the authors' seeded U[0, 1): everything starts
            frozen, m > 0.5, in a random order), "constant" (every logit T logit(rho): m = rho, no
            order; ties go to names), or "scores" (a reference ranking, whose
            name -> score mapping is given to ``MaskLearner(init=...)``).
        user_optimizer: "sgd" (the reference) or "adamw" (a stronger simulated user; its
            ``user_betas``, ``user_eps``, ``user_weight_decay`` as in torch.optim.AdamW).
        seed: seeds the logits' U[0, 1) initialisation (everything starts frozen, m > 0.5).
    """

    freeze_ratio: float = 0.2
    temperature: float = 0.2
    c_sparsity: float | str = "auto"
    mask_lr: float = 10.0
    user_lr: float = 1e-5
    user_interval: int = 5
    budget_by: str = "tensors"
    user_optimizer: str = "sgd"
    user_betas: tuple[float, float] = (0.9, 0.999)
    user_eps: float = 1e-8
    user_weight_decay: float = 1e-2
    seed: int = 0
    budget: str = "penalty"
    signal_batches: int = 1
    signal_norm: str | None = None
    signal_density: bool = False
    init: str = "uniform"
    innocent_weight: float = 1.0

    def __post_init__(self) -> None:
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: normalise in place once)
        try:
            ratio = float(self.freeze_ratio)
        except (TypeError, ValueError):
            raise ValueError(f"freeze_ratio must be in [0, 1], got {self.freeze_ratio!r}") from None
        if math.isnan(ratio) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"freeze_ratio must be in [0, 1], got {ratio}")
        put("freeze_ratio", ratio)
        put("temperature", _number("temperature", self.temperature, allow_zero=False))
        if isinstance(self.c_sparsity, str):
            if self.c_sparsity != "auto":
                raise ValueError(f"c_sparsity must be a number >= 0 or 'auto', got {self.c_sparsity!r}")
        else:
            put("c_sparsity", _number("c_sparsity", self.c_sparsity))
        for name in ("mask_lr", "user_lr", "user_eps", "user_weight_decay", "innocent_weight"):
            put(name, _number(name, getattr(self, name)))
        put("user_interval", _integer("user_interval", self.user_interval))
        put("signal_batches", _integer("signal_batches", self.signal_batches))
        _choice("budget_by", self.budget_by, BUDGET_BASES)
        _choice("user_optimizer", self.user_optimizer, USER_OPTIMIZERS)
        _choice("budget", self.budget, BUDGETS)
        _choice("signal_norm", self.signal_norm, SIGNAL_NORMS)
        if not isinstance(self.signal_density, bool):
            raise ValueError(f"signal_density must be True or False, got {self.signal_density!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS[:2]} or a name -> score mapping, got {self.init!r}")
        b1, b2 = (float(b) for b in self.user_betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"user_betas must be in [0, 1), got {(b1, b2)}")
        put("user_betas", (b1, b2))
        put("seed", int(self.seed))

    def replace(self, **changes: Any) -> "LearnerConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LearnerConfig":
        """From ``to_json`` output; keys it does not know are an error, missing ones take defaults
        (states saved before a field existed)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown learner settings: {unknown}")
        return cls(**{k: (tuple(v) if k == "user_betas" else v) for k, v in data.items()})

    def differences(self, other: "LearnerConfig") -> dict[str, tuple[Any, Any]]:
        """Field -> (self's value, other's value) for every field that differs."""
        a, b = self.to_json(), other.to_json()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


__all__ = ["LearnerConfig", "USER_OPTIMIZERS", "BUDGETS", "SIGNAL_NORMS", "INITS"]
