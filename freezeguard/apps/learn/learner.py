"""MaskLearner: the publisher's bilevel search for the tensors to freeze (FreezeAsGuard).

The math is DESIGN.md section 4, after the authors' ``src/mask_learner.py``. Per tensor i:
logits x_i, soft mask m_i = sigmoid(x_i / T) (1 = frozen at the released weights), Delta_i =
theta_pre,i - theta_ft,i, and the model's own parameters hold the live weights
theta_i = theta_ft,i + m_i Delta_i. Batches alternate on a fixed schedule:

- releaser step (batch k with k % user_interval == 0): g = grad of
  L = (mean loss on innocent samples - mean loss on target samples) / 2; s = <Delta, g> per tensor
  (``ops.segment_dot``); the logits take one gradient step on L plus the budget penalty
  c (rho - mean m)^2 (one vectorized expression over [S], ``learning.logits``); the live weights
  follow the mask change (``ops.mask_shift_``).
- user step (all other batches): the simulated attacker fine-tunes the unfrozen share of every
  tensor on the mean loss: SGD (``ops.user_update_``, the reference) or AdamW
  (``learning.user_adamw``).

Every update is a whole-model op: no Python loop over tensors in the hot path.

Memory, per model parameter (b = bytes of the parameter dtype): the live weights (the model,
b), Delta (b) and the gradient autograd leaves during a step (b) -- 3b, the same as the
reference's finetuned model + difference model + gradients; the AdamW user adds its two moments
(2b). Per tensor: one fp32 logit and one fp32 budget weight. theta_pre and theta_ft are read once
at construction and not kept (drop your references to them to free that memory).

Empty groups: a releaser batch without target samples (or without innocent ones) drops that
term from L, as the reference does (its means divide by count + 1e-5, so an empty group
contributes 0). L is then only "keep innocent quality" (or only "hurt the target").

Distributed: wrap the model in DDP (or ``accelerator.prepare``) and backward averages the
gradients; a plain model under an initialized process group has them averaged here. Either
way all ranks apply the same updates and stay identical (logits start from rank 0's).

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

import json
import math
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch

from freezeguard import ops
from freezeguard.apps.learn import checks, distributed, state_io
from freezeguard.apps.learn.logits import BUDGET_BASES, budget_weights, logit_steps, soft_mask
from freezeguard.core.fingerprint import model_fingerprint
from freezeguard.core.mask import FreezeMask, select_budget
from freezeguard.ops.user_adamw import user_adamw_update_

LossFn = Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor]
USER_OPTIMIZERS = ("sgd", "adamw")
HARD_MASK_METHODS = ("topk", "round")

# Hyperparameters saved with the state (and restored by ``MaskLearner.load``).
_HPARAMS = ("freeze_ratio", "temperature", "c_sparsity", "mask_lr", "user_lr", "user_interval", "budget_by",
            "user_optimizer", "user_betas", "user_eps", "user_weight_decay", "seed")


class MaskLearner:
    """Learn per-tensor freeze logits by alternating releaser and simulated-user steps.

    Args:
        model: the model whose parameters become the live weights (plain, DDP- or
            accelerate-wrapped). Its current weights are overwritten.
        pretrained_state, finetuned_state: name -> tensor maps (``state_dict()``s) of the released
            weights and of the publisher's own fine-tune on target + innocent data.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]`` per-sample losses; ``batch`` is passed
            untouched and must carry ``batch["is_target"]`` (bool [B]).
        freeze_ratio: budget rho in [0, 1], by tensor count or parameter count (``budget_by``).
        temperature, c_sparsity, mask_lr, user_lr, user_interval: the reference's T, c, eta_m,
            eta_u and releaser period (defaults from the authors' scripts).
        user_optimizer: "sgd" (the reference) or "adamw" (a stronger simulated user; its
            ``user_betas``, ``user_eps``, ``user_weight_decay`` as in torch.optim.AdamW).
        seed: seeds the logits' U[0, 1) initialisation (everything starts frozen, m > 0.5).
        backend: backend of the fused ops ("auto", "torch", "cpp", "triton", "cuda").
        check_finite: stop with an error naming the step (and tensors) on a non-finite loss or
            gradient, before anything is updated. Costs one extra read of the gradients on user
            steps (releaser steps get it free from the segmented dot products).

    See the module docstring for the math, the memory it takes and an example.
    """

    def __init__(self, model: torch.nn.Module, pretrained_state: Mapping[str, torch.Tensor],
                 finetuned_state: Mapping[str, torch.Tensor], loss_fn: LossFn, *, freeze_ratio: float = 0.2,
                 temperature: float = 0.2, c_sparsity: float = 5e3, mask_lr: float = 10.0, user_lr: float = 1e-5,
                 user_interval: int = 5, budget_by: str = "tensors", user_optimizer: str = "sgd",
                 user_betas: tuple[float, float] = (0.9, 0.999), user_eps: float = 1e-8,
                 user_weight_decay: float = 1e-2, seed: int = 0, backend: str = "auto",
                 check_finite: bool = True):
        self._configure(model, loss_fn, backend=backend, check_finite=check_finite, hparams=dict(
            freeze_ratio=freeze_ratio, temperature=temperature, c_sparsity=c_sparsity, mask_lr=mask_lr,
            user_lr=user_lr, user_interval=user_interval, budget_by=budget_by, user_optimizer=user_optimizer,
            user_betas=user_betas, user_eps=user_eps, user_weight_decay=user_weight_decay, seed=seed))
        buffers = frozenset(n for n, _ in self.module.named_buffers())
        checks.check_states(dict(zip(self.names, self._params, strict=True)), pretrained_state, finetuned_state, buffers)
        self.logits.copy_(self._initial_logits())
        distributed.broadcast_(self.logits)
        with torch.no_grad():
            for name, p, d in zip(self.names, self._params, self._delta, strict=True):
                pre = pretrained_state[name].to(device=p.device, dtype=torch.float32)
                ft = finetuned_state[name].to(device=p.device, dtype=torch.float32)
                d.copy_(pre - ft)
                p.copy_(ft)
        ops.mask_shift_(self._theta(), self._delta, soft_mask(self.logits, self.temperature), backend=self.backend)

    # construction -----------------------------------------------------------------------------
    def _configure(self, model: torch.nn.Module, loss_fn: LossFn, *, backend: str, check_finite: bool,
                   hparams: Mapping[str, Any]) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> per-sample losses [B]")
        self.freeze_ratio = checks.check_ratio(hparams["freeze_ratio"])
        self.temperature = checks.check_positive("temperature", hparams["temperature"])
        self.c_sparsity = checks.check_positive("c_sparsity", hparams["c_sparsity"], allow_zero=True)
        self.mask_lr = checks.check_positive("mask_lr", hparams["mask_lr"], allow_zero=True)
        self.user_lr = checks.check_positive("user_lr", hparams["user_lr"], allow_zero=True)
        self.user_interval = int(hparams["user_interval"])
        if self.user_interval < 1 or self.user_interval != hparams["user_interval"]:
            raise ValueError(f"user_interval must be an integer >= 1, got {hparams['user_interval']!r}")
        if hparams["budget_by"] not in BUDGET_BASES:
            raise ValueError(f"budget_by must be one of {BUDGET_BASES}, got {hparams['budget_by']!r}")
        if hparams["user_optimizer"] not in USER_OPTIMIZERS:
            raise ValueError(f"user_optimizer must be one of {USER_OPTIMIZERS}, got {hparams['user_optimizer']!r}")
        self.budget_by, self.user_optimizer = hparams["budget_by"], hparams["user_optimizer"]
        b1, b2 = (float(b) for b in hparams["user_betas"])
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"user_betas must be in [0, 1), got {(b1, b2)}")
        self.user_betas = (b1, b2)
        self.user_eps = checks.check_positive("user_eps", hparams["user_eps"], allow_zero=True)
        self.user_weight_decay = checks.check_positive("user_weight_decay", hparams["user_weight_decay"],
                                                       allow_zero=True)
        self.seed = int(hparams["seed"])
        self.model, self.loss_fn, self.backend, self.check_finite = model, loss_fn, backend, bool(check_finite)

        self.module = distributed.unwrap(model)
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
        devices = {p.device for p in self._params}
        if len(devices) != 1:
            raise ValueError(f"the model's parameters span several devices {sorted(map(str, devices))}; "
                             "the fused ops need them on one")
        device = self._params[0].device
        self.logits = torch.zeros(len(self.names), dtype=torch.float32, device=device)
        self._weights = budget_weights([p.numel() for p in self._params], self.budget_by, device)
        self._delta = [torch.empty_like(p, memory_format=torch.contiguous_format).detach() for p in self._params]
        self._exp_avg: list[torch.Tensor] = []
        self._exp_avg_sq: list[torch.Tensor] = []
        if self.user_optimizer == "adamw":
            self._exp_avg = [torch.zeros_like(d) for d in self._delta]
            self._exp_avg_sq = [torch.zeros_like(d) for d in self._delta]
        self.step_count = 0
        self.user_steps = 0
        self.history: list[dict[str, Any]] = []
        self._sizes = {n: p.numel() for n, p in named}
        self._initial_frozen: frozenset[str] | None = None  # the hard mask of the initial logits
        self._mask_moved = 0
        self._data_to_budget: float | None = None

    def _theta(self) -> list[torch.Tensor]:
        # Detached aliases of the parameters: the ops write the live weights in place.
        return [p.detach() for p in self._params]

    def _initial_logits(self) -> torch.Tensor:
        """The seeded U[0, 1) initial logits (as the authors initialise them), on the CPU."""
        gen = torch.Generator().manual_seed(int(self.seed))
        return torch.rand(len(self.names), generator=gen)

    def _hard_frozen(self, logits: torch.Tensor) -> frozenset[str]:
        """The names ``hard_mask("topk")`` would freeze for these logits."""
        values = logits.tolist()
        order = sorted(range(len(values)), key=lambda i: (-values[i], self.names[i]))
        return frozenset(select_budget([self.names[i] for i in order], self._sizes, self.freeze_ratio,
                                       self.budget_by))

    def _track_mask_movement(self) -> None:
        # How far the data has moved the hard mask away from the random start. With the
        # authors' c_sparsity and temperature, a small model's budget term can saturate every
        # logit in the first releaser step while keeping their initial order: the "learned"
        # mask is then the random initial ranking (see benchmarks/RESULTS.md, demo calibration).
        if self._initial_frozen is None:
            self._initial_frozen = self._hard_frozen(self._initial_logits())
        self._mask_moved = len(self._hard_frozen(self.logits) ^ self._initial_frozen)

    # the two kinds of step ----------------------------------------------------------------------
    def next_kind(self) -> str:
        """"releaser" or "user": the kind of the next ``step``."""
        return "releaser" if self.step_count % self.user_interval == 0 else "user"

    def step(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """One releaser or user step on ``batch``, by the schedule; returns its log entry.

        The entry has: step, kind, loss (the objective differentiated), target_loss and
        innocent_loss (batch means, None for an empty group), n_target, n_innocent,
        frozen_ratio (share frozen by rounding the soft mask, as the reference reports) and
        soft_ratio (the budget's mean m), both by ``budget_by``; mask_moved (how many tensors the
        hard mask now treats differently from the initial random logits' hard mask: 0 means the
        data has not reordered anything yet) and, on releaser steps, data_to_budget (median size
        of the logits' data step over that of their budget step; None on user steps).
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
        objective = (mean_i - mean_t) / 2.0 if kind == "releaser" else losses.mean()
        if self.check_finite and not bool(torch.isfinite(losses.detach()).all()):
            checks.raise_non_finite(k, f"loss in the {kind} step")
        objective.backward()

        idx, theta, delta, grads = self._gradients()
        if kind == "releaser":
            self._releaser_update(k, idx, theta, delta, grads)
        else:
            self._user_update(k, idx, theta, delta, grads)
        for p in self._params:
            p.grad = None

        stats = torch.stack([sum_t.detach(), n_t, sum_i.detach(), n_i, objective.detach()]).float()
        if distributed.world_size() > 1:  # report losses over the global batch
            torch.distributed.all_reduce(stats)
            stats[4] /= distributed.world_size()
        s_t, c_t, s_i, c_i, obj = stats.tolist()
        m = soft_mask(self.logits, self.temperature)
        entry = {
            "step": k, "kind": kind, "loss": obj,
            "target_loss": s_t / c_t if c_t else None, "innocent_loss": s_i / c_i if c_i else None,
            "n_target": int(c_t), "n_innocent": int(c_i),
            "frozen_ratio": float((self._weights * (m > 0.5)).sum()),
            "soft_ratio": float((self._weights * m).sum()),
            "mask_moved": self._mask_moved,
            "data_to_budget": self._data_to_budget if kind == "releaser" else None,
        }
        self.step_count += 1
        self.history.append(entry)
        return entry

    def _gradients(self):
        """(indices, theta, Delta, grads) of the tensors that received a gradient, all-reduced."""
        world = distributed.world_size()
        if world > 1:
            # Every rank must reduce the same list: a tensor unused here may be used elsewhere.
            for p in self._params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        present = [i for i, p in enumerate(self._params) if p.grad is not None]
        grads = [self._params[i].grad for i in present]
        if world > 1 and not distributed.is_ddp(self.model):
            distributed.average_(grads)
        theta = self._theta()
        if len(present) == len(self._params):
            return None, theta, self._delta, grads
        return present, [theta[i] for i in present], [self._delta[i] for i in present], grads

    def _releaser_update(self, k: int, idx, theta, delta, grads) -> None:
        if not grads:
            return
        s_part = ops.segment_dot(delta, grads, backend=self.backend)
        if self.check_finite and not bool(torch.isfinite(s_part).all()):
            bad = (~torch.isfinite(s_part)).nonzero().flatten().tolist()
            names = [self.names[idx[j] if idx else j] for j in bad]
            checks.raise_non_finite(k, "gradient in the releaser step", names)
        if idx is None:
            s = s_part
        else:  # tensors without a gradient have zero sensitivity
            s = torch.zeros_like(self.logits)
            s[torch.tensor(idx, device=s.device)] = s_part
        data, budget = logit_steps(self.logits, s, weights=self._weights, ratio=self.freeze_ratio,
                                   temperature=self.temperature, c_sparsity=self.c_sparsity, mask_lr=self.mask_lr)
        new_logits = self.logits - data - budget
        budget_step = float(budget.abs().median())
        self._data_to_budget = float(data.abs().median()) / budget_step if budget_step > 0 else None
        dm = soft_mask(new_logits, self.temperature) - soft_mask(self.logits, self.temperature)
        ops.mask_shift_(self._theta(), self._delta, dm, backend=self.backend)
        self.logits.copy_(new_logits)
        self._track_mask_movement()

    def _user_update(self, k: int, idx, theta, delta, grads) -> None:
        if not grads:
            return
        if self.check_finite:
            norms = torch.stack(torch._foreach_norm(grads))
            if not bool(torch.isfinite(norms).all()):
                bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
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
        user_adamw_update_(theta, delta, grads, mu, nu, m, self.user_steps, lr=self.user_lr,
                           beta1=self.user_betas[0], beta2=self.user_betas[1], eps=self.user_eps,
                           weight_decay=self.user_weight_decay)

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
        from tqdm.auto import tqdm

        steps = int(steps)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        logs: list[dict[str, Any]] = []
        it = iter(batches)
        bar = tqdm(total=steps, desc=desc, disable=not progress or not distributed.is_main_process())
        try:
            while len(logs) < steps:
                try:
                    batch = next(it)
                except StopIteration:
                    if iter(batches) is batches:  # a one-shot iterator cannot be cycled
                        raise ValueError(f"batches ran out after {len(logs)} of {steps} steps; pass a "
                                         "re-iterable (list, DataLoader) or a longer iterator") from None
                    it = iter(batches)
                    try:
                        batch = next(it)
                    except StopIteration:
                        raise ValueError("batches is empty") from None
                entry = self.step(batch)
                logs.append(entry)
                if callback is not None:
                    callback(entry)
                bar.update(1)
                # "m>0.5": the share the soft mask rounds to frozen, not the hard (top-k) mask's budget
                bar.set_postfix(kind=entry["kind"][0], target=_fmt(entry["target_loss"]),
                                innocent=_fmt(entry["innocent_loss"]), **{"m>0.5": f"{entry['frozen_ratio']:.3f}"},
                                moved=entry["mask_moved"])
        finally:
            bar.close()
        if any(e["kind"] == "releaser" for e in logs) and self._mask_moved == 0:
            first = next((e["data_to_budget"] for e in self.history if e["data_to_budget"] is not None), None)
            balance = "" if first is None else f" (the first releaser step's data/budget ratio was {first:.2g})"
            warnings.warn(
                f"MaskLearner: after {self.step_count} steps the hard mask is still exactly the one of the "
                f"random initial logits: the data has not reordered any tensor{balance}. The budget penalty "
                "saturates the logits before the releaser gradient can act; lower c_sparsity or raise "
                "mask_lr (watch mask_moved and data_to_budget in the log).", stacklevel=2)
        return logs

    # results ----------------------------------------------------------------------------------
    def soft_mask(self) -> dict[str, float]:
        """Per-tensor m = sigmoid(x / T) in [0, 1], name-keyed (1 = frozen)."""
        return dict(zip(self.names, soft_mask(self.logits, self.temperature).tolist(), strict=True))

    def hard_mask(self, method: str = "topk") -> FreezeMask:
        """A FreezeMask from the logits.

        "topk" (default) freezes the highest logits until the budget is met exactly
        (``FreezeMask.from_scores`` with ``budget_by``); "round" freezes every tensor with m > 0.5,
        as the reference's final ``np.round`` does (half rounds to even, i.e. to 0), which only
        approximates the budget.
        """
        if method not in HARD_MASK_METHODS:
            raise ValueError(f"method must be one of {HARD_MASK_METHODS}, got {method!r}")
        if method == "topk":
            mask = FreezeMask.from_scores(self.module, dict(zip(self.names, self.logits.tolist(), strict=True)),
                                          self.freeze_ratio, by=self.budget_by)
        else:
            m = soft_mask(self.logits, self.temperature).tolist()
            mask = FreezeMask.from_names(self.module, [n for n, v in zip(self.names, m, strict=True) if v > 0.5])
        # Keys understood by FreezeMask.save: budget_by, target_ratio, learning (a JSON string).
        learning = dict(self.hparams(), steps=self.step_count, hard_mask=method)
        mask.metadata.update({"source": "mask_learner", "budget_by": self.budget_by,
                              "target_ratio": repr(self.freeze_ratio),
                              "learning": json.dumps(learning, sort_keys=True)})
        return mask

    def hparams(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in ((k, getattr(self, k)) for k in _HPARAMS)}

    # save / resume ----------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the learner's full state (logits, live weights, Delta, user optimizer state,
        counters, hyperparameters) to a safetensors file; ``MaskLearner.load`` resumes it and
        continues exactly as if never stopped. Only rank 0 writes under torch.distributed."""
        if not distributed.is_main_process():
            return
        tensors = {"logits": self.logits}
        for name, p, d in zip(self.names, self._params, self._delta, strict=True):
            tensors[f"theta/{name}"] = p.detach()
            tensors[f"delta/{name}"] = d
        # The user's moments exist only with user_optimizer="adamw" (empty lists for SGD).
        for name, mu, nu in zip(self.names if self._exp_avg else [], self._exp_avg, self._exp_avg_sq, strict=True):
            tensors[f"user_exp_avg/{name}"] = mu
            tensors[f"user_exp_avg_sq/{name}"] = nu
        meta = {"format": state_io.FORMAT, "step_count": str(self.step_count), "user_steps": str(self.user_steps),
                "hparams": json.dumps(self.hparams(), sort_keys=True), "names": json.dumps(self.names),
                "fingerprint": model_fingerprint(self.module)}
        state_io.write(path, tensors, meta)

    @classmethod
    def load(cls, path: str, model: torch.nn.Module, loss_fn: LossFn, *, backend: str = "auto",
             check_finite: bool = True) -> "MaskLearner":
        """Resume a learner saved with ``save`` on ``model`` (same parameter names and shapes).

        Example:
            >>> # learner = fg.MaskLearner.load("learner.safetensors", unet, loss_fn); learner.fit(loader, 100)
        """
        tensors, meta = state_io.read(path)
        try:
            hp = json.loads(meta["hparams"])
            names = json.loads(meta["names"])
            step_count, user_steps = int(meta["step_count"]), int(meta["user_steps"])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}: incomplete learner metadata ({exc})") from exc
        self = cls.__new__(cls)
        self._configure(model, loss_fn, backend=backend, check_finite=check_finite, hparams=hp)
        if names != self.names:
            missing = sorted(set(names) - set(self.names))
            extra = sorted(set(self.names) - set(names))
            order = "" if missing or extra else ", or another parameter order"
            raise ValueError(f"{path} was saved for a different model (missing from the model: {missing[:8]}, "
                             f"not in the file: {extra[:8]}{order})")
        expected = {"logits"} | {f"{k}/{n}" for k in ("theta", "delta") for n in names}
        if self.user_optimizer == "adamw":
            expected |= {f"{k}/{n}" for k in ("user_exp_avg", "user_exp_avg_sq") for n in names}
        if expected - tensors.keys():
            raise ValueError(f"{path} lacks tensors: {sorted(expected - tensors.keys())[:8]}")
        with torch.no_grad():
            for name, p, d in zip(self.names, self._params, self._delta, strict=True):
                for key, dst in ((f"theta/{name}", p), (f"delta/{name}", d)):
                    if tuple(tensors[key].shape) != tuple(dst.shape):
                        raise ValueError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, "
                                         f"the model's is {tuple(dst.shape)}")
                    dst.copy_(tensors[key])
            for name, mu, nu in zip(self.names if self._exp_avg else [], self._exp_avg, self._exp_avg_sq,
                                    strict=True):
                mu.copy_(tensors[f"user_exp_avg/{name}"])
                nu.copy_(tensors[f"user_exp_avg_sq/{name}"])
            if tensors["logits"].shape != self.logits.shape:
                raise ValueError(f"{path}: logits have shape {tuple(tensors['logits'].shape)}")
            self.logits.copy_(tensors["logits"])
        self.step_count, self.user_steps = step_count, user_steps
        self._track_mask_movement()  # the resumed log continues where the saved one stopped
        return self


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


__all__ = ["MaskLearner", "USER_OPTIMIZERS", "HARD_MASK_METHODS"]
