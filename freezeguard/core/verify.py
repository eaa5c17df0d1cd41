"""Audit: does a fine-tuned checkpoint leave every frozen tensor exactly as released?

``fg.verify(released, finetuned, mask)`` compares, bit for bit, each frozen tensor of the
fine-tuned checkpoint with the released one, and lists LoRA (or other adapter) weights that would
change a frozen tensor when merged. Inputs may be models, state dicts, ``.safetensors`` files,
diffusers model folders (``diffusion_pytorch_model.safetensors``, sharded or not) or pipeline
folders (the ``unet/`` inside is used). Pickle checkpoints (``.bin``, ``.ckpt``, ``.pt``) are
refused: auditing untrusted files must not execute code.

A user who saved in lower precision (fp16/bf16) cannot keep fp32 values bit-identical, so the
released tensor is first cast to the fine-tuned dtype (round to nearest, as ``.to()`` does when
saving); the report says so in ``notes``.

Example:
    >>> import torch, freezeguard as fg
    >>> released = torch.nn.Linear(3, 2)
    >>> mask = fg.FreezeMask.from_names(released, ["weight"])
    >>> tuned = {k: v.clone() for k, v in released.state_dict().items()}
    >>> tuned["bias"] += 1                     # trainable: allowed
    >>> fg.verify(released, tuned, mask).ok
    True
    >>> tuned["weight"][0, 0] += 0.5           # frozen: a violation
    >>> [(name, round(diff, 4)) for name, diff in fg.verify(released, tuned, mask).violations]
    [('weight', 0.5)]
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import torch

from freezeguard.core import weights
from freezeguard.core.mask import FreezeMask, describe_layout_mismatch
from freezeguard.core.names import adapter_touches, canonical_name, resolve_name

__all__ = ["verify", "VerifyReport", "VerifyInputError", "check_mask_fits_release"]


class VerifyInputError(ValueError):
    """An input to verify cannot be read or does not fit the mask (bad input, not a violation)."""


@dataclass
class VerifyReport:
    """Result of :func:`verify`.

    Attributes:
        ok: True when no frozen tensor differs and no adapter targets a frozen tensor.
        violations: ``(name, max_abs_diff)`` per frozen tensor that differs (``inf`` if reshaped).
        lora_violations: ``(adapter_key, frozen_name)`` per adapter weight that would change a
            frozen tensor when merged.
        notes: what the auditor should know (dtype casts, adapter-only files, skipped keys).
        checked: number of frozen tensors compared.
        missing: frozen tensors absent from the fine-tuned checkpoint (it then keeps the released
            values when loaded on top of the released model, so they are not violations).

    Example:
        >>> VerifyReport(ok=True).to_dict()["ok"]
        True
    """

    ok: bool
    violations: list[tuple[str, float]] = field(default_factory=list)
    lora_violations: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: int = 0
    missing: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # JSON has no inf; a reshaped tensor reports null.
        d["violations"] = [{"name": n, "max_abs_diff": (v if v != float("inf") else None)}
                           for n, v in self.violations]
        d["lora_violations"] = [{"key": k, "frozen": f} for k, f in self.lora_violations]
        return d

    def summary(self) -> str:
        lines = [f"{'OK' if self.ok else 'VIOLATION'}: {self.checked} frozen tensor(s) compared, "
                 f"{len(self.violations)} changed, {len(self.lora_violations)} adapter weight(s) on frozen tensors"]
        lines += [f"  changed  {n}  max|diff|={v:.6g}" for n, v in self.violations]
        lines += [f"  adapter  {k}  -> {f}" for k, f in self.lora_violations]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# reading inputs

def load_tensors(source: Any, what: str = "input") -> Mapping[str, torch.Tensor]:
    """Name -> tensor mapping for a model, a state dict, a .safetensors file or a folder (see core.weights)."""
    try:
        return weights.load_tensors(source, what)
    except weights.WeightsError as exc:
        raise VerifyInputError(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# adapter keys

_LORA_SEGMENTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                  "lora_down", "lora_up", "lora_mid", "lora", "lora_layer",
                  "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w2",
                  "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "ia3_l"}
_SOURCE_PREFIXES = ("unet.", "transformer.")
_OTHER_MODELS = ("text_encoder", "text_encoder_2", "lora_te_", "lora_te1_", "lora_te2_")


def _adapter_module(key: str) -> str | None:
    """Module path an adapter weight belongs to, or None if ``key`` is not an adapter weight."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in _LORA_SEGMENTS and i > 0:
            return ".".join(parts[:i])
        if part.endswith("_lora") and i > 0 and parts[i - 1] == "processor":
            # old diffusers attention-processor LoRA: <attn>.processor.to_q_lora.down.weight
            target = part[: -len("_lora")]
            return ".".join(parts[: i - 1] + [target + (".0" if target == "to_out" else "")])
    if parts[0].startswith("lora_unet_") and len(parts) >= 2:
        return parts[0]  # kohya: resolved by _kohya_table
    return None


