"""MaskLearner: the publisher's bilevel search for the tensors to freeze (FreezeAsGuard).

The math is docs/DESIGN.md section 4, after the authors' ``src/mask_learner.py``. Per tensor i:
logits x_i, soft mask m_i = sigmoid(x_i / T) (1 = frozen at the released weights), Delta_i =
theta_pre,i - theta_ft,i, and the model's own parameters hold the live weights
theta_i = theta_ft,i + m_i Delta_i. Batches alternate on a fixed schedule:

- releaser step (batch k with k % user_interval == 0): g = grad of
  L = (w mean loss on innocent samples - mean loss on target samples) / 2 (w = innocent_weight,
  the authors' 1); s = <Delta, g> per tensor
  (``ops.segment_dot``); the logits take one gradient step on L plus the budget penalty
  c (rho - mean m)^2 (one vectorized expression over [S], ``apps.learn.logits``); the live weights
  follow the mask change (``ops.mask_shift_``).
- user step (all other batches): the simulated attacker fine-tunes the unfrozen share of every
  tensor on the mean loss: SGD (``ops.user_update_``, the reference) or AdamW
  (``ops.user_adamw``).

Beyond the authors' loop (each off unless chosen; ``LearnerConfig`` holds them all):
``c_sparsity="auto"`` (the default) picks the c whose first penalty step lands the soft ratio on
rho (``apps.learn.budget``); ``budget="projected"`` replaces the penalty by one common logit shift
that holds the soft ratio at rho exactly; ``signal_batches`` averages s over several releaser
batches per logit step and ``signal_norm="rms"`` divides s by its RMS over tensors; ``init``
starts from U[0, 1), a constant or a reference ranking (``apps.learn.reference_masks``). With the
authors' settings (explicit c, penalty, one signal batch, uniform init) the fused learner
matches their loop step for step (tests/test_learner_reference.py).

Every update is a whole-model op: no Python loop over tensors in the hot path.

Memory, per model parameter (b = bytes of the parameter dtype): the live weights (the model,
b), Delta (b) and the gradient autograd leaves during a step (b) -- 3b, the same as the
reference's finetuned model + difference model + gradients; the AdamW user adds its two moments
(2b). Under FSDP2 all of these are local shards: per rank 3b (5b) times the model's parameters
divided by the world size (rank 0 holds the largest shards; ``apps.memory`` counts them), plus
FSDP2's transient unsharded parameters and gradients of the unit being computed. Per tensor, on
every rank: four fp32 numbers (logit, budget weight, initial logit, accumulated signal).
theta_pre and theta_ft are read once at construction and not kept (drop your references to them
to free that memory; under FSDP2 every rank reads the full tensors once and keeps its shard).

Empty groups: a releaser batch without target samples (or without innocent ones) drops that
term from L, as the reference does (its means divide by count + 1e-5, so an empty group
contributes 0). L is then only "keep innocent quality" (or only "hurt the target").

Distributed (DDP, accelerate, a plain model under a process group, or FSDP2's ``fully_shard``):
every rank applies the same updates and ends with the same logits, hard mask and history; under
FSDP2 the learner works on local shards and ``save`` is collective. How: ``apps.learn.distributed``.

Where the rest lives (one idea per module): the logit update and initial logits in
``apps.learn.logits``, the budget's c and projection in ``apps.learn.budget``, the hard-mask rules
in ``apps.learn.mask_rules``, the save / resume file in ``apps.learn.state_io``, the run loop of
``fit`` in ``apps.learn.loop``, the settings in ``apps.learn.config``; this module holds the
learner's state and its two kinds of step.

Example:
    >>> import torch, freezeguard as fg
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> pre = {k: v.clone() for k, v in model.state_dict().items()}
    >>> ft = {k: v + 0.1 for k, v in pre.items()}
    >>> def loss_fn(model, batch):           # per-sample losses [B]
    ...     return (model(batch["x"]).squeeze(1) - batch["y"]) ** 2
    >>> learner = fg.MaskLearner(model, pre, ft, loss_fn, freeze_ratio=0.5, user_interval=2)
    >>> batch = {"x": torch.randn(6, 4), "y": torch.randn(6), "is_target": torch.tensor([1, 0] * 3).bool()}
    >>> learner.step(batch)["kind"], learner.step(batch)["kind"]
    ('releaser', 'user')
    >>> learner.hard_mask().ratio(by="tensors")
    0.5
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import torch

from freezeguard import ops
from freezeguard.apps.learn import checks, distributed, loop, mask_rules, state_io
from freezeguard.apps.learn.budget import auto_c_sparsity, project_logits
from freezeguard.apps.learn.config import BUDGETS, SIGNAL_NORMS, USER_OPTIMIZERS, LearnerConfig
from freezeguard.apps.learn.logits import (
    budget_weights,
    initial_logits,
    releaser_logits,
    shaped_signal,
    soft_mask,
    uniform_logits,
)
from freezeguard.apps.learn.mask_rules import HARD_MASK_METHODS, HARD_MASK_RULES
from freezeguard.core.group_norm_fix import protect_group_norms
from freezeguard.core.mask import FreezeMask

LossFn = Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor]
INITS = ("uniform", "constant")   # or a name -> score mapping (a reference ranking)
LIVE_LOGIT = 0.01                 # a logit is "live" while m (1 - m) > this (it can still move)

# Hyperparameters: the fields of LearnerConfig (saved with the state, compared on resume).
_HPARAMS = frozenset(f.name for f in dataclasses.fields(LearnerConfig))


class MaskLearner:
    """Learn per-tensor freeze logits by alternating releaser and simulated-user steps.

    Args:
        model: the model whose parameters become the live weights (plain, DDP- or
            accelerate-wrapped, or sharded by FSDP2's ``fully_shard``). Its current weights are
            overwritten.
        pretrained_state, finetuned_state: name -> tensor maps (``state_dict()``s) of the released
            weights and of the publisher's own fine-tune on target + innocent data.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]`` per-sample losses; ``batch`` is passed
            untouched and must carry ``batch["is_target"]`` (bool [B]).
        config, **overrides: the settings, a :class:`LearnerConfig` (defaults: the authors'),
            with any field given by name overriding it (``freeze_ratio=0.5``); each field's meaning
            is in LearnerConfig's docstring. ``init`` may also be a name -> score mapping (a
            reference ranking, e.g. ``apps.learn.reference_masks``): logits spread evenly over
            [0, 1) by rank, highest score highest, so the search refines that ranking.
        backend: backend of the fused ops ("auto", "torch", "cpp", "triton", "cuda").
        check_finite: stop with an error naming the step (and tensors) on a non-finite loss or
            gradient, before anything is updated. Costs one extra read of the gradients on user
            steps (releaser steps get it free from the segmented dot products); under FSDP2 also
            an all-reduce of N floats on user steps, so that every rank stops alike.

    See the module docstring for the math, the memory it takes and an example.
    """

    def __init__(self, model: torch.nn.Module, pretrained_state: Mapping[str, torch.Tensor],
                 finetuned_state: Mapping[str, torch.Tensor], loss_fn: LossFn, config: LearnerConfig | None = None,
                 *, backend: str = "auto", check_finite: bool = True, **overrides: Any):
        scores = overrides.get("init")
        if isinstance(scores, Mapping):
            overrides["init"] = "scores"
        else:
            scores = None
        unknown = sorted(set(overrides) - _HPARAMS)
        if unknown:
            raise TypeError(f"MaskLearner got unexpected keyword arguments {unknown}")
        config = (config or LearnerConfig()).replace(**overrides)
        if config.init == "scores" and scores is None:
            raise ValueError("init='scores' needs the scores: pass init={name: score, ...}")
        self._configure(model, loss_fn, backend=backend, check_finite=check_finite, config=config)
        buffers = frozenset(n for n, _ in self.module.named_buffers())
        checks.check_states(dict(zip(self.names, self._params, strict=True)), pretrained_state, finetuned_state, buffers)
        self._initial = self._make_initial_logits(scores)
        distributed.broadcast_(self._initial)
        self.logits.copy_(self._initial)
        if self.c_sparsity_auto:
            self.c_sparsity = auto_c_sparsity(self.logits, self._weights, self.freeze_ratio, self.temperature)
        if self.budget == "projected":
            self.logits.copy_(project_logits(self.logits, self._weights, self.freeze_ratio, self.temperature))
        theta = self._theta()
        with torch.no_grad():
            for name, p, th, d in zip(self.names, self._params, theta, self._delta, strict=True):
                pre = pretrained_state[name].to(device=th.device, dtype=torch.float32)
                ft = finetuned_state[name].to(device=th.device, dtype=torch.float32)
                # Under FSDP2 each rank keeps its own shard of the full tensors (cut as p is).
                d.copy_(distributed.shard_of(pre - ft, p))
                th.copy_(distributed.shard_of(ft, p))
        ops.mask_shift_(theta, self._delta, soft_mask(self.logits, self.temperature), backend=self.backend)

    # construction -----------------------------------------------------------------------------
    def _configure(self, model: torch.nn.Module, loss_fn: LossFn, *, backend: str, check_finite: bool,
                   config: LearnerConfig) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> per-sample losses [B]")
        self.config = config
        for name in _HPARAMS:  # the settings as attributes (learner.freeze_ratio, ...), as before
            setattr(self, name, getattr(config, name))
        # c_sparsity "auto" is resolved once the initial logits exist (it depends on them).
        self.c_sparsity_auto = config.c_sparsity == "auto"
        self.c_sparsity = 0.0 if self.c_sparsity_auto else float(config.c_sparsity)
        self.model, self.loss_fn, self.backend, self.check_finite = model, loss_fn, backend, bool(check_finite)

        self.module = distributed.unwrap(model)
        protect_group_norms(self.module)  # a torch CPU crash that frozen inputs bring out
        named = list(self.module.named_parameters())
        if not named:
            raise ValueError("the model has no parameters to mask")
        self.names = [n for n, _ in named]
        self._params = [p for _, p in named]
        frozen = [n for n, p in named if not p.requires_grad]
        if frozen:
            if distributed.is_ddp(model):
                raise ValueError("every parameter must require grad before the model is wrapped in DDP; "
                                 f"these do not: {', '.join(frozen[:8])}")
            for p in self._params:
                p.requires_grad_(True)  # the learner searches over every tensor, as the reference does
        # FSDP2: DTensor parameters; every per-element buffer below is then a local shard.
        self._sharding = distributed.sharding(self.names, self._params)
        locals_ = self._theta()
        devices = {t.device for t in locals_}
        if len(devices) != 1:
            raise ValueError(f"the model's parameters span several devices {sorted(map(str, devices))}; "
                             "the fused ops need them on one")
        device = locals_[0].device
        self.logits = torch.zeros(len(self.names), dtype=torch.float32, device=device)
        # p.numel() and p.shape are the full tensor's, DTensor or not: the budget counts whole tensors.
        self._weights = budget_weights([p.numel() for p in self._params], self.budget_by, device)
        self._delta = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in locals_]
        self._exp_avg: list[torch.Tensor] = []
        self._exp_avg_sq: list[torch.Tensor] = []
        if self.user_optimizer == "adamw":
            self._exp_avg = [torch.zeros_like(d) for d in self._delta]
            self._exp_avg_sq = [torch.zeros_like(d) for d in self._delta]
        self.step_count = 0
        self.user_steps = 0
        self.history: list[dict[str, Any]] = []
        self._sizes = {n: p.numel() for n, p in named}
        self._initial = torch.zeros_like(self.logits)   # the initial logits (what "moved" is measured from)
        self._initial_frozen: frozenset[str] | None = None  # the hard mask of the initial logits
        self._mask_moved = 0
        self._frozen_moved = 0
        self._frozen_moved_share = 0.0
        self._data_to_budget: float | None = None
        self._signal = torch.zeros_like(self.logits)   # s accumulated over the releaser batches so far
        self._signal_count = 0
        self._grads_checked = False

    def _theta(self) -> list[torch.Tensor]:
        # The live weights' storage (local shards under FSDP2), taken afresh each step.
        return distributed.live_weights(self._params, self._sharding)

    def _initial_logits(self) -> torch.Tensor:
        """The seeded U[0, 1) initial logits (as the authors initialise them), on the CPU."""
        return uniform_logits(len(self.names), self.seed)

    def _make_initial_logits(self, scores: Mapping[str, float] | None) -> torch.Tensor:
        """The initial logits of ``init`` on the logits' device (before any projection)."""
        x = initial_logits(self.init, self.names, seed=self.seed, freeze_ratio=self.freeze_ratio,
                           temperature=self.temperature, scores=scores)
        return x.to(device=self.logits.device)

    def _hard_frozen(self, logits: torch.Tensor) -> frozenset[str]:
        """The names ``hard_mask("topk")`` would freeze for these logits."""
        return mask_rules.topk_frozen(self.names, logits, self._sizes, self.freeze_ratio, self.budget_by)

    def _track_mask_movement(self) -> None:
        # How far the data has moved the hard mask away from the random start. With the
        # authors' c_sparsity and temperature, a small model's budget term can saturate every
        # logit in the first releaser step while keeping their initial order: the "learned"
        # mask is then the random initial ranking (see benchmarks/RESULTS.md, demo calibration).
        if self._initial_frozen is None:
            self._initial_frozen = self._hard_frozen(self._initial)
        self._mask_moved, self._frozen_moved, self._frozen_moved_share = mask_rules.movement(
            self._initial_frozen, self._hard_frozen(self.logits), self._sizes, self.budget_by)

    # the two kinds of step ----------------------------------------------------------------------
    def next_kind(self) -> str:
        """"releaser" or "user": the kind of the next ``step``.

        The schedule repeats ``signal_batches`` releaser batches (the last one steps the logits)
        followed by ``user_interval - 1`` user batches: with one signal batch, the authors' "a
        releaser step every ``user_interval``-th batch".
        """
        period = self.signal_batches + self.user_interval - 1
        return "releaser" if self.step_count % period < self.signal_batches else "user"

    def step(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """One releaser or user step on ``batch``, by the schedule; returns its log entry.

        The entry has: step, kind, loss (the objective differentiated), target_loss and
        innocent_loss (batch means, None for an empty group), n_target, n_innocent,
        frozen_ratio (share frozen by rounding the soft mask, as the reference reports) and
        soft_ratio (the budget's mean m), both by ``budget_by``; mask_moved (how many tensors the
        hard mask now treats differently from the initial logits' hard mask: 0 means the data has
        not reordered anything yet), frozen_moved (how many of the initially frozen tensors the
        hard mask no longer freezes), frozen_moved_share (their share of the initially frozen set,
        counted by ``budget_by``: tensors or parameters), live (logits with m (1 - m) > 0.01,
        which can still move); on releaser steps, updated (whether this batch ended an accumulation and stepped the
        logits) and data_to_budget (median size of the logits' data step over that of their
        budget step; None on user steps, before the step, and with the projected budget).
        """
        k, kind = self.step_count, self.next_kind()
        flags = checks.check_targets(batch)
        for p in self._params:
            p.grad = None
        losses = checks.check_losses(self.loss_fn(self.model, batch), k)
        if losses.numel() != flags.numel():
            raise ValueError(f"step {k}: loss_fn returned {losses.numel()} losses for a batch whose "
                             f"'is_target' has {flags.numel()} entries")
        t = flags.to(device=losses.device, dtype=losses.dtype)
        n_t, n_i = t.sum(), (1.0 - t).sum()
        sum_t, sum_i = (losses * t).sum(), (losses * (1.0 - t)).sum()
        mean_t, mean_i = sum_t / n_t.clamp(min=1.0), sum_i / n_i.clamp(min=1.0)
        objective = (self.innocent_weight * mean_i - mean_t) / 2.0 if kind == "releaser" else losses.mean()
        bad_losses = (~torch.isfinite(losses.detach())).sum()
        stats = torch.stack([sum_t.detach(), n_t, sum_i.detach(), n_i, objective.detach(), bad_losses]).float()
        # the losses of the global batch: every rank sees a bad one anywhere
        s_t, c_t, s_i, c_i, obj, n_bad = distributed.loss_stats(stats).tolist()
        if self.check_finite and n_bad:
            checks.raise_non_finite(k, f"loss in the {kind} step")
        objective.backward()

        idx, theta, delta, grads = self._gradients()
        updated = False
        if kind == "releaser":
            updated = self._releaser_update(k, idx, theta, delta, grads)
        else:
            self._user_update(k, idx, theta, delta, grads)
        for p in self._params:
            p.grad = None

        m = soft_mask(self.logits, self.temperature)
        entry = {
            "step": k, "kind": kind, "loss": obj,
            "target_loss": s_t / c_t if c_t else None, "innocent_loss": s_i / c_i if c_i else None,
            "n_target": int(c_t), "n_innocent": int(c_i),
            "frozen_ratio": float((self._weights * (m > 0.5)).sum()),
            "soft_ratio": float((self._weights * m).sum()),
            "mask_moved": self._mask_moved, "frozen_moved": self._frozen_moved,
            "frozen_moved_share": self._frozen_moved_share,
            "live": int((m * (1.0 - m) > LIVE_LOGIT).sum()),
            "updated": updated if kind == "releaser" else None,
            "data_to_budget": self._data_to_budget if updated else None,
        }
        self.step_count += 1
        self.history.append(entry)
        return entry

    def _gradients(self):
        """(indices, theta, Delta, grads) of the tensors that received a gradient, all-reduced
        (under FSDP2: local shards of the gradients backward reduce-scattered and averaged)."""
        present, grads = distributed.gradients(self.model, self.names, self._params, self._sharding,
                                               check_layout=not self._grads_checked)
        self._grads_checked = True  # once: FSDP2 gives every gradient its parameter's layout
        theta = self._theta()
        if len(present) == len(self._params):
            return None, theta, self._delta, grads
        return present, [theta[i] for i in present], [self._delta[i] for i in present], grads

    def _releaser_update(self, k: int, idx, theta, delta, grads) -> bool:
        """Add this batch's s to the accumulator; on the last signal batch, step the logits.

        Returns whether the logits were stepped."""
        if not grads and self.signal_batches == 1:
            return False  # as the authors' loop: no gradient, no step (not even the budget's)
        if grads:
            # Under FSDP2 each rank's s covers its shards; completed here, and a non-finite
            # gradient on any rank makes s non-finite on every rank, so all stop alike below.
            s_part = distributed.complete_sums(ops.segment_dot(delta, grads, backend=self.backend), self._sharding)
            if self.check_finite and not bool(torch.isfinite(s_part).all()):
                bad = (~torch.isfinite(s_part)).nonzero().flatten().tolist()
                names = [self.names[idx[j] if idx else j] for j in bad]
                checks.raise_non_finite(k, "gradient in the releaser step", names)
            if idx is None:
                s = s_part
            else:  # tensors without a gradient have zero sensitivity
                s = torch.zeros_like(self.logits)
                s[torch.tensor(idx, device=s.device)] = s_part
            if self.signal_batches == 1:
                self._signal = s  # the authors' path, untouched (bit-for-bit with their loop)
            else:
                self._signal.add_(s)
        self._signal_count += 1
        if self._signal_count < self.signal_batches:
            return False
        s = self._signal if self.signal_batches == 1 else self._signal / self.signal_batches
        self._signal, self._signal_count = torch.zeros_like(self.logits), 0
        s = shaped_signal(s, self._weights, density=self.signal_density and self.budget_by != "tensors",
                          norm=self.signal_norm)
        new_logits, self._data_to_budget = releaser_logits(
            self.logits, s, weights=self._weights, ratio=self.freeze_ratio, temperature=self.temperature,
            mask_lr=self.mask_lr, c_sparsity=self.c_sparsity, projected=self.budget == "projected")
        dm = soft_mask(new_logits, self.temperature) - soft_mask(self.logits, self.temperature)
        ops.mask_shift_(self._theta(), self._delta, dm, backend=self.backend)
        self.logits.copy_(new_logits)
        self._track_mask_movement()
        return True

    def _user_update(self, k: int, idx, theta, delta, grads) -> None:
        if not grads:
            return
        if self.check_finite:
            # One fused op and one [S] result: sum g^2 per tensor is non-finite exactly when the
            # gradient holds an inf or a NaN (or its norm overflows fp32, as torch's norm would).
            # torch._foreach_norm gives the same answer but returns S scalar tensors, ~1 ms of
            # host time for 686 tensors.
            sq = ops.segment_dot(grads, grads, backend=self.backend)
            if self._sharding is not None:  # a non-finite shard anywhere stops every rank alike
                distributed.sum_(sq)
            if not bool(torch.isfinite(sq).all()):
                bad = (~torch.isfinite(sq)).nonzero().flatten().tolist()
                checks.raise_non_finite(k, "gradient in the user step",
                                        [self.names[idx[j] if idx else j] for j in bad])
        m = soft_mask(self.logits, self.temperature)
        if idx is not None:
            m = m[torch.tensor(idx, device=m.device)]
        if self.user_optimizer == "sgd":
            ops.user_update_(theta, delta, grads, m, self.user_lr, backend=self.backend)
            return
        self.user_steps += 1
        mu = self._exp_avg if idx is None else [self._exp_avg[i] for i in idx]
        nu = self._exp_avg_sq if idx is None else [self._exp_avg_sq[i] for i in idx]
        ops.user_adamw_(theta, delta, grads, mu, nu, m, self.user_steps, lr=self.user_lr, betas=self.user_betas,
                        eps=self.user_eps, weight_decay=self.user_weight_decay, backend=self.backend)

    # driving a whole run ------------------------------------------------------------------------
    def fit(self, batches: Iterable[Mapping[str, Any]], steps: int, *, progress: bool = True,
            desc: str = "learning mask", callback: Callable[[dict[str, Any]], None] | None = None
            ) -> list[dict[str, Any]]:
        """Run ``steps`` more steps over ``batches`` with a tqdm progress bar; returns their logs.

        A re-iterable ``batches`` (list, DataLoader) is cycled; a one-shot iterator that runs out
        raises. ``callback(entry)`` runs after each step (checkpointing, custom logging).

        Example:
            >>> # learner.fit(loader, steps=300)[-1]["frozen_ratio"]
        """
        return loop.fit(self, batches, steps, progress=progress, desc=desc, callback=callback)

    # results ----------------------------------------------------------------------------------
    def soft_mask(self) -> dict[str, float]:
        """Per-tensor m = sigmoid(x / T) in [0, 1], name-keyed (1 = frozen)."""
        return dict(zip(self.names, soft_mask(self.logits, self.temperature).tolist(), strict=True))

    def hard_mask(self, rule: str = "topk", *, method: str | None = None) -> FreezeMask:
        """A FreezeMask from the logits.

        ``rule="topk"`` (default) freezes the highest logits until the budget is met exactly
        (``FreezeMask.from_scores`` with ``budget_by``); ``"threshold"`` freezes every tensor with
        m > 0.5, as the authors' final ``np.round`` does (half rounds to even, i.e. to 0), which
        only approximates the budget ("round" is accepted as its former name; so is ``method=``).
        """
        rule = mask_rules.resolve_rule(rule if method is None else method)
        # Keys understood by FreezeMask.save: budget_by, target_ratio, learning (a JSON string).
        learning = dict(self.hparams(), steps=self.step_count, hard_mask=rule,
                        c_sparsity_auto=self.c_sparsity_auto, mask_moved=self._mask_moved,
                        frozen_moved=self._frozen_moved, frozen_moved_share=self._frozen_moved_share)
        return mask_rules.build(self.module, self.names, self.logits, rule, ratio=self.freeze_ratio,
                               budget_by=self.budget_by, temperature=self.temperature, learning=learning)

    # Settings that may change mid-run: step sizes and the schedule, not what is searched for.
    RETUNABLE = ("temperature", "c_sparsity", "mask_lr", "user_lr", "user_interval")

    def retune(self, **changes: Any) -> None:
        """Continue with new step sizes (``freezeguard learn --resume ... --override-hparams``).

        Only :attr:`RETUNABLE` settings change; the budget, the user, the seed and the signal
        define the search and stay as saved. ``c_sparsity="auto"`` is resolved from the current
        logits. The new values are validated by :class:`LearnerConfig` and saved with the state.

        Example:
            >>> learner.retune(mask_lr=5.0)          # doctest: +SKIP
        """
        fixed = sorted(set(changes) - set(self.RETUNABLE))
        if fixed:
            raise ValueError(f"{', '.join(fixed)} cannot change on a running learner (only {self.RETUNABLE})")
        self.config = self.config.replace(**changes)
        for name in changes:
            setattr(self, name, getattr(self.config, name))
        if "c_sparsity" in changes:
            self.c_sparsity_auto = self.config.c_sparsity == "auto"
            self.c_sparsity = (auto_c_sparsity(self.logits, self._weights, self.freeze_ratio, self.temperature)
                               if self.c_sparsity_auto else float(self.config.c_sparsity))

    def hparams(self) -> dict[str, Any]:
        """The LearnerConfig as JSON, plus ``c_sparsity_resolved``: the c in use ("auto" resolved)."""
        return dict(self.config.to_json(), c_sparsity_resolved=self.c_sparsity)

    # save / resume ----------------------------------------------------------------------------
    def _moments(self) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(name, parameter, exp_avg, exp_avg_sq) of the AdamW user; none for SGD."""
        if not self._exp_avg:
            return []
        return list(zip(self.names, self._params, self._exp_avg, self._exp_avg_sq, strict=True))

    def save(self, path: str) -> None:
        """Write the learner's full state (logits, live weights, Delta, user optimizer state,
        counters, hyperparameters) to a safetensors file; ``MaskLearner.load`` resumes it and
        continues exactly as if never stopped. Only rank 0 writes under torch.distributed.

        Under FSDP2 every rank must call it: the shards are gathered one tensor at a time (to the
        CPU) and rank 0 writes the file one process would write, loadable at any world size."""
        state_io.save_learner(self, path)

    @classmethod
    def load(cls, path: str, model: torch.nn.Module, loss_fn: LossFn, *, config: LearnerConfig | None = None,
             backend: str = "auto", check_finite: bool = True) -> "MaskLearner":
        """Resume a learner saved with ``save`` on ``model`` (same parameter names and shapes).

        With ``config``, it must equal the saved LearnerConfig: a differing field is an error
        naming both values (a resumed run continues under the settings it started with).

        Example:
            >>> # learner = fg.MaskLearner.load("learner.safetensors", unet, loss_fn); learner.fit(loader, 100)
        """
        saved = state_io.read_learner(path, config)
        self = cls.__new__(cls)
        self._configure(model, loss_fn, backend=backend, check_finite=check_finite, config=saved.config)
        state_io.restore_(self, path, saved)
        return self


__all__ = ["MaskLearner", "LearnerConfig", "USER_OPTIMIZERS", "HARD_MASK_RULES", "HARD_MASK_METHODS", "BUDGETS",
           "SIGNAL_NORMS", "INITS"]
