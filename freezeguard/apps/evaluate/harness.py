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

The attackers are ``apps.evaluate.attackers`` (re-exported here); the fine-tunes run one after
another or in forked workers (``apps.evaluate.workers``); the summary is ``apps.evaluate.metrics``.
:func:`evaluate_masks` reads as its steps: check the request, resolve the contenders, measure
before any attack, plan the fine-tunes, run them, assemble the runs.

Example:
    >>> import freezeguard as fg
    >>> from freezeguard.apps.evaluate.harness import Attacker
    >>> result = fg.evaluate.evaluate_masks(model, {"full": None, "learned": mask},  # doctest: +SKIP
    ...                                     domains, loss_fn, [Attacker("user", lr=1e-3, steps=100)])
    >>> result.summary()["table"]["user"]["learned"]["mitigation"]      # doctest: +SKIP
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from freezeguard.apps.baselines.harness import Protection
from freezeguard.apps.evaluate.attackers import (  # noqa: F401  (Attacker, attacker_suite, has_attention re-exported)
    Attacker,
    attacker_optimizer,
    attacker_suite,
    has_attention,
)
from freezeguard.apps.evaluate.channel_masks import ChannelMask
from freezeguard.apps.evaluate.metrics import METRIC_SIGN, mask_group, summarize  # noqa: F401  (re-exported)
from freezeguard.apps.evaluate.workers import run_jobs
from freezeguard.core.mask import FreezeMask
from freezeguard.core.training import train_steps

ROLES = ("target", "innocent")
LossFn = Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor]


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


