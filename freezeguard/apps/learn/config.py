"""LearnerConfig: every hyperparameter of the MaskLearner, validated once, in one frozen record.

``MaskLearner``, ``freezeguard learn`` and the demo build their learner from it; the learner's
saved state stores it (JSON) and ``MaskLearner.load(..., config=...)`` compares it field by
field, so a resumed run cannot silently continue under other settings. The meaning of each field
is declared with it (``LearnerConfig.doc``, listed in the class docstring; docs/DESIGN.md section 4).

Example:
    >>> cfg = LearnerConfig(freeze_ratio=0.3, budget="projected")
    >>> cfg.replace(mask_lr=1.0).mask_lr, cfg.c_sparsity
    (1.0, 'auto')
    >>> print(LearnerConfig.doc("temperature"))
    T of the soft mask m = sigmoid(x / T) (the authors': 0.2)
    >>> LearnerConfig.from_json(cfg.to_json()) == cfg
    True
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from freezeguard.apps.learn.logits import BUDGET_BASES
from freezeguard.core.values import check_positive, check_ratio

USER_OPTIMIZERS = ("sgd", "adamw")
BUDGETS = ("penalty", "projected")
SIGNAL_NORMS = (None, "rms")
NAMED_INITS = ("uniform", "constant")        # the logits' starts named by a string
INITS = NAMED_INITS + ("scores",)            # "scores": a reference ranking given to the learner as a mapping


def _number(name: str, value: Any, *, allow_zero: bool = True) -> float:
    try:
        value = float(value)  # numpy / tensor scalars and JSON numbers alike
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    return check_positive(value, name, allow_zero=allow_zero)


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be >= 1 (an integer), got {value!r}")
    return int(value)


def _choice(name: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _setting(default: Any, doc: str) -> Any:
    """A LearnerConfig field with its meaning: where the setting is documented, once (see ``doc``)."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class LearnerConfig:
    """The MaskLearner's hyperparameters (defaults: the authors' scripts, c_sparsity "auto").

    Each setting's meaning is declared with its field, once: ``LearnerConfig.doc(name)`` gives
    it, ``help(LearnerConfig)`` lists them all (below) and ``freezeguard learn --help`` shows them
    as its flags' help.
    """

    freeze_ratio: float = _setting(
        0.2, "the budget rho in [0, 1]: the share of tensors (or of parameters, ``budget_by``) the mask freezes")
    temperature: float = _setting(0.2, "T of the soft mask m = sigmoid(x / T) (the authors': 0.2)")
    c_sparsity: float | str = _setting(
        "auto", "weight c of the budget penalty c (rho - mean m)^2: a number (the authors': 5e3) or 'auto', the c "
                "whose first penalty step takes the soft ratio exactly to ``freeze_ratio`` (apps.learn.budget; ~5e3 "
                "for the SD-1.5 UNet at rho = T = 0.2, ~4e2 for a 208-tensor model at rho = 0.5)")
    mask_lr: float = _setting(10.0, "learning rate eta_m of the mask logits (the authors': 10)")
    user_lr: float = _setting(1e-5, "the simulated user's learning rate eta_u (the authors': 1e-5)")
    user_interval: int = _setting(
        5, "one releaser step every ``user_interval`` steps, simulated-user steps between (the authors': 5)")
    budget_by: str = _setting("tensors", "what the budget counts: tensors (the authors') or params")
    user_optimizer: str = _setting(
        "sgd", "the simulated user: sgd (the authors') or adamw (a stronger attacker; ``user_betas``, ``user_eps``, "
               "``user_weight_decay`` as in torch.optim.AdamW)")
    user_betas: tuple[float, float] = _setting((0.9, 0.999), "the AdamW user's betas")
    user_eps: float = _setting(1e-8, "the AdamW user's eps")
    user_weight_decay: float = _setting(1e-2, "the AdamW user's decoupled weight decay")
    seed: int = _setting(
        0, "seeds the logits' start (and, in learn() and the demo, the batch order, noise and timesteps)")
    budget: str = _setting(
        "penalty", "penalty (the authors': weight ``c_sparsity``) or projected: after every releaser step (and at "
                   "the start) all logits move by one common shift so the soft ratio equals ``freeze_ratio`` "
                   "exactly; the data alone orders the tensors and nothing saturates to meet the budget "
                   "(``c_sparsity`` unused)")
    signal_batches: int = _setting(
        1, "releaser batches whose sensitivities s = <Delta, g> are averaged into one logit step (1: the authors'); "
           "the schedule is then ``signal_batches`` releaser batches followed by ``user_interval`` - 1 user batches")
    signal_norm: str | None = _setting(
        None, "no normalisation (None, the authors') or rms: divide s by its root mean square over tensors before "
              "the step, so ``mask_lr`` is a step in logit units whatever the scale of Delta and of the loss (then "
              "``mask_lr`` ~ 1e-2..1e-1 suits)")
    signal_density: bool = _setting(
        False, "on (True): divide each tensor's s by its share of the budget (1 by tensors, n_i / mean n by "
               "parameters), so the logits order tensors by the releaser's gain per unit of budget, as a greedy "
               "knapsack does; without it, by parameters, a large tensor's total s outweighs any small one's. No "
               "change by tensors (the authors' budget)")
    init: str = _setting(
        "uniform", "the initial logits: uniform (the authors' seeded U[0, 1): everything starts frozen, m > 0.5, in "
                   "a random order), constant (every logit T logit(rho): m = rho, no order; ties go to names) or "
                   "scores (a reference ranking: a name -> score mapping given to the MaskLearner beside the config)")
    innocent_weight: float = _setting(
        1.0, "w in the releaser's objective (w mean innocent loss - mean target loss) / 2: how much the legal "
             "domain's quality counts against hurting the target's (1: the authors'; 0 ignores the legal domain; on "
             "the demo's world 0.5 gives the same mask, benchmarks/RESULTS.md)")

    def __post_init__(self) -> None:
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: normalise in place once)
        put("freeze_ratio", check_ratio(self.freeze_ratio, "freeze_ratio"))
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

    @classmethod
    def doc(cls, name: str) -> str:
        """What the setting ``name`` means (declared with the field)."""
        return cls.__dataclass_fields__[name].metadata["doc"]

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


if LearnerConfig.__doc__:  # (None under python -OO)
    LearnerConfig.__doc__ += "\n    Fields:\n" + "".join(
        f"        {f.name}: {f.metadata['doc']}.\n" for f in dataclasses.fields(LearnerConfig))

__all__ = ["LearnerConfig", "USER_OPTIMIZERS", "BUDGETS", "SIGNAL_NORMS", "INITS", "NAMED_INITS"]
