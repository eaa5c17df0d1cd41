"""Baselines FreezeAsGuard is compared with: IMMA, Concept Ablation, UCE (model side), UDP (data side).

Each takes what :class:`freezeguard.MaskLearner` takes -- the model, data streams or text
conditions, and a per-sample ``loss_fn(model, batch) -> Tensor[B]`` with ``batch["is_target"]`` --
and returns the protected model (:func:`imma`, :func:`concept_ablation`, :func:`uce_edit`) or the
protected data (:func:`udp`), with the papers' defaults scaled to the model at hand; every
module's docstring lists its hyperparameters and their source.

Example:
    >>> from freezeguard.integrations.diffusers import toy
    >>> from freezeguard.apps.baselines import uce_edit
    >>> edited = uce_edit(toy.build_model(), [toy.class_embedding("frame")],
    ...                   toy.class_embedding("square")).model
"""
from __future__ import annotations

from freezeguard.apps.baselines._common import Cost, add_lora, measure_cost, weight_change
from freezeguard.apps.baselines.ablation import AblationResult, concept_ablation, prediction_gap
from freezeguard.apps.baselines.harness import METHODS, BaselineInputs, Protection, build_baselines, contenders
from freezeguard.apps.baselines.imma import IMMAResult, imma
from freezeguard.apps.baselines.uce import UCEResult, uce_edit, uce_objective
from freezeguard.apps.baselines.udp import UDPResult, finite_stream, udp

__all__ = ["METHODS", "Protection", "BaselineInputs", "build_baselines", "contenders", "imma", "IMMAResult", "concept_ablation", "AblationResult", "prediction_gap", "uce_edit",
           "UCEResult", "uce_objective", "udp", "UDPResult", "finite_stream", "Cost", "measure_cost",
           "weight_change", "add_lora"]
