"""Erase a concept before release: the first step of FreezeAsGuard as its authors run it.

The authors' pipeline (pittisl/FreezeAsGuard, README "Mask Learning"): the publisher **erases** the
illegal concepts with UCE ("we consider the model after such erasing as the pretrained model we
want"), fine-tunes the erased model to **relearn** them plus innocent data (theta_ft), learns the
mask between the erased and the relearned model, and releases the erased weights with the mask;
the attacker relearns from the erased model under the mask. This module is the erase step:

- :func:`erase` runs one eraser on :class:`~freezeguard.apps.baselines.harness.BaselineInputs`:
  ``"uce"`` (the authors' eraser, a closed-form edit of the cross-attention K/V, localised by
  construction) or ``"ablation"`` (Concept Ablation, a fine-tune of the same projections on
  anchor images, not localised by construction);
- :func:`erase_toy` erases a class of the built-in toy world toward an anchor class;
- :func:`erase_pipeline` erases a prompt from a local diffusers SD pipeline and writes the erased
  release as a pipeline folder (safetensors, written to a temporary folder, fsynced, renamed), ready
  for ``freezeguard finetune`` (relearn), ``freezeguard learn`` and ``freezeguard evaluate``.

Example:
    >>> from freezeguard.integrations.diffusers import toy
    >>> from freezeguard.apps.erase import erase_toy
    >>> erased = erase_toy(toy.build_model(), eraser="uce", reference_lr=1e-3, reference_steps=10,
    ...                    sample_steps=2, n_anchor_images=2)
    >>> erased.eraser, len(erased.edited)        # to_k and to_v of every cross-attention block
    ('uce', 8)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from freezeguard.apps.baselines._common import Cost
from freezeguard.apps.baselines.harness import (
    BaselineInputs,
    _encode_prompt,
    build_baselines,
    pipeline_inputs,
    prompt_conditions,
    toy_inputs,
)
from freezeguard.integrations.diffusers import toy

ERASERS = ("uce", "ablation")


@dataclass
class Erased:
    """The erased release: its model, the eraser, the tensors it changed, its settings and cost.

    Example:
        >>> erased = erase(inputs, "uce")            # doctest: +SKIP
        >>> erased.edited[:1]                        # doctest: +SKIP
        ['down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight']
    """

    model: nn.Module
    eraser: str
    edited: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    cost: Cost | None = None


def changed_tensors(before: nn.Module, after: nn.Module) -> list[str]:
    """Names of the parameters that differ between two models of one architecture.

    Example:
        >>> a = torch.nn.Linear(2, 2); b = torch.nn.Linear(2, 2)
        >>> b.load_state_dict(a.state_dict()); _ = b.bias.data.add_(1)
        <All keys matched successfully>
        >>> changed_tensors(a, b)
        ['bias']
    """
    theirs = dict(after.named_parameters())
    return [n for n, p in before.named_parameters() if not torch.equal(p.detach(), theirs[n].detach())]


def erase(inputs: BaselineInputs, eraser: str = "uce", *, seed: int = 0, steps: int | None = None) -> Erased:
    """Erase ``inputs``' target concept toward its anchor with ``eraser`` ("uce" or "ablation").

    ``steps`` caps Concept Ablation's steps (default: the authors' 100); UCE has none.

    Example:
        >>> erased = erase(toy_inputs(model, reference_lr=1e-3, reference_steps=100), "uce")   # doctest: +SKIP
    """
    if eraser not in ERASERS:
        raise ValueError(f"unknown eraser {eraser!r}; choose from {', '.join(ERASERS)}")
    overrides = {"ablation": {"steps": steps}} if steps is not None and eraser == "ablation" else None
    prot = build_baselines([eraser], inputs, seed=seed, overrides=overrides)[eraser]
    return Erased(prot.model, eraser, changed_tensors(inputs.model, prot.model), config=prot.info.get("config", {}),
                  cost=prot.cost)


def erase_toy(model: nn.Module, *, eraser: str = "uce", target: Sequence[str] = toy.TARGET_CLASSES,
              innocent: Sequence[str] = toy.INNOCENT_CLASSES, anchor: str = "square", reference_lr: float = 1e-3,
              reference_steps: int = 100, batch_size: int = 16, sample_steps: int = 15, n_anchor_images: int = 64,
              config: toy.ToyModelConfig | None = None, steps: int | None = None, seed: int = 0,
              known: Sequence[str] | None = None) -> Erased:
    """Erase toy class(es) ``target`` from ``model`` toward ``anchor`` (a frame toward a square, the
    nearest class the model knows, as UCE maps a person onto "celebrity"). UCE preserves every other
    class; Concept Ablation distils on anchor images the model generates itself. ``known``: the classes
    the model was pretrained on, beside the demo's shapes (UCE preserves them all but the target).

    Example:
        >>> erase_toy(toy.build_model(), sample_steps=2, n_anchor_images=2).edited[0].endswith("to_k.weight")
        True
    """
    inputs = toy_inputs(model, reference_lr=reference_lr, reference_steps=reference_steps, batch_size=batch_size,
                        target=target, innocent=innocent, anchor=anchor, n_anchor_images=n_anchor_images,
                        sample_steps=sample_steps, seed=seed, config=config, known=known)
    return erase(inputs, eraser, seed=seed, steps=steps)


def erase_pipeline(src: str | os.PathLike, dst: str | os.PathLike, *, target_prompt: str, anchor_prompt: str,
                   preserve_prompts: Sequence[str] = (), eraser: str = "uce", anchor_data: str | None = None,
                   reference_lr: float = 1e-5, steps: int | None = None, resolution: int | None = None,
                   seed: int = 0, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Erase ``target_prompt`` from the SD pipeline folder ``src`` toward ``anchor_prompt`` and write the
    erased release to ``dst`` (the same pipeline, its UNet replaced; safetensors, atomic). Returns a
    summary: eraser, edited tensors, settings, seconds.

    UCE needs only the prompts (it preserves the empty prompt and ``preserve_prompts``). Concept
    Ablation also needs ``anchor_data``: an imagefolder of images its noised inputs are drawn from
    (``pipeline_inputs``' deviation: the authors generate anchor images with the model).

    Example:
        >>> erase_pipeline("models/sd15", "models/sd15-erased", target_prompt="a photo of Ann",
        ...                anchor_prompt="a photo of a person")                     # doctest: +SKIP
    """
    from freezeguard.apps.evaluate.imagefolder_domains import imagefolder_domains
    from freezeguard.integrations.diffusers.pipeline import load_components, save_pipeline_with_unet

    if eraser not in ERASERS:
        raise ValueError(f"unknown eraser {eraser!r}; choose from {', '.join(ERASERS)}")
    if eraser == "ablation" and not anchor_data:
        raise ValueError("Concept Ablation needs anchor images: give anchor_data (an imagefolder)")
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError(f"refusing to overwrite the released pipeline {src}; choose another output folder")
    comps = load_components(src).to(device)
    if comps.text_encoder is None or comps.tokenizer is None:
        raise ValueError(f"{src}: erasing a prompt needs the pipeline's text encoder and tokenizer "
                         "(SD-1.x/2.x layout: text_encoder/ and tokenizer/)")
    if eraser == "uce":
        t_cond, a_cond = prompt_conditions(comps, target_prompt, anchor_prompt)
        keep = [_encode_prompt(comps, p)[0] for p in ["", *preserve_prompts]]
        inputs = BaselineInputs(model=comps.unet, loss_fn=comps.loss_fn(), noise_scheduler=comps.noise_scheduler,
                                target_domain="target", target_conds=[t_cond], anchor_cond=a_cond,
                                preserve_conds=keep, mixed_batches=None, preserve_batches=None,
                                anchor_batches=None, protect_data=None, reference_lr=reference_lr,
                                reference_steps=steps or 100, device=device)
    else:
        domains = imagefolder_domains(comps, anchor_data, [], heldout=1, resolution=resolution, seed=seed)
        inputs = pipeline_inputs(comps, domains, reference_lr=reference_lr, reference_steps=steps or 100,
                                 batch_size=4, target_prompt=target_prompt, anchor_prompt=anchor_prompt,
                                 preserve_prompts=preserve_prompts, seed=seed)
    erased = erase(inputs, eraser, seed=seed, steps=steps)
    out = save_pipeline_with_unet(src, dst, erased.model.to("cpu"))
    return {"out": str(out), "eraser": eraser, "edited": erased.edited, "config": erased.config,
            "seconds": erased.cost.seconds if erased.cost is not None else None,
            "target_prompt": target_prompt, "anchor_prompt": anchor_prompt}


__all__ = ["ERASERS", "Erased", "changed_tensors", "erase", "erase_toy", "erase_pipeline"]
