"""Audit: does an upload leave every frozen tensor exactly as released?

``fg.verify(released, finetuned, mask)`` fails closed: the result is OK only when every tensor of
the upload is accounted for. Each key of every weights file a loader could read
(:mod:`freezeguard.core.upload`) falls in one class:

* ``compared``: a released tensor (after the field's format converters, :mod:`freezeguard.core.formats`);
  frozen ones must be bit-identical to the release (or, opted in, the release rounded to fp16/bf16);
* ``adapter``: an adapter weight (any tuner type) hanging on a released module that owns no frozen
  tensor (:class:`~freezeguard.core.adapter_rule.AdapterRule`); on a module that owns one, a violation;
* ``other_part``: a part of the pipeline the mask does not cover (text encoders, VAE), counted per part;
* ``unmapped``: anything else. Such keys, unreadable files, frozen tensors stored as integers, fp8
  or quantized parts, and a full model that lacks frozen tensors are listed in ``cannot_verify``.

Outcomes: ``status`` "ok" (exit 0), "violation" (exit 1: a frozen tensor changed or an adapter
hangs on a frozen module), "cannot_verify" (exit 2). A violation wins over cannot_verify.
The report and its JSON schema: :mod:`freezeguard.core.verify_report`.

Example:
    >>> import torch, freezeguard as fg
    >>> released = torch.nn.Linear(3, 2)
    >>> mask = fg.FreezeMask.from_names(released, ["weight"])
    >>> tuned = {k: v.clone() for k, v in released.state_dict().items()}
    >>> tuned["bias"] += 1                     # trainable: allowed
    >>> fg.verify(released, tuned, mask).status
    'ok'
    >>> tuned["weight"][0, 0] += 0.5           # frozen: a violation
    >>> [(name, round(diff, 3)) for name, diff in fg.verify(released, tuned, mask).violations]
    [('weight', 0.5)]
    >>> tuned = dict(released.state_dict(), junk=torch.zeros(1))   # a key nobody can place
    >>> fg.verify(released, tuned, mask).exit_code
    2
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import torch

from freezeguard.core import weights
from freezeguard.core.adapter_rule import AdapterRule
from freezeguard.core.fingerprint import release_hash
from freezeguard.core.formats import OTHER_PART_KEYS, OTHER_PART_PREFIXES, convert_foreign, family_of, peft_targets
from freezeguard.core.mask import FreezeMask, describe_layout_mismatch
from freezeguard.core.names import canonical_name, resolve_name
from freezeguard.core.tensor_compare import LOWER_PRECISIONS, SHORT_NAMES, compare, parse_dtypes
from freezeguard.core.upload import FileSet, read_upload
from freezeguard.core.verify_report import VerifyReport

__all__ = ["verify", "VerifyReport", "VerifyInputError", "check_mask_fits_release", "LOWER_PRECISIONS"]

#: Buffers optimum-quanto keeps on a quantized module (QModuleMixin), beside its weight's ``._data``/``._scale``.
_QUANTO_MODULE_STATE = ("input_scale", "output_scale")


class VerifyInputError(ValueError):
    """An input to verify cannot be read or does not fit the mask (bad input, not a violation)."""


# ---------------------------------------------------------------------------------------------
# reading inputs

def load_tensors(source: Any, what: str = "input") -> Mapping[str, torch.Tensor]:
    """Name -> tensor mapping for a model, a state dict, a .safetensors file or a folder (see core.weights)."""
    try:
        return weights.load_tensors(source, what)
    except weights.WeightsError as exc:
        raise VerifyInputError(str(exc)) from None


def _release_key(key: str, layout: Mapping[str, Any]) -> str | None:
    for prefix in ("", "unet.", "transformer."):
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


def _looks_like_adapter(key: str) -> bool:
    return any(p.startswith(("lora", "hada_", "lokr_", "oft_", "boft_", "ia3_", "vera_")) for p in key.split("."))


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
        if key.startswith(tuple(OTHER_PART_PREFIXES)) or _looks_like_adapter(key):
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
# the audit


class _Audit:
    """One verify run: the mask's rule, the release, and the report being filled."""

    def __init__(self, mask: FreezeMask, rel_src: Mapping[str, torch.Tensor], rel_keys: dict[str, str],
                 allowed: set[torch.dtype]):
        self.layout = mask.layout
        self.frozen = set(mask.frozen_names)
        self.rule = AdapterRule(mask)
        self.rel_src, self.rel_keys, self.allowed = rel_src, rel_keys, allowed
        self.family = family_of(self.layout)
        self.seen: set[str] = set()
        # tensors the release stores beside the mask's parameters (buffers such as SD3's pos_embed)
        self.buffers = {canonical_name(k.removeprefix("unet.").removeprefix("transformer.")): k
                        for k in rel_src.keys() if _release_key(k, self.layout) is None
                        and not k.startswith(tuple(OTHER_PART_PREFIXES))}
        self.report = VerifyReport(ok=False)
        self.lowered: dict[str, int] = {}

    def classify(self, key: str) -> tuple[str, str]:
        """(class, detail): ("other_part", part) | ("tensor", name) | ("buffer", name) | ("derived", name)
        | ("adapter", module) | ("unmapped", "")."""
        if key in OTHER_PART_KEYS:
            return "other_part", OTHER_PART_KEYS[key]
        for prefix, part in OTHER_PART_PREFIXES.items():
            if key.startswith(prefix):
                return "other_part", part
        name = _release_key(key, self.layout)
        if name is not None:
            return "tensor", name
        bare = canonical_name(key.removeprefix("unet.").removeprefix("transformer."))
        if bare in self.buffers:
            return "buffer", bare
        parts = bare.split(".")
        for i in range(len(parts) - 1, 0, -1):
            if ".".join(parts[:i]) in self.layout:  # weight._data / weight._scale / weight.absmax ...
                return "derived", ".".join(parts[:i])
        module = self.rule.target(bare)
        return ("adapter", module) if module is not None else ("unmapped", "")

    def audit_set(self, fs: FileSet, tensors: Mapping[str, torch.Tensor]) -> None:
        report = self.report
        keys = list(tensors.keys())
        entry = {"path": fs.label, "part": fs.part, "keys": len(keys), "formats": []}
        report.files.append(entry)
        if fs.part != "denoiser":  # a component the mask does not cover: counted, not compared
            report.parts[fs.part] = report.parts.get(fs.part, 0) + len(keys)
            report.classes["other_part"] += len(keys)
            return
        classes = {k: self.classify(k) for k in keys}
        # optimum-quanto saves a quantized module's activation scales beside its weight's parts
        # (optimum/quanto/nn/qmodule.py, QModuleMixin: buffers input_scale / output_scale): with the
        # weight quantized, they are part of the quantization, not an adapter
        quantized = {d.rsplit(".", 1)[0]: d for c, d in classes.values() if c == "derived"}
        for k, (c, module) in classes.items():
            if c == "adapter" and module in quantized and k.rsplit(".", 1)[-1] in _QUANTO_MODULE_STATE:
                classes[k] = ("derived", quantized[module])
        items: list[tuple[str, str, tuple[str, str], Any]] = [(k, k, c, None) for k, c in classes.items()
                                                               if c[0] != "unmapped"]
        # old diffusers attention-processor LoRAs (attn1.processor.to_q_lora.down.weight) hang on the
        # layer the loader's renaming gives (attn1.to_q), not on attn1: they go through the converter
        foreign = [k for k, c in classes.items() if c[0] == "unmapped"
                   or (c[0] == "adapter" and ".processor." in k and "_lora." in k)]
        items = [it for it in items if it[0] not in set(foreign)]
        n_adapters = 0
        if fs.adapter_config is not None:
            # peft's loader puts a layer on every module the config targets, whether or not the file
            # holds its weights (a missing one keeps its init, random with init_lora_weights=False);
            # and state a tuner shares between its layers sits at the root (VeRA's vera_A, ...)
            targets = peft_targets(fs.adapter_config, self.rule.modules)
            config = f"{fs.adapter_config.name} target_modules"
            if targets is None:
                report.cannot_verify.append((config, "peft's adapter config cannot be read or matched (peft missing?)"))
            else:
                entry["formats"].append("peft adapter_config.json")
                report.lora_violations += self.rule.violations([(config, m) for m in sorted(targets)])
                shared = [k for k in foreign if k.startswith("base_model.") and not k.startswith("base_model.model.")]
                foreign = [k for k in foreign if k not in shared]
                for k in shared:
                    n_adapters += 1
                    report.classes["adapter"] += 1
                    report.lora_violations += self.rule.violations([(k, m) for m in sorted(targets)])
        if foreign:
            readings, leftover, problems = convert_foreign(foreign, tensors, self.family, self.layout)
            for fmt, converted, sources in readings:
                entry["formats"].append(fmt)
                for new_key, tensor in converted.items():
                    label = f"{new_key} (from {sources.get(new_key, fmt)})"
                    items.append((new_key, label, self.classify(new_key), tensor))
            report.cannot_verify += problems
            for k in leftover:
                report.classes["unmapped"] += 1
                report.cannot_verify.append((k, "unmapped: no released tensor, no released module, no known "
                                                "format or pipeline part"))
        seen: set[str] = set()
        for key, label, (cls, detail), tensor in items:
            if cls == "other_part":
                report.parts[detail] = report.parts.get(detail, 0) + 1
                report.classes["other_part"] += 1
            elif cls == "unmapped":  # a converted key that still names nothing released
                report.classes["unmapped"] += 1
                report.cannot_verify.append((label, "the converted key names no released module"))
            elif cls == "adapter":
                n_adapters += 1
                report.classes["adapter"] += 1
                report.lora_violations += self.rule.violations([(label, detail)])
            elif cls == "buffer":  # not in the mask, but a loader takes it: it must stay as released
                report.classes["compared"] += 1
                ref = self.rel_src[self.buffers[detail]]
                got = tensor if tensor is not None else tensors[key]
                try:
                    same = compare(ref.detach().cpu(), got.detach().cpu(), self.allowed)[0] == "same"
                except (RuntimeError, TypeError):
                    same = False
                if not same:
                    report.cannot_verify.append((label, "a tensor the release stores beside its parameters "
                                                        "(a buffer the mask does not cover) differs from the release"))
            elif cls == "derived":
                report.classes["unmapped" if detail in self.frozen else "adapter"] += 1
                if detail in self.frozen:
                    report.cannot_verify.append((label, f"a quantized or derived part of the frozen tensor {detail}: "
                                                        f"it cannot be shown equal to the release"))
                else:
                    n_adapters += 1
            else:
                report.classes["compared"] += 1
                if detail not in self.frozen:
                    continue
                report.classes["compared_frozen"] += 1
                seen.add(detail)
                self.compare(detail, detail if label == detail else f"{detail} ({label})",
                             tensor if tensor is not None else tensors[key])
        if seen and not n_adapters:
            lacking = sorted(self.frozen - seen)
            if lacking:
                report.cannot_verify.append((fs.label, f"a full model without {len(lacking)} frozen tensor(s) "
                                                       f"({', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''}): "
                                                       f"a loader would not take them from the release"))
        self.seen |= seen

    def compare(self, name: str, label: str, got: torch.Tensor) -> None:
        report = self.report
        ref = self.rel_src[self.rel_keys[name]].detach().cpu()
        try:
            verdict, detail = compare(ref, got.detach().cpu() if isinstance(got, torch.Tensor) else got, self.allowed)
        except (RuntimeError, TypeError, ValueError) as exc:  # exotic tensor subclasses
            verdict, detail = "cannot", f"cannot be compared: {exc}"
        report.checked += verdict != "cannot"
        if verdict == "changed":
            report.violations.append((label, detail))
            if detail == float("inf"):
                report.notes.append(f"{name}: shape {tuple(got.shape)} in the upload, {tuple(ref.shape)} released")
        elif verdict == "cannot":
            report.cannot_verify.append((label, detail))
        elif got.dtype != ref.dtype and got.element_size() < ref.element_size():
            key = SHORT_NAMES[got.dtype]
            self.lowered[key] = self.lowered.get(key, 0) + 1