def _kohya_table(layout: Iterable[str]) -> dict[str, str]:
    # kohya flattens module paths with underscores; map flattened -> real module path.
    table = {}
    for name in layout:
        module = name.rsplit(".", 1)[0]
        table["lora_unet_" + module.replace(".", "_")] = module
    return table


def _release_key(key: str, layout: Mapping[str, Any]) -> str | None:
    for prefix in ("",) + _SOURCE_PREFIXES:
        if prefix and not key.startswith(prefix):
            continue
        found = resolve_name(key[len(prefix):], layout)
        if found is not None:
            return found
    return None


def _shapes(source: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    if isinstance(source, weights.SafetensorsSource):
        return source.shapes()  # from the headers: no tensor read
    return {k: tuple(v.shape) for k, v in source.items()}


def check_mask_fits_release(mask: FreezeMask, released: Mapping[str, torch.Tensor]) -> None:
    """VerifyInputError unless ``mask`` was made for the released model (names and shapes).

    The released tensors are mapped to released names as everywhere else (wrapper prefixes,
    ``unet.`` in pipeline files); text-encoder tensors and adapter weights are ignored, and so
    are extra tensors of modules the mask knows or their parents (buffers). A tensor of the mask
    missing or reshaped, or a module the mask does not know, means another model: the audit
    would compare the wrong tensors (or too few), so it is refused, as ``FreezeMask.load(model=)``
    refuses such a mask.
    """
    layout = mask.layout
    # modules the mask knows, and their ancestors (buffers may sit on a parent module, e.g. SD3's
    # pos_embed.pos_embed beside pos_embed.proj.weight)
    known_modules = {".".join(n.split(".")[:i]) for n in layout for i in range(len(n.split(".")))}
    found: dict[str, tuple[int, ...]] = {}
    foreign = []
    for key, shape in _shapes(released).items():
        if key.startswith(_OTHER_MODELS) or _adapter_module(key) is not None:
            continue
        name = _release_key(key, layout)
        if name is not None:
            found[name] = shape
            continue
        module = canonical_name(key.removeprefix("unet.").removeprefix("transformer.")).rsplit(".", 1)[0]
        if module not in known_modules:
            foreign.append(key)
    if foreign and not isinstance(released, weights.SafetensorsSource):
        # a state dict lists tied parameters under every name: an alias of a known tensor is not foreign
        known = {released[k].data_ptr() for k in released if _release_key(k, layout) is not None}
        foreign = [k for k in foreign if released[k].data_ptr() not in known]
    mismatch = describe_layout_mismatch(layout, found, missing="missing from the released model",
                                        extra="", reshaped="shapes differ", arrow="in the mask, released:")
    if foreign:
        mismatch += ("; " if mismatch else "") + (f"{len(foreign)} released tensor(s) the mask does not know: "
                                                  f"{', '.join(sorted(foreign)[:8])}" + (" ..." if len(foreign) > 8 else ""))
    if mismatch:
        fp = mask.metadata.get("model_fingerprint")
        raise VerifyInputError(f"the mask was made for a different model than the released one ({mismatch})"
                               + (f"; mask fingerprint {fp[:12]}" if fp else ""))


# ---------------------------------------------------------------------------------------------
# comparison

_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Bitwise, so NaN == NaN at the same bits and -0.0 != 0.0: "unchanged" means the same bytes.
    if a.dtype.is_floating_point and a.element_size() in _INT_VIEW:
        v = _INT_VIEW[a.element_size()]
        return torch.equal(a.contiguous().view(v), b.contiguous().view(v))
    return torch.equal(a, b)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    d = (a.double() - b.double()).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    return float(d.max())


def verify(released: Any, finetuned: Any, mask: FreezeMask | str | os.PathLike) -> VerifyReport:
    """Check that ``finetuned`` keeps every tensor frozen by ``mask`` bit-identical to ``released``.

    ``released`` / ``finetuned``: a model, a state dict, a ``.safetensors`` file or a (diffusers
    model or pipeline) folder. ``mask``: a FreezeMask or a mask file path. Raises
    :class:`VerifyInputError` (or FreezeMaskFileError) for unusable inputs.

    Example:
        >>> import torch, freezeguard as fg
        >>> model = torch.nn.Linear(2, 2)
        >>> fg.verify(model, model.state_dict(), fg.FreezeMask.from_names(model, ["weight"])).ok
        True
    """
    if not isinstance(mask, FreezeMask):
        mask = FreezeMask.load(mask)
    layout = mask.layout
    frozen = set(mask.frozen_names)
    rel_src = load_tensors(released, "released")
    check_mask_fits_release(mask, rel_src)
    ft_src = load_tensors(finetuned, "finetuned")

    rel_keys: dict[str, str] = {}
    for k in rel_src.keys():
        name = _release_key(k, layout)
        if name is not None and name in frozen:
            rel_keys.setdefault(name, k)
    lacking = sorted(frozen - rel_keys.keys())
    if lacking:
        raise VerifyInputError(f"the released model lacks {len(lacking)} tensor(s) the mask freezes "
                               f"({', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''}): "
                               f"mask and released model do not belong together")

    report = VerifyReport(ok=True)
    casts: dict[tuple[str, str], int] = {}
    seen: set[str] = set()
    kohya = None
    adapter_keys, other_model_keys, unmapped_adapters, base_keys = 0, 0, [], 0
    for key in ft_src.keys():
        if key.startswith(_OTHER_MODELS):
            other_model_keys += 1
            continue
        module = _adapter_module(key)
        if module is not None:
            adapter_keys += 1
            if module.startswith("lora_unet_"):
                kohya = kohya if kohya is not None else _kohya_table(layout)
                module = kohya.get(module)
            # The same rule as guard/wrap (names.adapter_touches): LoRA factors change the layer's
            # weight; an adapter bias, IA3 or an unknown adapter change its bias too.
            targets = [_release_key(f"{module}.{t}", layout) if module else None for t in adapter_touches(key)]
            if targets[0] is None:
                unmapped_adapters.append(key)
            for target in targets:
                if target is not None and target in frozen:
                    report.lora_violations.append((key, target))
            continue
        name = _release_key(key, layout)
        if name is None:
            continue
        base_keys += 1
        if name not in frozen:
            continue
        seen.add(name)
        ref = rel_src[rel_keys[name]].detach().cpu()
        got = ft_src[key].detach().cpu()
        if tuple(ref.shape) != tuple(got.shape):
            report.violations.append((name if key == name else f"{name} ({key})", float("inf")))
            report.notes.append(f"{name}: shape {tuple(got.shape)} in the fine-tune, {tuple(ref.shape)} released")
            continue
        if ref.dtype != got.dtype:
            pair = (str(ref.dtype).removeprefix("torch."), str(got.dtype).removeprefix("torch."))
            casts[pair] = casts.get(pair, 0) + 1
            ref = ref.to(got.dtype)
        report.checked += 1
        if not _bit_equal(ref, got):
            label = name if key == name else f"{name} ({key})"
            report.violations.append((label, _max_abs_diff(got, ref)))
    for (src, dst), n in sorted(casts.items()):
        report.notes.append(f"{n} released tensor(s) cast from {src} to {dst} before comparing "
                            f"(the fine-tune was saved in {dst})")
    report.missing = sorted(frozen - seen)
    if base_keys == 0 and adapter_keys:
        report.notes.append(f"the fine-tune is an adapter file ({adapter_keys} adapter weights): only where "
                            f"its adapters attach was checked")
    elif report.missing:
        report.notes.append(f"{len(report.missing)} frozen tensor(s) are not in the fine-tuned checkpoint "
                            f"(loading it over the released model keeps them as released)")
    if unmapped_adapters:
        report.notes.append(f"{len(unmapped_adapters)} adapter weight(s) could not be mapped to a model tensor "
                            f"and were not checked: {', '.join(unmapped_adapters[:5])}")
    if other_model_keys:
        report.notes.append(f"{other_model_keys} tensor(s) of other models (text encoders) were ignored")
    report.ok = not report.violations and not report.lora_violations
    return report
