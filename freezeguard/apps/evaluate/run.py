"""``run_evaluation``: the whole run behind ``freezeguard evaluate``, on the toy world or a local pipeline.

Set up the model, its loss and the domains (the demo's published toy model and judge, or a local
diffusers pipeline and image folders), load the mask onto the model, build the contenders (no
mask, random masks at the mask's ratio, the mask, the baselines), let every attacker fine-tune
under each, and write the report folder. The settings are one :class:`EvaluationSettings`; the
command line checks its arguments and builds them (``freezeguard.cli.evaluate.check_args``).

Example:
    >>> from freezeguard.apps.demo_config import DemoConfig
    >>> settings = EvaluationSettings(mask="mask.safetensors", attackers=attackers_for(1e-3, 100),
    ...                               lr=1e-3, steps=100, batch_size=16, random_seeds=1,
    ...                               toy_world=DemoConfig())                              # doctest: +SKIP
    >>> summary = run_evaluation(settings)                                                 # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from freezeguard.apps.baselines.harness import contenders, pipeline_inputs, toy_inputs
from freezeguard.apps.evaluate.harness import Attacker, attacker_suite, evaluate_masks, has_attention
from freezeguard.apps.evaluate.report import write_report
from freezeguard.core.mask import FreezeMask
from freezeguard.core.mask_files import FreezeMaskFileError
from freezeguard.integrations.diffusers.pipeline import PipelineError


class EvaluationInputError(ValueError):
    """The model, data or mask could not be set up (said before any fine-tune runs)."""


@dataclass(frozen=True)
class EvaluationSettings:
    """One evaluation: what is judged, on which model and data, against which attackers.

    Field names are ``freezeguard evaluate``'s options (``--innocent-data`` is ``innocent_data``),
    whose --help says what each means.
    """

    attackers: tuple[Attacker, ...]
    lr: float                      # the attackers' lr and steps: also the baselines' reference fine-tune
    steps: int
    batch_size: int
    random_seeds: int
    mask: str | None = None        # mask file; None with baselines only
    methods: tuple[str, ...] = ()  # baselines (apps.baselines.harness.resolve_methods)
    overrides: dict[str, Any] | None = None  # the baselines' step caps (step_overrides)
    pretrained: str | None = None  # None: the built-in toy model, as ``toy_world`` sets it up
    # Without ``pretrained``: the toy world's settings (an apps.demo_config.DemoConfig, which imports this
    # package: given by the caller, so the demo's published model, judge and domains are reused).
    toy_world: Any = None
    target_data: str | None = None
    innocent_data: tuple[str, ...] = ()
    heldout: int | None = None
    samples: int | None = None
    sample_steps: int | None = None
    resolution: int | None = None
    anchor: str = "square"
    target_prompt: str | None = None
    anchor_prompt: str | None = None
    preserve_prompt: tuple[str, ...] = ()
    budget_by: str = "tensors"
    attack_seeds: int = 1
    workers: int = 1
    seed: int = 0
    out: str | None = None         # report folder; None: no report
    cache_dir: str | None = None
    device: str | None = None


def attackers_for(lr: float, steps: int, *, strong: bool = True, lr_mult: float = 1.0, steps_mult: float = 1.0,
                  lora: bool = False) -> list[Attacker]:
    """The standard attacker, and with ``strong`` the stronger ones (and a rank-4 LoRA attacker with
    ``lora``: it faces the baselines; ``run_evaluation`` drops it for a model without attention)."""
    if not strong:
        return attacker_suite(lr, steps, lr_mult=1.0, steps_mult=1.0)
    return attacker_suite(lr, steps, lr_mult=lr_mult, steps_mult=steps_mult, lora_rank=4 if lora else None)


def _toy_setup(s: EvaluationSettings, progress: bool):
    """The demo's published model, judge and domains (its config, so the figures are comparable)."""
    from freezeguard.apps.evaluate.toy_domains import toy_domains
    from freezeguard.integrations.diffusers import judge, toy

    demo = s.toy_world
    if demo is None:
        raise EvaluationInputError("the toy model's evaluation needs toy_world (the demo's DemoConfig)")
    model = toy.pretrained_model(demo.pretrain, cache_dir=s.cache_dir, progress=progress)
    j = judge.train_judge(tuple(toy.ALL_CLASSES), steps=demo.judge_steps, seed=demo.seed, cache_dir=s.cache_dir,
                          progress=progress)
    domains = toy_domains(demo.target, demo.innocent, judge=j, batch_size=s.batch_size,
                          heldout_n=s.heldout or demo.heldout_n, sample_n=s.samples,
                          sample_steps=s.sample_steps, guidance=demo.guidance, seed=1000 + s.seed)
    return model, toy.make_loss_fn(demo.pretrain.model), domains