def verify(released: Any, finetuned: Any, mask: FreezeMask | str | os.PathLike, *,
           allow_lower_precision: Iterable[str] = (), allow_empty_mask: bool = False) -> VerifyReport:
    """Audit ``finetuned`` (an upload) against ``released`` and ``mask``; see the module docstring.

    ``released`` / ``finetuned``: a model, a state dict, a ``.safetensors`` file or a folder (for
    ``finetuned``, every weights file a loader could read in it). ``mask``: a FreezeMask or a mask
    file path. ``allow_lower_precision``: dtypes (``"fp16"``, ``"bf16"``) in which a frozen tensor
    may equal the release rounded. Raises only :class:`VerifyInputError` (bad input, including a
    mask bound to another release); everything about the upload is in the report.

    Example:
        >>> import torch, freezeguard as fg
        >>> model = torch.nn.Linear(2, 2)
        >>> fg.verify(model, model.state_dict(), fg.FreezeMask.from_names(model, ["weight"])).ok
        True
    """
    from freezeguard.core.mask_files import FreezeMaskFileError

    try:
        allowed = parse_dtypes(allow_lower_precision)
    except ValueError as exc:
        raise VerifyInputError(f"allow_lower_precision: {exc}") from None
    if not isinstance(mask, FreezeMask):
        try:
            mask = FreezeMask.load(mask)
        except FreezeMaskFileError as exc:
            raise VerifyInputError(str(exc)) from None
    layout = mask.layout
    frozen = set(mask.frozen_names)
    rel_src = load_tensors(released, "released")
    check_mask_fits_release(mask, rel_src)
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
    notes = _check_release_hash(mask, rel_src, rel_keys)

    audit = _Audit(mask, rel_src, rel_keys, allowed)
    report = audit.report
    report.notes += notes
    if not frozen and not allow_empty_mask:
        report.cannot_verify.append(("mask", "the mask freezes nothing: verify would prove nothing "
                                             "(pass --allow-empty-mask to accept)"))
    if isinstance(finetuned, (str, os.PathLike)):
        try:
            upload = read_upload(finetuned)
        except weights.WeightsError as exc:
            raise VerifyInputError(str(exc)) from None
        report.cannot_verify += upload.refused
        for fs in upload.sets:
            try:
                source = weights.SafetensorsSource(fs.files)
                audit.audit_set(fs, source)
            except weights.WeightsError as exc:
                report.cannot_verify.append((fs.label, str(exc)))
    else:
        try:
            audit.audit_set(FileSet("denoiser", [], "<in memory>"), load_tensors(finetuned, "finetuned"))
        except weights.WeightsError as exc:  # the release's tensors, read lazily from its files
            raise VerifyInputError(str(exc)) from None
    report.missing = sorted(frozen - audit.seen)
    for dtype, n in sorted(audit.lowered.items()):
        report.notes.append(f"{n} frozen tensor(s) equal the release rounded to {dtype} (allowed)")
    if report.missing and report.classes["compared_frozen"] == 0 and report.classes["adapter"]:
        report.notes.append(f"the upload is an adapter file ({report.classes['adapter']} adapter weights): the "
                            f"{len(report.missing)} frozen tensor(s) stay as released when it is loaded")
    if report.parts:
        report.notes.append("keys of pipeline parts the mask does not cover (not compared): "
                            + ", ".join(f"{p} {n}" for p, n in sorted(report.parts.items())))
    return report.finish()


def _check_release_hash(mask: FreezeMask, rel_src: Mapping[str, torch.Tensor],
                        rel_keys: dict[str, str]) -> list[str]:
    """VerifyInputError when the mask records another release's frozen tensors; notes otherwise."""
    recorded = mask.metadata.get("release_hash")
    if not recorded:
        return ["the mask records no content hash of its release (an older mask file, or one saved without "
                "the released model): only its layout was checked against --released"]
    try:
        actual = release_hash({n: rel_src[k] for n, k in rel_keys.items()})
    except (RuntimeError, TypeError, ValueError) as exc:
        raise VerifyInputError(f"the released frozen tensors cannot be hashed: {exc}") from None
    if actual != recorded:
        raise VerifyInputError(f"the mask belongs to another release: its frozen tensors hash to {recorded[:12]}, "
                               f"the --released ones to {actual[:12]} (same architecture, other weights?)")
    return []
