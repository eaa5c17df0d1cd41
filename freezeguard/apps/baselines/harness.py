"""Running the baselines for the evaluation harness: one :class:`Protection` per method, with its cost.

The harness (:func:`freezeguard.apps.evaluate.harness.evaluate_masks`) fine-tunes every contender with the
same attackers. A mask is one kind of contender; a :class:`Protection` is the general one: a
different released model (IMMA, Concept Ablation, UCE), protected training data for some domain
(UDP), a mask on top (a mask on an immunized model), and the publisher's cost of making it.

Example:
    >>> from freezeguard.apps.baselines.harness import build_baselines, toy_inputs   # doctest: +SKIP
    >>> inputs = toy_inputs(model, reference_lr=1e-3, reference_steps=100)      # doctest: +SKIP
    >>> contenders = build_baselines(["uce", "ablation"], inputs)               # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from freezeguard.apps.baselines._common import Cost, LossFn, measure_cost, snapshot, weight_change
from freezeguard.apps.baselines.ablation import concept_ablation
from freezeguard.apps.baselines.imma import imma
from freezeguard.apps.baselines.uce import uce_edit
from freezeguard.apps.baselines.udp import finite_stream, udp
from freezeguard.core.mask import FreezeMask
from freezeguard.integrations.diffusers import toy

#: Names accepted by ``freezeguard evaluate --baselines`` (``all`` = every one).
METHODS = ("imma", "ablation", "uce", "udp")


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
    mask: FreezeMask | None = None
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

    Example:
        >>> inputs = toy_inputs(model, reference_lr=1e-3, reference_steps=100)   # doctest: +SKIP
        >>> inputs.anchor_cond.shape                                           # doctest: +SKIP
        torch.Size([4, 32])
    """

    model: nn.Module
    loss_fn: LossFn
    noise_scheduler: Any
    target_domain: str
    target_conds: list[torch.Tensor]
    anchor_cond: torch.Tensor | None
    preserve_conds: list[torch.Tensor]
    mixed_batches: Stream
    preserve_batches: Stream | None
    anchor_batches: Stream
    protect_data: Callable[[], dict[str, Any]]
    reference_lr: float
    reference_steps: int
    batch_size: int = 16
    device: str | torch.device = "cpu"
    #: extra keyword arguments for :func:`udp` (e.g. ``key="latents", clamp=None`` for latent models)
    udp_kwargs: dict[str, Any] = field(default_factory=dict)


def resolve_methods(spec: str | Sequence[str]) -> list[str]:
    """``"all"`` or a comma-separated list / sequence of :data:`METHODS`, validated, in order.

    Example:
        >>> resolve_methods("uce, ablation")
        ['uce', 'ablation']
    """
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    if names == ["all"]:
        return list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown baselines {unknown or names}; choose from {', '.join(METHODS)} or 'all'")
    return list(dict.fromkeys(names))


def step_overrides(steps: int | None) -> dict[str, dict[str, int]] | None:
    """Overrides capping every iterative baseline at ``steps`` (a smoke test); None keeps the defaults.

    Example:
        >>> step_overrides(2)["udp"]
        {'rounds': 1, 'surrogate_steps': 2, 'pgd_steps': 2}
    """
    if steps is None:
        return None
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"baseline steps must be an int >= 1, got {steps!r}")
    return {"ablation": {"steps": steps}, "imma": {"steps": steps},
            "udp": {"rounds": 1, "surrogate_steps": steps, "pgd_steps": steps}}


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
    overrides = dict(overrides or {})
    pre = snapshot(inputs.model)
    out: dict[str, Protection] = {}
    for name in resolve_methods(methods):
        kw = dict(overrides.get(name, {}))
        if progress:
            print(f"[freezeguard baselines] {name}", flush=True)
        if name in ("uce", "ablation") and (not inputs.target_conds or inputs.anchor_cond is None):
            raise ValueError(f"{name} needs the target's and the anchor's text conditions "
                             "(with a pipeline: target_prompt and anchor_prompt)")
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
                      "batch_size": inputs.batch_size, "seed": seed} | inputs.udp_kwargs | kw
                with measure_cost(inputs.device) as cost:
                    res = udp(inputs.model, inputs.loss_fn, data, **kw)
                protected, clean, bs = res.data, dict(data), inputs.batch_size
                out[name] = Protection("data", train_batches={
                    inputs.target_domain: lambda s, d=protected, b=bs: finite_stream(d, b, s)}, cost=cost,
                    info={"config": res.config, "linf": float(res.delta.abs().max()), "n_images": res.config["n_images"]})
                out["udp (clean pool)"] = Protection("data", train_batches={
                    inputs.target_domain: lambda s, d=clean, b=bs: finite_stream(d, b, s)},
                    info={"reference_for": "udp", "n_images": res.config["n_images"]})
        prot = out[name]
        if prot.model is not None:
            prot.weight_change = weight_change(pre, prot.model)
    return out


