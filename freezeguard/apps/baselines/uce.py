"""UCE: Unified Concept Editing (Gandikota et al., arXiv 2308.14761), a closed-form model edit.

For every cross-attention projection W (``to_v``, and ``to_k`` by default) UCE solves

    min_W  λ‖W − W₀‖² + e·Σ_i ‖W c_i − v_i*‖² + p·Σ_j ‖W c_j − W₀ c_j‖²

where c_i are the token embeddings of the concept to erase, v_i* = W₀ c_i^anchor what the
projection gave for the anchor ("guided") concept's tokens (the "replace" technique), and c_j the
token embeddings of concepts to preserve. Setting the gradient to zero gives the closed form

    W = (λW₀ + e·Σ v_i* c_iᵀ + p·Σ W₀c_j c_jᵀ) · (λI + e·Σ c_i c_iᵀ + p·Σ c_j c_jᵀ)⁻¹,

which this module computes with a linear solve in float64 (not an explicit inverse).

Defaults and their source (the FreezeAsGuard authors' comparison tool, pittisl/FreezeAsGuard
``uce_tool/train-scripts/train_erase.py`` + ``run.sh``, which follows UCE's reference code, paper
Sec. 3-4): λ = 0.5 (``lamb``), erase scale e = 1, preserve scale p = max(0.1, 1 / (1 + n_preserve))
(their retain list always holds the empty prompt besides the preserved concepts), keys edited
too (``with_to_k=True``), technique "replace". Token handling is the caller's: pass the rows of
the text encoder's output that carry the concept (UCE uses the tokens from the last word on).
λ is not rescaled to the model: it is a weight in units of ‖c‖², and the toy world's embeddings
(‖c‖² ≈ 32) are smaller than CLIP's, so λ regularises relatively more there; pass ``lamb``.

Example:
    >>> import torch
    >>> from freezeguard.integrations.diffusers import toy
    >>> from freezeguard.apps.baselines import uce_edit
    >>> model = toy.build_model()
    >>> res = uce_edit(model, [toy.class_embedding("frame")], toy.class_embedding("square"),
    ...                preserve_conds=[toy.class_embedding("disc")])
    >>> len(res.edited)        # to_k and to_v of each cross-attention block
    8
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from freezeguard.apps.baselines._common import check_condition, check_module, cross_attention_kv
from freezeguard.core.values import check_positive

TECHNIQUES = ("replace",)


@dataclass
class UCEResult:
    """The edited model, the names of the edited weights, and the edit's residuals.

    ``residual[name]`` = ‖W c_i − v_i*‖ / ‖v_i*‖ over the erased tokens after the edit (0 would be a
    perfect map of the target onto the anchor; λ and the preserve terms keep it above 0).

    Example:
        >>> res = uce_edit(model, [c_target], c_anchor)            # doctest: +SKIP
        >>> max(res.residual.values()) < 0.1                      # doctest: +SKIP
        True
    """

    model: nn.Module
    edited: list[str]
    residual: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def _stack(conds: Sequence[torch.Tensor], name: str, dim: int) -> list[torch.Tensor]:
    if isinstance(conds, torch.Tensor):
        conds = [conds]
    if not isinstance(conds, (list, tuple)):
        raise TypeError(f"uce_edit: {name} must be a tensor or a list of tensors, got {type(conds).__name__}")
    return [check_condition(c, f"{name}[{k}]", "uce_edit", dim) for k, c in enumerate(conds)]


def uce_edit(model: nn.Module, target_conds: Sequence[torch.Tensor] | torch.Tensor,
             anchor_conds: Sequence[torch.Tensor] | torch.Tensor,
             preserve_conds: Sequence[torch.Tensor] | torch.Tensor = (), *, lamb: float = 0.5,
             erase_scale: float = 1.0, preserve_scale: float | None = None, edit_keys: bool = True,
             technique: str = "replace", inplace: bool = False) -> UCEResult:
    """Erase the target concept(s) onto the anchor(s) in every cross-attention K/V projection.

    ``target_conds``: one [tokens, dim] embedding per concept to erase; ``anchor_conds``: one per
    target, or a single one for all, with the same number of tokens as its target (token i of the
    target maps to token i of the anchor); ``preserve_conds``: embeddings whose projections must
    not change. Returns a copy of ``model`` unless ``inplace``.

    Example:
        >>> res = uce_edit(model, [c_target], c_anchor, [c_keep])   # doctest: +SKIP
        >>> res.model                                              # the released, edited model  # doctest: +SKIP
    """
    check_module(model, "uce_edit")
    if technique not in TECHNIQUES:
        raise ValueError(f"uce_edit: technique must be one of {TECHNIQUES}, got {technique!r}")
    for value, name in ((lamb, "lamb"), (erase_scale, "erase_scale")):
        check_positive(value, name, "uce_edit")
    layers = cross_attention_kv(model, keys=edit_keys)
    if not layers:
        raise ValueError("uce_edit: the model has no cross-attention projections to edit "
                         "(UCE edits the text-facing to_k / to_v of attention blocks with is_cross_attention)")
    dim = layers[0][1].in_features
    targets = _stack(target_conds, "target_conds", dim)
    anchors = _stack(anchor_conds, "anchor_conds", dim)
    preserves = _stack(preserve_conds, "preserve_conds", dim) if len(preserve_conds) else []
    if not targets:
        raise ValueError("uce_edit: target_conds is empty; give at least one concept to erase")
    if len(anchors) == 1:
        anchors = anchors * len(targets)
    if len(anchors) != len(targets):
        raise ValueError(f"uce_edit: {len(anchors)} anchor conditions for {len(targets)} targets "
                         "(give one per target, or one for all)")
    for k, (t, a) in enumerate(zip(targets, anchors, strict=True)):
        if t.shape != a.shape:
            raise ValueError(f"uce_edit: target {k} has shape {tuple(t.shape)} but its anchor {tuple(a.shape)}; "
                             "token i of the target is mapped onto token i of the anchor")
    if preserve_scale is None:
        # The authors' retain list is [''] + preserved concepts; the empty prompt counts.
        preserve_scale = max(0.1, 1.0 / (1 + len(preserves)))
    check_positive(preserve_scale, "preserve_scale", "uce_edit", allow_zero=True)

    out = model if inplace else copy.deepcopy(model)
    layers = cross_attention_kv(out, keys=edit_keys)
    c_erase = torch.cat(targets).double()          # [N_e, D]
    c_anchor = torch.cat(anchors).double()         # [N_e, D]
    c_keep = torch.cat(preserves).double() if preserves else torch.zeros(0, dim, dtype=torch.float64)
    result = UCEResult(out, [], config={"lamb": lamb, "erase_scale": erase_scale, "preserve_scale": preserve_scale,
                                        "edit_keys": edit_keys, "technique": technique,
                                        "n_target_tokens": int(c_erase.shape[0]),
                                        "n_preserve_tokens": int(c_keep.shape[0])})
    eye = torch.eye(dim, dtype=torch.float64)
    with torch.no_grad():
        for name, layer in layers:
            if layer.bias is not None:
                raise ValueError(f"uce_edit: {name} has a bias; UCE's closed form is for bias-free projections")
            w0 = layer.weight.detach().double().cpu()          # [out, D]
            v_star = c_anchor @ w0.t()                          # [N_e, out]: W0 c_anchor per token
            lhs = lamb * w0 + erase_scale * v_star.t() @ c_erase + preserve_scale * (c_keep @ w0.t()).t() @ c_keep
            gram = lamb * eye + erase_scale * c_erase.t() @ c_erase + preserve_scale * c_keep.t() @ c_keep
            # W gram = lhs with gram symmetric positive definite (λ > 0): solve, don't invert.
            w_new = torch.linalg.solve(gram, lhs.t()).t()
            layer.weight.copy_(w_new.to(layer.weight.dtype))
            result.edited.append(f"{name}.weight")
            got = c_erase @ w_new.t()
            result.residual[f"{name}.weight"] = float((got - v_star).norm() / v_star.norm().clamp_min(1e-12))
    return result


def uce_objective(weight: torch.Tensor, w0: torch.Tensor, c_erase: torch.Tensor, v_star: torch.Tensor,
                  c_keep: torch.Tensor, lamb: float, erase_scale: float, preserve_scale: float) -> torch.Tensor:
    """UCE's least-squares objective for one projection (the closed form's minimiser), for checks.

    Example:
        >>> w0 = torch.eye(2)
        >>> float(uce_objective(w0, w0, torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0, 2), 0.5, 1, 0.1))
        0.0
    """
    return (lamb * (weight - w0).pow(2).sum() + erase_scale * (c_erase @ weight.t() - v_star).pow(2).sum()
            + preserve_scale * (c_keep @ weight.t() - c_keep @ w0.t()).pow(2).sum())