def attack_finetune(model: torch.nn.Module, mask: FreezeMask | ChannelMask | None, domain: Domain, loss_fn: LossFn,
             attacker: Attacker, *, seed: int = 0, curve_points: int = 5,
             train_batches: Callable[[int], Iterator[Mapping[str, Any]]] | None = None) -> list[tuple[int, float]]:
    """Fine-tune ``model`` in place on ``domain`` as ``attacker`` would; returns the held-out loss curve.

    The curve has ``curve_points`` + 1 points (step 0 included). The data stream and the
    training noise are seeded by ``seed`` alone, so every mask sees the same batches.
    ``train_batches`` replaces the domain's training stream (protected data, e.g. UDP's).
    """
    opt = attacker_optimizer(model, mask, attacker)
    every = max(1, attacker.steps // max(1, curve_points))
    curve = [(0, heldout_loss(model, loss_fn, domain.heldout))]
    if opt is None:                      # nothing the attacker may train: the model stays as released
        return curve + [(attacker.steps, curve[0][1])]

    def record(step: int, _losses: torch.Tensor, _batch: Mapping[str, Any]) -> None:
        if step % every == 0 or step == attacker.steps:
            curve.append((step, heldout_loss(model, loss_fn, domain.heldout)))

    train_steps(model, opt, (train_batches or domain.train_batches)(seed), loss_fn, attacker.steps,
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
    seed: int = 0   # the attack's seed (data order, noise); every mask's run at one seed shares it


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


def _describe(entry: FreezeMask | Protection | None) -> dict[str, Any]:
    """What the summary says about one contender: frozen ratios, kind, cost, weight drift."""
    mask = entry.mask if isinstance(entry, Protection) else entry
    out: dict[str, Any] = ({"ratio_tensors": 0.0, "ratio_params": 0.0} if mask is None else
                           {"ratio_tensors": mask.ratio("tensors"), "ratio_params": mask.ratio("params")})
    if isinstance(entry, Protection):
        out["kind"] = entry.kind + ("+mask" if mask is not None else "")
        if entry.cost is not None:
            out["cost"] = entry.cost.to_json()
        if entry.weight_change is not None:
            out["weight_change"] = entry.weight_change
        out["info"] = entry.info
    else:
        out["kind"] = "full" if mask is None else getattr(mask, "kind", "mask")
    return out


Job = tuple[int, int, str, int]   # (attack seed, attacker index, contender, domain index)
# contender -> (released model, mask, per-domain training streams)
Contenders = dict[str, tuple[torch.nn.Module, "FreezeMask | None", Mapping[str, Any]]]


def evaluate_masks(model: torch.nn.Module, masks: Mapping[str, Any], domains: Sequence[Domain],
                   loss_fn: LossFn, attackers: Sequence[Attacker], *, seed: int = 0, attack_seeds: int = 1,
                   curve_points: int = 5, progress: bool = True, workers: int = 1,
                   primary_metric: str | None = None) -> EvalResult:
    """Fine-tune a copy of ``model`` for every attacker x contender x domain and measure each.

    ``masks`` maps a display name to a mask (``None`` = full fine-tuning, required under the
    name "full" as the reference) or to a :class:`freezeguard.apps.baselines.harness.Protection` (another
    released model, protected training data, a mask on top). Random masks named ``random#0``,
    ``random#1``... are averaged as one group "random" in the summary. Every run is measured
    against the released ``model`` before any attack, so a contender whose released weights
    already score lower (an erased concept) only gets credit for what the attack does not regain;
    its own pre-attack figures are kept as ``masks[name]["released"]``.

    ``attack_seeds`` > 1 repeats every fine-tune under that many draws of the attack's
    randomness (seeds ``seed``, ``seed + 1``, ...: data order and noise, shared by every contender
    at one seed, the full fine-tune included). The summary scores each run against the full
    fine-tune of its own seed and averages each contender over the seeds: one draw can move every
    figure by more than the gap between masks (benchmarks/RESULTS.md, "The learned mask must be learned").

    ``workers`` > 1 runs the fine-tunes in that many forked processes (CPU, POSIX; one torch
    thread each, ``apps.evaluate.workers``): every fine-tune is seeded on its own, so the figures
    are those of ``workers=1``, in less wall time on a multi-core machine (the tiny demo model's
    ops are too small to share one fine-tune across cores). Call it with one torch thread: a
    process that forks after OpenMP started its thread pool can hang.

    ``primary_metric``: the metric of the summary's mitigation and learned/random (default:
    recognisability when every domain measures it, else loss). Checked against the metrics every
    domain measures before any fine-tune runs.

    Example:
        >>> result = evaluate_masks(model, {"full": None, "random#0": rnd, "learned": learned},
        ...                         domains, loss_fn, [Attacker("user", 1e-3, 100)])  # doctest: +SKIP
    """
    _check_request(masks, domains, attackers, workers, attack_seeds)
    seeds = [seed + k for k in range(attack_seeds)]
    contenders = _contenders(model, masks, domains)
    # the reference first: runs that equal it (same weights, no mask, same data) are copied from it
    order = ["full"] + [n for n in masks if n != "full"]
    result = EvalResult(attackers=list(attackers))
    result.masks = {name: _describe(masks[name]) for name in order}
    before = _measure_before_attacks(result, model, loss_fn, domains, contenders, order)
    result.primary_metric = _pick_primary_metric(before, primary_metric)
    jobs = [(s, ai, name, di) for s in seeds for ai in range(len(attackers)) for name in order
            for di, d in enumerate(domains) if not _is_copy(contenders, model, name, d)]
    state = (contenders, list(domains), loss_fn, list(attackers), curve_points)
    outcomes = _run_fine_tunes(jobs, state, workers, model, progress=progress, show_seed=len(seeds) > 1)
    result.runs = _assemble_runs(outcomes, contenders, model, before, domains, attackers, seeds, order)
    return result


def _check_request(masks: Mapping[str, Any], domains: Sequence[Domain], attackers: Sequence[Attacker],
                   workers: int, attack_seeds: int) -> None:
    if "full" not in masks or masks["full"] is not None:
        raise ValueError('masks must include "full": None (the full fine-tune is the reference)')
    if not domains or not any(d.role == "target" for d in domains):
        raise ValueError("evaluate_masks needs at least one target domain")
    if not attackers:
        raise ValueError("evaluate_masks needs at least one attacker")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if isinstance(attack_seeds, bool) or not isinstance(attack_seeds, int) or attack_seeds < 1:
        raise ValueError(f"attack_seeds must be an int >= 1, got {attack_seeds!r}")
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise ValueError(f"domain names must be unique, got {names}")
    lora = [a.name for a in attackers if a.lora_rank is not None]
    channels = [n for n, m in masks.items() if isinstance(m, ChannelMask)]
    if lora and channels:
        raise ValueError(f"output-channel masks ({', '.join(channels[:3])}) cannot face LoRA attackers "
                         f"({', '.join(lora)}): the LoRA update of a partly frozen tensor is not modelled")


def _contenders(model: torch.nn.Module, masks: Mapping[str, Any], domains: Sequence[Domain]) -> Contenders:
    """Each contender's released model, mask and protected training streams, checked."""
    names = {d.name for d in domains}
    out: Contenders = {}
    for name, entry in masks.items():
        if entry is None or isinstance(entry, (FreezeMask, ChannelMask)):
            out[name] = (model, entry, {})
        elif isinstance(entry, Protection):
            unknown = set(entry.train_batches) - names
            if unknown:
                raise ValueError(f"contender {name!r}: protected data for unknown domain(s) {sorted(unknown)}")
            out[name] = (entry.model if entry.model is not None else model, entry.mask, entry.train_batches)
        else:
            raise TypeError(f"contender {name!r}: expected a FreezeMask, a ChannelMask, None or a baselines Protection, "
                            f"got {type(entry).__name__}")
        if out[name][1] is not None:
            out[name][1].check_model(out[name][0])
    return out


def _measure_before_attacks(result: EvalResult, model: torch.nn.Module, loss_fn: LossFn, domains: Sequence[Domain],
                            contenders: Contenders, order: list[str]) -> dict[str, dict[str, Any]]:
    """The released ``model``'s figures per domain (what every run is measured against), kept with
    its samples and a few real images in ``result``; each contender's own released figures go to
    ``result.masks[name]["released"]``."""
    before = {}
    for d in domains:
        if isinstance(d.heldout.get("pixel_values"), torch.Tensor):
            result.real_images[d.name] = d.heldout["pixel_values"][:8].detach().cpu()
        before[d.name] = measure(model, loss_fn, d)
        if "_samples" in before[d.name]:
            result.before_samples[d.name] = before[d.name].pop("_samples")
    for name in order:
        released_model = contenders[name][0]
        # what each contender releases, before any attack (θ_pre itself for masks and data protection)
        rel = before if released_model is model else {d.name: measure(released_model, loss_fn, d) for d in domains}
        result.masks[name]["released"] = {d: {k: v for k, v in m.items() if k != "_samples"} for d, m in rel.items()}
    return before


def _pick_primary_metric(before: Mapping[str, Mapping[str, Any]], wanted: str | None) -> str:
    metrics = set.intersection(*(set(b) for b in before.values()))
    if wanted is not None and wanted not in metrics:
        raise ValueError(f"primary_metric {wanted!r} is not measured on every domain; measured: "
                         f"{', '.join(sorted(metrics))}")
    return wanted or ("recognisability" if "recognisability" in metrics else "loss")


def _is_copy(contenders: Contenders, model: torch.nn.Module, name: str, d: Domain) -> bool:
    """Whether ``name``'s run on ``d`` is the very same fine-tune as the reference's."""
    released_model, mask, streams = contenders[name]
    return name != "full" and released_model is model and mask is None and d.name not in streams


def _run_job(job: Job, state: tuple) -> tuple[dict[str, Any], list, Any]:
    """One fine-tune: (attack seed, attacker index, contender, domain index) -> (after metrics, loss
    curve, samples)."""
    contenders, domains, loss_fn, attackers, curve_points = state
    seed, ai, name, di = job
    released_model, mask, streams = contenders[name]
    d = domains[di]
    tuned = copy.deepcopy(released_model)
    curve = attack_finetune(tuned, mask, d, loss_fn, attackers[ai], seed=seed, curve_points=curve_points,
                     train_batches=streams.get(d.name))
    after = measure(tuned, loss_fn, d)
    return after, curve, after.pop("_samples", None)


def _run_fine_tunes(jobs: list[Job], state: tuple, workers: int, model: torch.nn.Module, *, progress: bool,
                    show_seed: bool) -> dict[Job, tuple[dict[str, Any], list, Any]]:
    """job -> its outcome, with a progress bar naming the fine-tune that just ended."""
    from tqdm.auto import tqdm

    _, domains, _, attackers, _ = state
    bar = tqdm(total=len(jobs), desc="evaluate (fine-tunes)", disable=not progress)

    def done_one(job: Job) -> None:
        bar.set_postfix_str(f"{attackers[job[1]].name}/{job[2]}/{domains[job[3]].name}"
                            + (f"/seed {job[0]}" if show_seed else ""))
        bar.update(1)

    on_cuda = any(p.is_cuda for p in model.parameters())
    outcomes = dict(zip(jobs, run_jobs(_run_job, jobs, state, workers, can_fork=not on_cuda, on_done=done_one),
                        strict=True))
    bar.close()
    return outcomes


def _assemble_runs(outcomes: Mapping[Job, tuple[dict[str, Any], list, Any]], contenders: Contenders,
                   model: torch.nn.Module, before: Mapping[str, dict[str, Any]], domains: Sequence[Domain],
                   attackers: Sequence[Attacker], seeds: list[int], order: list[str]) -> list[Run]:
    """Every run in the order seed x attacker x contender x domain; a run that is the reference's
    fine-tune is copied from it."""
    runs = []
    for s in seeds:
        for ai, attacker in enumerate(attackers):
            done: dict[str, Run] = {}
            for mask_name in order:
                for di, d in enumerate(domains):
                    if _is_copy(contenders, model, mask_name, d):
                        ref = done[d.name]  # the very same fine-tune as the reference's
                        run = Run(attacker.name, mask_name, d.name, d.role, ref.before, ref.after, ref.curve,
                                  ref.samples, seed=s)
                    else:
                        after, curve, samples = outcomes[(s, ai, mask_name, di)]
                        run = Run(attacker.name, mask_name, d.name, d.role, before[d.name], after, curve, samples,
                                  seed=s)
                    if mask_name == "full":
                        done[d.name] = run
                    runs.append(run)
    return runs