def toy_inputs(model: nn.Module, *, reference_lr: float, reference_steps: int, batch_size: int = 16,
               target: Sequence[str] | None = None, innocent: Sequence[str] | None = None, anchor: str = "square",
               n_anchor_images: int = 64, n_protected: int = 128, sample_steps: int = 15, seed: int = 0,
               config: Any = None, target_domain: str | None = None,
               known: Sequence[str] | None = None) -> BaselineInputs:
    """:class:`BaselineInputs` for the built-in toy world (freezeguard.integrations.diffusers.toy).

    The anchor is "square" (a frame is a square's outline: the nearest concept the released model
    knows, as UCE's and Concept Ablation's anchors are the target's superclass). Anchor images
    are generated by the model itself, as Concept Ablation's authors do; UCE preserves every other
    class. UDP protects ``n_protected`` fresh target images. ``known``: the classes the model was
    pretrained on, beside the demo's shapes (``toy.ALL_CLASSES``); UCE preserves them, the target aside.

    Example:
        >>> inputs = toy_inputs(model, reference_lr=1e-3, reference_steps=100)   # doctest: +SKIP
    """
    target = tuple(target or toy.TARGET_CLASSES)
    innocent = tuple(innocent or toy.INNOCENT_CLASSES)
    known = tuple(dict.fromkeys(toy.ALL_CLASSES + tuple(known or ())))
    if anchor not in known or anchor in target:
        raise ValueError(f"anchor must be a toy class the model knows other than the target, got {anchor!r}")
    config = config or toy.ToyModelConfig()
    keep = [c for c in known if c not in target]
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


def contenders(model: nn.Module, methods: Sequence[str], inputs: BaselineInputs | None, *,
               mask: FreezeMask | None = None, random_seeds: int = 3, budget_by: str = "tensors", seed: int = 0,
               mask_name: str = "learned", overrides: Mapping[str, Mapping[str, Any]] | None = None,
               progress: bool = False) -> dict[str, Any]:
    """Everything one evaluation compares, by display name, for :func:`freezeguard.apps.evaluate.harness.evaluate_masks`.

    "full" (no protection, the reference); with a ``mask``: random masks at its ratio
    (``random#k``) and the mask itself; every baseline in ``methods``; and, with a mask and IMMA,
    the combination "imma+<mask_name>" (the mask enforced on the immunized model). ``overrides``
    as in :func:`build_baselines`.

    Example:
        >>> entries = contenders(model, ["uce"], inputs, mask=learned)        # doctest: +SKIP
        >>> list(entries)                                                     # doctest: +SKIP
        ['full', 'random#0', 'random#1', 'random#2', 'learned', 'uce']
    """
    out: dict[str, Any] = {"full": None}
    if mask is not None:
        ratio = mask.ratio(budget_by)
        for k in range(random_seeds):
            out[f"random#{k}"] = FreezeMask.random(model, ratio, by=budget_by, seed=seed + k)
        out[mask_name] = mask
    methods = resolve_methods(methods) if methods else []
    if methods:
        if inputs is None:
            raise ValueError("baselines need BaselineInputs (see toy_inputs)")
        built = build_baselines(methods, inputs, seed=seed, overrides=overrides, progress=progress)
        out.update(built)
        if mask is not None and "imma" in built:
            imm = built["imma"]
            out[f"imma+{mask_name}"] = Protection("model", imm.model, mask=mask, cost=imm.cost,
                                                  weight_change=imm.weight_change,
                                                  info={"combination": f"imma + {mask_name} mask"})
    return out


def _encode_prompt(comps: Any, prompt: str) -> tuple[torch.Tensor, int]:
    """Text-encoder output [L, D] of ``prompt`` and the index of its last word token.

    Example:
        >>> emb, last = _encode_prompt(comps, "a photo of sks")     # doctest: +SKIP
    """
    ids = comps.tokenizer([prompt], padding="max_length", truncation=True,
                          max_length=comps.tokenizer.model_max_length, return_tensors="pt")
    dev = next(comps.text_encoder.parameters()).device
    with torch.no_grad():
        emb = comps.text_encoder(ids.input_ids.to(dev), return_dict=False)[0][0].float().cpu()
    # attention_mask counts BOS + words + EOS: the last word sits two before its end
    return emb, max(int(ids.attention_mask[0].sum()) - 2, 0)


