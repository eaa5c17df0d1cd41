"""Diffusers integration: per-sample loss, imagefolder datasets, local pipelines, tiny fixtures.

Example:
    >>> from freezeguard.integrations.diffusers import load_components, make_loss_fn          # doctest: +SKIP
    >>> comps = load_components("models/sd15")                                    # doctest: +SKIP
    >>> loss_fn = make_loss_fn(comps.noise_scheduler, vae=comps.vae, text_encoder=comps.text_encoder)  # doctest: +SKIP
"""
from __future__ import annotations

from freezeguard.integrations.diffusers.data import DatasetError, ImageFolderDataset, collate, mixed_batches
from freezeguard.integrations.diffusers.loss import make_loss_fn
from freezeguard.integrations.diffusers.pipeline import (
           PipelineError,
           SDComponents,
           load_components,
           save_pipeline_with_unet,
           save_unet,
)

__all__ = ["make_loss_fn", "ImageFolderDataset", "mixed_batches", "collate", "DatasetError",
           "load_components", "save_unet", "save_pipeline_with_unet", "SDComponents", "PipelineError"]