def _real_setup(s: EvaluationSettings, device, on_note: Callable[[str], None] | None):
    from freezeguard.apps.evaluate.imagefolder_domains import imagefolder_domains
    from freezeguard.integrations.diffusers import load_components

    comps = load_components(s.pretrained).to(device)
    if on_note is not None:
        on_note("CLIP score / FID skipped: they need local judge weights, which this build does not take; "
                "reporting held-out denoising loss and prompt gain.")
    domains = imagefolder_domains(comps, s.target_data, list(s.innocent_data), heldout=s.heldout or 4,
                                  batch_size=s.batch_size, resolution=s.resolution, seed=s.seed)
    return comps, domains


def _baseline_inputs(s: EvaluationSettings, model, comps, domains):
    if comps is None:
        return toy_inputs(model, reference_lr=s.lr, reference_steps=s.steps, batch_size=s.batch_size,
                          anchor=s.anchor, sample_steps=s.sample_steps, seed=s.seed)
    prompts = {"uce", "ablation"} & set(s.methods)
    return pipeline_inputs(comps, domains, reference_lr=s.lr, reference_steps=s.steps,
                           batch_size=s.batch_size, target_prompt=s.target_prompt if prompts else None,
                           anchor_prompt=s.anchor_prompt if prompts else None,
                           preserve_prompts=list(s.preserve_prompt), seed=s.seed)


def run_evaluation(s: EvaluationSettings, *, progress: bool = True,
                   on_note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns the summary (``report_dir`` added when a report was written).

    A model, data or mask that cannot be set up raises :class:`EvaluationInputError` before any
    fine-tune; ``on_note`` receives what the run leaves out (CLIP score / FID on a real pipeline).
    """
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    comps = None
    try:
        if s.pretrained:
            comps, domains = _real_setup(s, device, on_note)
            model, loss_fn = comps.unet, comps.loss_fn()
        else:
            model, loss_fn, domains = _toy_setup(s, progress)
            model.to(device)
        mask = FreezeMask.load(s.mask, model=model) if s.mask else None
        inputs = _baseline_inputs(s, model, comps, domains) if s.methods else None
    except (PipelineError, FreezeMaskFileError, ValueError) as exc:
        raise EvaluationInputError(str(exc)) from None
    attackers = list(s.attackers)
    if not has_attention(model):  # LoRA adapts attention projections: no attention, no LoRA attacker
        attackers = [a for a in attackers if a.lora_rank is None]
    torch.manual_seed(s.seed)
    # full, random masks at the mask's ratio, the mask, the baselines (and IMMA + the mask)
    masks = contenders(model, list(s.methods), inputs, mask=mask, random_seeds=s.random_seeds,
                       budget_by=s.budget_by, seed=s.seed, overrides=s.overrides, progress=progress)
    result = evaluate_masks(model, masks, domains, loss_fn, attackers, seed=s.seed,
                            attack_seeds=s.attack_seeds, progress=progress, workers=s.workers)
    summary = result.summary()
    if s.out:
        summary["report_dir"] = str(write_report(result, summary, s.out))
    return summary


__all__ = ["EvaluationSettings", "EvaluationInputError", "attackers_for", "run_evaluation"]