def prompt_conditions(comps: Any, target: str, anchor: str) -> tuple[torch.Tensor, torch.Tensor]:
    """UCE's token choice: from each prompt's last word to the end, cropped to a common length.

    The concept lives in the last word's token and what follows it (EOS and padding carry the
    sentence in CLIP); token i of the target is mapped onto token i of the anchor.
    """
    t_emb, t_idx = _encode_prompt(comps, target)
    a_emb, a_idx = _encode_prompt(comps, anchor)
    far = max(t_idx, a_idx)
    return t_emb[t_idx:len(t_emb) - (far - t_idx)], a_emb[a_idx:len(a_emb) - (far - a_idx)]


def _latents(comps: Any, batch: dict[str, Any]) -> torch.Tensor:
    x = batch["pixel_values"]
    if comps.vae is None:
        return x
    dev = next(comps.vae.parameters()).device
    with torch.no_grad():
        return comps.vae.encode(x.to(dev)).latent_dist.mode().cpu() * comps.vae.config.scaling_factor


def pipeline_inputs(comps: Any, domains: Sequence[Any], *, reference_lr: float, reference_steps: int,
                    batch_size: int, target_prompt: str | None = None, anchor_prompt: str | None = None,
                    preserve_prompts: Sequence[str] = (), seed: int = 0) -> BaselineInputs:
    """:class:`BaselineInputs` for a local SD pipeline (``SDComponents``) and imagefolder domains.

    ``target_prompt`` / ``anchor_prompt`` (UCE, Concept Ablation): the concept to erase and the one
    it is mapped onto; UCE preserves the empty prompt and ``preserve_prompts``.

    Deviations from the papers, forced by what a local folder gives: Concept Ablation's noised
    inputs are the target training images (no anchor images are generated); UDP perturbs the
    VAE latents of the target images (the loss encodes pixels without gradient), so its L∞
    bound is in latent units; IMMA's regulariser uses the innocent domains' images.
    """
    needs_prompts = target_prompt is not None or anchor_prompt is not None
    if needs_prompts and not (target_prompt and anchor_prompt):
        raise ValueError("give both target_prompt and anchor_prompt (the concept to erase and the one to map it onto)")
    if needs_prompts and (comps.text_encoder is None or comps.tokenizer is None):
        raise ValueError("UCE / Concept Ablation need the pipeline's text encoder and tokenizer")
    target = next(d for d in domains if d.role == "target")
    innocent = [d for d in domains if d.role == "innocent"]
    t_cond = a_cond = None
    keep = []
    if needs_prompts:
        t_cond, a_cond = prompt_conditions(comps, target_prompt, anchor_prompt)
        keep = [_encode_prompt(comps, p)[0] for p in ["", *preserve_prompts]]

    def mixed(seed: int):
        t_stream = target.train_batches(seed)
        i_streams = [d.train_batches(seed + 1 + k) for k, d in enumerate(innocent)]
        while True:
            parts = [next(t_stream)] + [next(s) for s in i_streams]
            # pixel_values / input_ids / is_target concatenate; caption lists join
            yield {k: (torch.cat([p[k] for p in parts]) if isinstance(parts[0][k], torch.Tensor)
                       else sum((list(p[k]) for p in parts), [])) for k in parts[0] if k in parts[-1]}

    def anchor(seed: int):
        stream = target.train_batches(seed)
        while True:
            yield {"latents": _latents(comps, next(stream))}

    def protect():
        stream = target.train_batches(seed + 600)
        parts = [next(stream) for _ in range(4)]
        out = {"latents": torch.cat([_latents(comps, p) for p in parts]),
               "is_target": torch.cat([p["is_target"] for p in parts])}
        if "input_ids" in parts[0]:
            out["input_ids"] = torch.cat([p["input_ids"] for p in parts])
        return out

    return BaselineInputs(
        model=comps.unet, loss_fn=comps.loss_fn(), noise_scheduler=comps.noise_scheduler,
        target_domain=target.name, target_conds=[t_cond] if t_cond is not None else [],
        anchor_cond=a_cond, preserve_conds=keep, mixed_batches=mixed, preserve_batches=None,
        anchor_batches=anchor, protect_data=protect, reference_lr=reference_lr, reference_steps=reference_steps,
        batch_size=batch_size, device=next(comps.unet.parameters()).device,
        udp_kwargs={"key": "latents", "clamp": None})
