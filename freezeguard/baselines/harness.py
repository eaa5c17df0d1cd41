"""Running the baselines for the evaluation harness: one :class:`Protection` per method, with its cost.

The harness (:func:`freezeguard.evaluate.evaluate_masks`) fine-tunes every contender with the
same attackers. A mask is one kind of contender; a :class:`Protection` is the general one: a
different released model (IMMA, Concept Ablation, UCE), protected training data for some domain
(UDP), a mask on top (a mask on an immunized model), and the publisher's cost of making it.

Example:
    >>> from freezeguard.baselines.harness import build_baselines, toy_inputs   # doctest: +SKIP
    >>> inputs = toy_inputs(model, reference_lr=1e-3, reference_steps=100)      # doctest: +SKIP
    >>> contenders = build_baselines(["uce", "ablation"], inputs)               # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ._common import Cost, LossFn, measure_cost, snapshot, weight_change

if TYPE_CHECKING:
    from ..mask import FreezeMask

Stream = Callable[[int], Iterator[Mapping[str, Any]]]


@dataclass
class Protection:
    """A contender that is not (only) a mask on the released model.

    ``model``: the weights the publisher releases instead (None: the evaluated model);
    ``mask``: enforced on top during every attack; ``train_batches``: domain name -> a stream
    that replaces that domain's training data (protected images); ``cost``: what producing it
    took; ``weight_change``: how far ``model`` moved from θ_pre (:func:`weight_change`).

    Example:
        >>> Protection(kind="model").kind
        'model'
    """

    kind: str
    model: nn.Module | None = None
    mask: "FreezeMask | None" = None
    train_batches: dict[str, Stream] = field(default_factory=dict)
    cost: Cost | None = None
    weight_change: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class BaselineInputs:
    """What the baselines take from an evaluation world (the same inputs the MaskLearner takes).

    ``mixed_batches(seed)``: target + innocent batches with ``is_target`` (IMMA);
    ``preserve_batches(seed)``: data the released model already knows (IMMA's prior preservation);
    ``anchor_batches(seed)``: images of the anchor concept (Concept Ablation);
    ``target_conds`` / ``anchor_cond`` / ``preserve_conds``: text conditions [tokens, dim] (UCE,
    Concept Ablation); ``protect_data()``: the N target samples a data owner protects, as one
    batch dict (UDP), used to replace domain ``target_domain``'s training stream;
    ``reference_lr`` / ``reference_steps``: the standard attacker's, to which every method's
    defaults are scaled.
    """

    model: nn.Module
    loss_fn: LossFn
    noise_scheduler: Any
    target_domain: str
    target_conds: list[torch.Tensor]
    anchor_cond: torch.Tensor
    preserve_conds: list[torch.Tensor]
    mixed_batches: Stream
    preserve_batches: Stream | None
    anchor_batches: Stream
    protect_data: Callable[[], dict[str, Any]]
    reference_lr: float
    reference_steps: int
    batch_size: int = 16
    device: str | torch.device = "cpu"


def resolve_methods(spec: str | Sequence[str]) -> list[str]:
    """``"all"`` or a comma-separated list / sequence of :data:`METHODS`, validated, in order.

    Example:
        >>> resolve_methods("uce, ablation")
        ['uce', 'ablation']
    """
    from . import METHODS

    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    if names == ["all"]:
        return list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown baselines {unknown or names}; choose from {', '.join(METHODS)} or 'all'")
    return list(dict.fromkeys(names))


def build_baselines(methods: Sequence[str], inputs: BaselineInputs, *, seed: int = 0,
                    overrides: Mapping[str, Mapping[str, Any]] | None = None,
                    progress: bool = False) -> dict[str, Protection]:
    """Run each method in ``methods`` on ``inputs``; returns name -> :class:`Protection` (with cost).

    ``overrides[method]`` replaces keyword arguments of that method's function. UDP adds a
    second contender, ``udp (clean pool)``: the same finite image pool without noise, so that the
    effect of the noise is told apart from the effect of training on fewer images.

    Example:
        >>> contenders = build_baselines(["uce"], inputs)           # doctest: +SKIP
        >>> contenders["uce"].weight_change["rel_l2"]              # doctest: +SKIP
    """
    from . import concept_ablation, imma, uce_edit, udp
    from .udp import finite_stream

    overrides = dict(overrides or {})
    pre = snapshot(inputs.model)
    out: dict[str, Protection] = {}
    for name in resolve_methods(list(methods)):
        kw = dict(overrides.get(name, {}))
        if progress:
            print(f"[freezeguard baselines] {name}", flush=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if name == "uce":
                with measure_cost(inputs.device) as cost:
                    res = uce_edit(inputs.model, inputs.target_conds, inputs.anchor_cond, inputs.preserve_conds, **kw)
                out[name] = Protection("model", res.model, cost=cost, info={"config": res.config,
                                                                            "edited": len(res.edited)})
            elif name == "ablation":
                kw = {"reference_lr": inputs.reference_lr, "seed": seed} | kw
                if len(inputs.target_conds) != 1:
                    raise ValueError("ablation: one target condition expected (ablate several targets one by one)")
                with measure_cost(inputs.device) as cost:
                    res = concept_ablation(inputs.model, inputs.noise_scheduler, inputs.target_conds[0],
                                           inputs.anchor_cond, inputs.anchor_batches(seed + 1), **kw)
                out[name] = Protection("model", res.model, cost=cost, info={"config": res.config,
                                                                            "final_loss": res.losses[-1]})
            elif name == "imma":
                # The harness's standard attacker is a full AdamW fine-tune: IMMA defends against
                # that adaptation (the authors immunize against the adaptation they expect).
                kw = {"reference_lr": inputs.reference_lr, "steps": inputs.reference_steps, "adaptation": "full",
                      "defended": "all", "seed": seed} | kw
                with measure_cost(inputs.device) as cost:
                    if inputs.preserve_batches is not None and "preserve_batches" not in kw:
                        kw["preserve_batches"] = inputs.preserve_batches(seed + 3)
                    res = imma(inputs.model, inputs.loss_fn, inputs.mixed_batches(seed + 2), **kw)
                outer = [h["target_loss"] for h in res.history if h["phase"] == "outer" and "target_loss" in h]
                out[name] = Protection("model", res.model, cost=cost, info={
                    "config": res.config, "outer_target_loss_first_last": (outer[:1] + outer[-1:]) if outer else []})
            elif name == "udp":
                data = inputs.protect_data()
                kw = {"reference_lr": inputs.reference_lr, "noise_scheduler": inputs.noise_scheduler,
                      "batch_size": inputs.batch_size, "seed": seed} | kw
                with measure_cost(inputs.device) as cost:
                    res = udp(inputs.model, inputs.loss_fn, data, **kw)
                protected, clean, bs = res.data, dict(data), inputs.batch_size
                out[name] = Protection("data", train_batches={
                    inputs.target_domain: lambda s, d=protected: finite_stream(d, bs, s)}, cost=cost,
                    info={"config": res.config, "linf": float(res.delta.abs().max()), "n_images": res.config["n_images"]})
                out["udp (clean pool)"] = Protection("data", train_batches={
                    inputs.target_domain: lambda s, d=clean: finite_stream(d, bs, s)},
                    info={"reference_for": "udp", "n_images": res.config["n_images"]})
        prot = out[name]
        if prot.model is not None:
            prot.weight_change = weight_change(pre, prot.model)
    return out


def toy_inputs(model: nn.Module, *, reference_lr: float, reference_steps: int, batch_size: int = 16,
               target: Sequence[str] | None = None, innocent: Sequence[str] | None = None, anchor: str = "square",
               n_anchor_images: int = 64, n_protected: int = 128, sample_steps: int = 15, seed: int = 0,
               config: Any = None, target_domain: str | None = None) -> BaselineInputs:
    """:class:`BaselineInputs` for the built-in toy world (freezeguard.diffusion.toy).

    The anchor is "square" (a frame is a square's outline: the nearest concept the released model
    knows, as UCE's and Concept Ablation's anchors are the target's superclass). Anchor images
    are generated by the model itself, as Concept Ablation's authors do; UCE preserves every other
    class. UDP protects ``n_protected`` fresh target images.

    Example:
        >>> inputs = toy_inputs(model, reference_lr=1e-3, reference_steps=100)   # doctest: +SKIP
    """
    from ..diffusion import toy
    from .udp import finite_stream

    target = tuple(target or toy.TARGET_CLASSES)
    innocent = tuple(innocent or toy.INNOCENT_CLASSES)
    if anchor not in toy.ALL_CLASSES or anchor in target:
        raise ValueError(f"anchor must be a toy class other than the target, got {anchor!r}")
    config = config or toy.ToyModelConfig()
    keep = [c for c in toy.ALL_CLASSES if c not in target]
    anchor_images = toy.sample(model, [anchor], n_anchor_images, seed + 500, steps=sample_steps, config=config)
    anchor_pool = {"pixel_values": anchor_images}
    return BaselineInputs(
        model=model, loss_fn=toy.make_loss_fn(config), noise_scheduler=toy.build_scheduler(config),
        target_domain=target_domain or target[0],
        target_conds=[toy.class_embedding(c) for c in target], anchor_cond=toy.class_embedding(anchor),
        preserve_conds=[toy.class_embedding(c) for c in keep],
        mixed_batches=lambda s: toy.mixed_batches(target, innocent, batch_size, seed=s),
        # IMMA's prior preservation on what the released model was trained on (the base classes):
        # the innocent class would be *taught* to it, which the harness must not do.
        preserve_batches=lambda s: toy.batches(toy.BASE_CLASSES, batch_size, seed=s),
        # Concept Ablation's authors step on 8 anchor images at a time (batch 4 x 2 GPUs).
        anchor_batches=lambda s: finite_stream(anchor_pool, min(8, n_anchor_images), s),
        protect_data=lambda: toy.make_batch(list(target), max(1, n_protected // len(target)), seed + 600,
                                            target_classes=target),
        reference_lr=reference_lr, reference_steps=reference_steps, batch_size=batch_size,
        device=next(model.parameters()).device)
