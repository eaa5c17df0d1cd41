"""MaskLearner: the publisher's bilevel search for the tensors to freeze (FreezeAsGuard).

The math is docs/DESIGN.md section 4, after the authors' ``src/mask_learner.py``. Per tensor i:
logits x_i, soft mask m_i = sigmoid(x_i / T) (1 = frozen at the released weights), Delta_i =
theta_pre,i - theta_ft,i, and the model's own parameters hold the live weights
theta_i = theta_ft,i + m_i Delta_i. Batches alternate on a fixed schedule:

- releaser step (batch k with k % user_interval == 0): g = grad of
  L = (w mean loss on innocent samples - mean loss on target samples) / 2 (w = innocent_weight,
  the authors' 1; ``apps.learn.objective``); s = <Delta, g> per tensor (``ops.segment_dot``);
  the logits take one gradient step on L plus the budget penalty c (rho - mean m)^2 (one
  vectorized expression over [S], ``apps.learn.logits``); the live weights follow the mask
  change (``ops.mask_shift_``).
- user step (all other batches): the simulated attacker fine-tunes the unfrozen share of every
  tensor on the mean loss: SGD (``ops.user_update_``, the reference) or AdamW
  (``ops.user_adamw_``).

Beyond the authors' loop (each off unless chosen; their meanings are on ``LearnerConfig``):
``c_sparsity="auto"`` (the default; ``apps.learn.budget``), ``budget="projected"``,
``signal_batches``, ``signal_norm``, ``signal_density`` and ``init`` (``apps.learn.reference_masks``).
With the authors' settings (explicit c, penalty, one signal batch, uniform init) the fused learner
matches their loop step for step (tests/test_learner_reference.py).

Every update is a whole-model op: no Python loop over tensors in the hot path.

Memory: the live weights, Delta and a gradient per parameter (3b; the AdamW user adds 2b), four
fp32 numbers per tensor (``apps.memory_model`` counts it). theta_pre and theta_ft are read once at
construction and not kept (drop your references to them to free that memory).

Distributed (DDP, accelerate, a plain model under a process group, or FSDP2's ``fully_shard``):
every rank applies the same updates and ends with the same logits, hard mask and history; under
FSDP2 the learner works on local shards and ``save`` is collective. How: ``apps.learn.distributed``.

Where the rest lives (one idea per module): the step's objective in ``apps.learn.objective``, the
logit update and initial logits in ``apps.learn.logits``, the budget's c and projection in
``apps.learn.budget``, the hard-mask rules and how far the mask moved in ``apps.learn.mask_rules``,
the input checks in ``apps.learn.checks``, the save / resume file in ``apps.learn.state_io``, the
run loop of ``fit`` in ``apps.learn.loop``, each step's log entry in ``apps.learn.step_log``, the
settings in ``apps.learn.config``; this module holds the learner's state and its two kinds of step.

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
)
from freezeguard.apps.learn.mask_rules import HARD_MASK_RULES
from freezeguard.apps.learn.objective import batch_objective
from freezeguard.apps.learn.step_log import step_entry
from freezeguard.core.group_norm_fix import protect_group_norms
from freezeguard.core.mask import FreezeMask

LossFn = Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor]

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
        self._initial = initial_logits(self.init, self.names, seed=self.seed, freeze_ratio=self.freeze_ratio,
                                       temperature=self.temperature, scores=scores).to(self.logits.device)
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
        named = distributed.searched_parameters(model)
        self.names = [n for n, _ in named]
        self._params = [p for _, p in named]
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
        self._initial = torch.zeros_like(self.logits)   # the initial logits (what "moved" is measured from)
        self._movement = mask_rules.MaskMovement(self.names, {n: p.numel() for n, p in named}, self.freeze_ratio,
                                                 self.budget_by)
        self._data_to_budget: float | None = None
        self._signal = torch.zeros_like(self.logits)   # s accumulated over the releaser batches so far
        self._signal_count = 0
        self._grads_checked = False

    def _theta(self) -> list[torch.Tensor]:
        # The live weights' storage (local shards under FSDP2), taken afresh each step.
        return distributed.live_weights(self._params, self._sharding)

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

        Its fields (losses, ratios, how far the mask moved, ...) are listed in ``apps.learn.step_log``.
        """
        k, kind = self.step_count, self.next_kind()
        flags = checks.check_targets(batch)
        for p in self._params:
            p.grad = None
        losses = checks.check_losses(self.loss_fn(self.model, batch), k)
        if losses.numel() != flags.numel():
            raise ValueError(f"step {k}: loss_fn returned {losses.numel()} losses for a batch whose "
                             f"'is_target' has {flags.numel()} entries")
        objective, stats = batch_objective(losses, flags, kind, innocent_weight=self.innocent_weight)
        # the losses of the global batch: every rank sees a bad one anywhere
        *sums, n_bad = distributed.loss_stats(stats).tolist()
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

        entry = step_entry(k, kind, sums, soft_mask(self.logits, self.temperature), self._weights,
                           self._movement.figures(), updated=updated, data_to_budget=self._data_to_budget)
        self.step_count += 1
        self.history.append(entry)
        return entry

    def _names_of(self, idx: list[int] | None) -> list[str]:
        """The names of the tensors in ``_gradients``' order (``idx``: None for all of them)."""
        return self.names if idx is None else [self.names[i] for i in idx]

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
            if self.check_finite:
                checks.check_finite_per_tensor(k, "gradient in the releaser step", s_part, self._names_of(idx))
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
        self._movement.update(self._initial, self.logits)
        return True

    def _user_update(self, k: int, idx, theta, delta, grads) -> None:
        if not grads:
            return
        if self.check_finite:
            # sum g^2 per tensor is non-finite exactly when g holds an inf or a NaN (or its norm
            # overflows fp32, as torch's would): one fused op, where torch._foreach_norm returns
            # S scalar tensors (~1 ms of host time for 686 tensors).
            sq = ops.segment_dot(grads, grads, backend=self.backend)
            if self._sharding is not None:  # a non-finite shard anywhere stops every rank alike
                distributed.sum_(sq)
            checks.check_finite_per_tensor(k, "gradient in the user step", sq, self._names_of(idx))
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
        only approximates the budget (``method=`` is accepted as the former name of ``rule=``; the
        rule's former name "round" raises a ValueError naming "threshold").
        """
        rule = mask_rules.check_rule(rule if method is None else method)
        # Keys understood by FreezeMask.save: budget_by, target_ratio, learning (a JSON string).
        learning = dict(self.hparams(), steps=self.step_count, hard_mask=rule,
                        c_sparsity_auto=self.c_sparsity_auto, **self._movement.figures())
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


__all__ = ["MaskLearner", "LearnerConfig", "USER_OPTIMIZERS", "HARD_MASK_RULES", "BUDGETS",
           "SIGNAL_NORMS"]
