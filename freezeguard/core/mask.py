"""FreezeMask: which tensors of a model stay frozen at their released values.

A mask is keyed by parameter *name* (``model.named_parameters()``), so it survives parameter
objects being replaced (accelerate, FSDP) and travels in a file with the model. It also keeps
the layout (name -> shape) of the model it was made for, to check that it is applied to the
right model and to compute ratios by parameter count.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Mapping

import torch

from freezeguard._version import __version__
from freezeguard.core.fingerprint import model_fingerprint, release_hash
from freezeguard.core.mask_files import FreezeMaskFileError, read_mask_file, read_reference_txt, write_mask_file
from freezeguard.core.names import lora_exclude_modules, released_layout, resolve_name
from freezeguard.core.values import check_ratio

BUDGET_BASES = ("tensors", "params")


def _layout(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _describe(model: torch.nn.Module, by: str, ratio: float | None = None) -> dict[str, str]:
    # What a mask file records about how the mask was made (all strings, see mask_io).
    meta = {"model_fingerprint": model_fingerprint(model), "budget_by": by}
    if ratio is not None:
        meta["target_ratio"] = repr(float(ratio))
    return meta


def _check_by(by: str) -> str:
    if by not in BUDGET_BASES:
        raise ValueError(f"by must be one of {BUDGET_BASES}, got {by!r}")
    return by


def describe_layout_mismatch(expected: Mapping[str, Iterable[int]], actual: Mapping[str, Iterable[int]], *,
                             missing: str, extra: str, reshaped: str, arrow: str = "->", limit: int = 8) -> str:
    """Name the tensors missing from ``actual``, extra in it and reshaped, each under its label; "" if none.

    Example:
        >>> describe_layout_mismatch({"a": (2,), "b": (3,)}, {"b": (4,), "c": (1,)},
        ...                          missing="missing", extra="extra", reshaped="reshaped")
        'missing: a; extra: c; reshaped: b (3,) -> (4,)'
    """
    def listing(names: list[str]) -> str:
        return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")

    gone = sorted(expected.keys() - actual.keys())
    new = sorted(actual.keys() - expected.keys())
    changed = sorted(n for n in expected.keys() & actual.keys() if tuple(expected[n]) != tuple(actual[n]))
    parts = []
    if gone:
        parts.append(f"{missing}: {listing(gone)}")
    if new:
        parts.append(f"{extra}: {listing(new)}")
    if changed:
        parts.append(f"{reshaped}: " + ", ".join(f"{n} {expected[n]} {arrow} {actual[n]}" for n in changed[:limit]))
    return "; ".join(parts)


def select_budget(order: list[str], sizes: Mapping[str, int], ratio: float, by: str) -> list[str]:
    """Take names from the front of ``order`` until the budget ``ratio`` is met.

    By tensors: exactly round(ratio * count) names. By params: names are taken while the
    running parameter count stays nearest to ratio * total (a tensor is taken when doing so
    brings the total closer to the target; large tensors that would overshoot are skipped).
    """
    ratio, by = check_ratio(ratio), _check_by(by)
    if by == "tensors":
        return order[: round(ratio * len(order))]
    target = ratio * sum(sizes[n] for n in order)
    taken, total = [], 0
    for name in order:
        size = sizes[name]
        if abs(total + size - target) < abs(total - target):
            taken.append(name)
            total += size
    return taken


class FreezeMask:
    """Per-tensor freeze mask for a model.

    Example:
        >>> import torch, freezeguard as fg
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> mask = fg.FreezeMask.from_names(model, ["0.weight"])
        >>> mask.is_frozen("0.weight"), mask.ratio(by="tensors")
        (True, 0.25)
        >>> _ = mask.apply_(model); model[0].weight.requires_grad
        False
    """

    granularity = "tensor"

    def __init__(self, layout: Mapping[str, Iterable[int]], frozen: Iterable[str], *,
                 metadata: Mapping[str, str] | None = None):
        self._layout: dict[str, tuple[int, ...]] = {k: tuple(int(d) for d in v) for k, v in layout.items()}
        frozen = set(frozen)
        unknown = sorted(frozen - self._layout.keys())
        if unknown:
            raise KeyError(f"mask names {len(unknown)} tensor(s) the model does not have: "
                           f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}")
        self._frozen = frozenset(frozen)
        self.metadata: dict[str, str] = dict(metadata or {})

    # construction -------------------------------------------------------------------------
    @classmethod
    def from_names(cls, model: torch.nn.Module, frozen_names: Iterable[str]) -> "FreezeMask":
        """Freeze exactly the named parameters (unknown names raise KeyError)."""
        return cls(_layout(model), frozen_names, metadata=_describe(model, "tensors"))

    @classmethod
    def random(cls, model: torch.nn.Module, ratio: float, by: str = "tensors", seed: int = 0) -> "FreezeMask":
        """Freeze a random share ``ratio`` of the tensors (or of the parameters), seeded."""
        layout = _layout(model)
        names = sorted(layout)
        gen = torch.Generator().manual_seed(int(seed))
        order = [names[i] for i in torch.randperm(len(names), generator=gen).tolist()]
        sizes = {n: math.prod(s) for n, s in layout.items()}
        mask = cls(layout, select_budget(order, sizes, ratio, by), metadata=_describe(model, by, ratio))
        mask.metadata.update({"source": "random", "seed": str(int(seed))})
        return mask

    @classmethod
    def from_scores(cls, model: torch.nn.Module, scores: Mapping[str, float], ratio: float,
                    by: str = "tensors") -> "FreezeMask":
        """Freeze the highest-scored tensors until ``ratio`` of tensors (or params) is frozen.

        Ties break by name, so the result is deterministic.
        """
        layout = _layout(model)
        missing = sorted(layout.keys() - scores.keys())
        extra = sorted(scores.keys() - layout.keys())
        if missing or extra:
            raise KeyError(f"scores do not match the model: missing {missing[:5]}, unknown {extra[:5]}")
        values = {n: float(scores[n]) for n in layout}
        bad = sorted(n for n, v in values.items() if not math.isfinite(v))
        if bad:
            # NaN compares false with everything: the "top-scored" order would be arbitrary.
            raise ValueError(f"scores must be finite; {len(bad)} are not: "
                             + ", ".join(f"{n}={values[n]}" for n in bad[:5]) + (" ..." if len(bad) > 5 else ""))
        order = sorted(layout, key=lambda n: (-values[n], n))
        sizes = {n: math.prod(s) for n, s in layout.items()}
        return cls(layout, select_budget(order, sizes, ratio, by), metadata=_describe(model, by, ratio))

    @classmethod
    def from_reference_txt(cls, model: torch.nn.Module, path: str | os.PathLike) -> "FreezeMask":
        """Read a mask made by the authors' code (pittisl/FreezeAsGuard).

        The file holds one 0/1 per line in ``model.parameters()`` order, 1 = frozen. A file whose
        line count differs from the model's tensor count is refused (FreezeMaskFileError).

        Example:
            >>> import os, tempfile, torch, freezeguard as fg
            >>> path = os.path.join(tempfile.mkdtemp(), "mask.txt")
            >>> _ = open(path, "w").write("0\\n1\\n")
            >>> fg.FreezeMask.from_reference_txt(torch.nn.Linear(2, 2), path).frozen_names
            ['bias']
        """
        names = [n for n, _ in model.named_parameters()]
        bits = read_reference_txt(path, len(names))
        mask = cls(_layout(model), [n for n, b in zip(names, bits, strict=True) if b], metadata=_describe(model, "tensors"))
        mask.metadata["source"] = "reference_txt"
        return mask

    # queries ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Every parameter name of the model the mask was made for, sorted."""
        return sorted(self._layout)

    @property
    def frozen_names(self) -> list[str]:
        return sorted(self._frozen)

    @property
    def trainable_names(self) -> list[str]:
        return sorted(self._layout.keys() - self._frozen)

    @property
    def layout(self) -> dict[str, tuple[int, ...]]:
        return dict(self._layout)

    def is_frozen(self, name: str) -> bool:
        return name in self._frozen

    def ratio(self, by: str = "tensors") -> float:
        """Realised frozen share, by tensor count or by parameter count."""
        _check_by(by)
        if not self._layout:
            return 0.0
        if by == "tensors":
            return len(self._frozen) / len(self._layout)
        total = sum(math.prod(s) for s in self._layout.values())
        return sum(math.prod(self._layout[n]) for n in self._frozen) / max(total, 1)

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ValueError naming missing / extra / reshaped tensors if the model differs.

        A model wrapped after the release (peft ``add_adapter`` / ``get_peft_model``, DDP's
        ``module.``, ``torch.compile``) is compared under its released names, without its adapter
        weights (:func:`freezeguard.core.names.released_layout`).
        """
        live = _layout(model)
        mismatch = describe_layout_mismatch(self._layout, live, missing="missing from the model",
                                            extra="not in the mask", reshaped="reshaped")
        if mismatch:
            released = released_layout(model)
            if released == live or describe_layout_mismatch(self._layout, released, missing="", extra="",
                                                            reshaped=""):
                raise ValueError(f"mask was made for a different model ({mismatch})")

    def lora_exclude_modules(self, model: torch.nn.Module) -> list[str]:
        """Module names to pass to peft ``LoraConfig(exclude_modules=...)``.

        These are the modules that own a frozen tensor; a LoRA adapter on any of them would change
        a frozen tensor when merged. See :mod:`freezeguard.core.names`.

        Example:
            >>> import torch, freezeguard as fg
            >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
            >>> fg.FreezeMask.from_names(model, ["1.weight"]).lora_exclude_modules(model)
            ['1']
        """
        return lora_exclude_modules(model, self)

    # files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, model: torch.nn.Module | None = None, *,
             released: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write the mask to a ``.safetensors`` file (atomically; see :mod:`freezeguard.core.mask_files`).

        ``model`` (optional, the *released* model) refreshes the stored fingerprint, must match the
        mask, and binds the mask to this release: the file records ``release_hash``, a content hash
        of the frozen tensors, which ``verify`` checks against ``--released``. ``released`` (a
        name -> tensor mapping of the release as stored, e.g. ``weights.load_tensors(folder)``)
        gives the hash instead, for a caller whose ``model`` no longer holds the released values.

        Example:
            >>> import os, tempfile, torch, freezeguard as fg
            >>> model = torch.nn.Linear(2, 2)
            >>> path = os.path.join(tempfile.mkdtemp(), "mask.safetensors")
            >>> fg.FreezeMask.from_names(model, ["weight"]).save(path, model)
        """
        meta = dict(self.metadata)
        if model is not None:
            self.check_model(model)
            meta["model_fingerprint"] = model_fingerprint(model)
            tensors = self.frozen_tensors(model)
            if not any(t.is_meta for t in tensors.values()):  # a meta model has shapes, no content to bind to
                meta["release_hash"] = release_hash(tensors)
        if released is not None:
            picked = {}
            for key in released:
                name = resolve_name(key, self._layout)
                if name in self._frozen:
                    picked.setdefault(name, released[key])
            if picked.keys() != self._frozen:
                raise ValueError(f"released lacks {len(self._frozen - picked.keys())} frozen tensor(s) of the mask")
            meta["release_hash"] = release_hash(picked)
        by = meta.get("budget_by", "tensors")
        learning = meta.pop("learning", "{}")
        try:
            json.loads(learning)
        except (TypeError, ValueError):
            raise ValueError("mask.metadata['learning'] must be a JSON string") from None
        reserved = {"model_fingerprint", "budget_by", "target_ratio", "release_hash"}
        file_meta = {
            "granularity": self.granularity,
            "budget_by": by,
            "ratio": repr(self.ratio(by if by in BUDGET_BASES else "tensors")),
            "ratio_tensors": repr(self.ratio("tensors")),
            "ratio_params": repr(self.ratio("params")),
            "model_fingerprint": meta.get("model_fingerprint", ""),
            "learning": learning,
            "extra": json.dumps({k: str(v) for k, v in sorted(meta.items()) if k not in reserved}),
        }
        for key in ("target_ratio", "release_hash"):
            if key in meta:
                file_meta[key] = meta[key]
        file_meta["freezeguard_version"] = __version__
        write_mask_file(path, self._layout, self._frozen, file_meta)

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module | None = None) -> "FreezeMask":
        """Read a mask file; with ``model``, check it was made for this model.

        Every problem raises :class:`FreezeMaskFileError` (a ValueError) naming the file: missing,
        not safetensors, truncated or corrupted, unknown format version, or made for a different
        model (listing missing / extra / reshaped tensors), or, when the file records the content
        hash of its release (``release_hash``) and the model's frozen tensors have the dtypes they
        were hashed in, for other weights (another release of the same architecture, or a model
        whose frozen tensors changed). A model whose names and shapes match but whose dtypes
        differ (loaded in fp16, say) is accepted on its layout: the mask is about names. Files
        without ``release_hash`` (older ones) load; ``verify`` then notes that only the layout
        was checked.

        Example:
            >>> import os, tempfile, torch, freezeguard as fg
            >>> model = torch.nn.Linear(2, 2)
            >>> path = os.path.join(tempfile.mkdtemp(), "mask.safetensors")
            >>> fg.FreezeMask.from_names(model, ["weight"]).save(path)
            >>> fg.FreezeMask.load(path, model)
            FreezeMask(1/2 tensors frozen, 66.7% of parameters)
        """
        layout, frozen, file_meta = read_mask_file(path)
        meta: dict[str, str] = {}
        try:
            extra = json.loads(file_meta.get("extra", "{}"))
        except ValueError:
            raise FreezeMaskFileError(f"{path} is corrupted: its 'extra' metadata is not JSON") from None
        if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
            raise FreezeMaskFileError(f"{path} is corrupted: its 'extra' metadata is not a JSON object of strings")
        meta.update(extra)
        for key in ("model_fingerprint", "budget_by", "target_ratio", "learning", "release_hash"):
            if file_meta.get(key):
                meta[key] = file_meta[key]
        mask = cls(layout, frozen, metadata=meta)
        if model is not None:
            # Same fingerprint: names, shapes and dtypes all match, nothing more to check.
            if meta.get("model_fingerprint") != model_fingerprint(model):
                try:
                    mask.check_model(model)
                except ValueError as exc:
                    raise FreezeMaskFileError(f"{path}: {exc}") from None
            recorded = meta.get("release_hash")
            tensors = mask.frozen_tensors(model) if recorded else {}
            if recorded and meta.get("model_fingerprint") == model_fingerprint(model) \
                    and not any(t.is_meta for t in tensors.values()):
                if release_hash(tensors) != recorded:
                    raise FreezeMaskFileError(f"{path}: the mask belongs to another release: the model's frozen "
                                              f"tensors differ from the ones the mask was made for")
        return mask

    def frozen_tensors(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """released name -> the model's tensor, for every frozen tensor the model has (wrappers mapped).

        Example:
            >>> import torch, freezeguard as fg
            >>> lin = torch.nn.Linear(2, 2)
            >>> list(fg.FreezeMask.from_names(lin, ["bias"]).frozen_tensors(lin))
            ['bias']
        """
        out: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            released = resolve_name(name, self._layout)
            if released in self._frozen and ".modules_to_save." not in name:
                out.setdefault(released, p.detach())
        return out

    # effect -------------------------------------------------------------------------------
    def apply_(self, model: torch.nn.Module) -> torch.nn.Module:
        """Set ``requires_grad=False`` on frozen tensors (others untouched); returns the model."""
        params = dict(model.named_parameters())
        if any(n not in params for n in self._frozen):  # a wrapped model (peft, DDP): map released names
            for name, p in model.named_parameters():
                released = resolve_name(name, self._layout)
                if released is not None and ".modules_to_save." not in name:
                    params.setdefault(released, p)
        missing = [n for n in self._frozen if n not in params]
        if missing:
            raise KeyError(f"model has no parameter(s) named {sorted(missing)[:8]}")
        for name in self._frozen:
            params[name].requires_grad_(False)
        return model

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FreezeMask) and self._layout == other._layout and self._frozen == other._frozen

    def __repr__(self) -> str:
        return (f"FreezeMask({len(self._frozen)}/{len(self._layout)} tensors frozen, "
                f"{self.ratio('params'):.1%} of parameters)")
