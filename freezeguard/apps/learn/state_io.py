"""The mask learner's save / resume file: one safetensors file, string-only metadata.

Layout: ``logits`` [S] fp32; for each parameter name ``theta/<name>`` (live weights) and
``delta/<name>`` (theta_pre - theta_ft); with the AdamW user also ``user_exp_avg/<name>`` and
``user_exp_avg_sq/<name>``. Metadata: ``format``, the step counters, the hyperparameters as
JSON, the parameter order as JSON and the model fingerprint. No pickle anywhere: a learner
file from someone else can be loaded safely.

Beside the file format: :func:`save_learner` (what a MaskLearner writes, shards gathered under
FSDP2) and :func:`read_learner` + :func:`restore_` (what ``MaskLearner.load`` checks and puts
back); the learner's methods are thin calls into them.

Example:
    >>> import torch, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "state.safetensors")
    >>> write(path, {"logits": torch.zeros(2)}, {"format": FORMAT})
    >>> tensors, meta = read(path)
    >>> meta["format"] == FORMAT, tensors["logits"].tolist()
    (True, [0.0, 0.0])
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from freezeguard.apps.learn import distributed
from freezeguard.apps.learn.budget import auto_c_sparsity
from freezeguard.apps.learn.config import LearnerConfig
from freezeguard.apps.learn.logits import uniform_logits
from freezeguard.core.files import atomic_path
from freezeguard.core.fingerprint import model_fingerprint

FORMAT = "freezeguard.mask_learner/1"


def write(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write atomically (a uniquely named temp file, fsync, rename into place) so an interrupted
    save never leaves a truncated checkpoint where the previous good one was, and two writers
    never share a temporary file."""
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"metadata values must be strings: {bad}")
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.fspath(tmp),
                  metadata=dict(metadata))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a learner state (step counters, hyperparameters...) without reading a tensor."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no learner state at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a freezeguard learner state (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return meta


def saved_hparams(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """(hyperparameters, step count) a learner state was saved with, from its metadata alone."""
    meta = read_metadata(path)
    try:
        return dict(json.loads(meta["hparams"])), int(meta["step_count"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: incomplete learner metadata ({exc})") from None


def hparam_changes(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """name -> (saved, wanted) for every hyperparameter in ``wanted`` that differs from the saved one.

    Numbers compare as floats (``10`` equals ``10.0``); names absent from the state are ignored.

    Example:
        >>> hparam_changes({"mask_lr": 10.0, "seed": 0}, {"mask_lr": 10, "seed": 1})
        {'seed': (0, 1)}
    """
    out = {}
    for key, new in wanted.items():
        if key not in saved:
            continue
        old = saved[key]
        same = (float(old) == float(new)) if _is_number(old) and _is_number(new) else old == new
        if not same:
            out[key] = (old, new)
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no learner state at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a freezeguard learner state (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return tensors, meta


# A MaskLearner's state -----------------------------------------------------------------------------
def save_learner(learner: Any, path: str) -> None:
    """Write ``learner``'s full state; see ``MaskLearner.save`` (collective under FSDP2)."""
    sharded = learner._sharding is not None
    if not sharded and not distributed.is_main_process():
        return

    def full(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return distributed.gather(t, p).cpu() if sharded else t

    tensors = {"logits": learner.logits, "initial_logits": learner._initial, "signal": learner._signal}
    for name, p, th, d in zip(learner.names, learner._params, learner._theta(), learner._delta, strict=True):
        tensors[f"theta/{name}"] = full(th, p)
        tensors[f"delta/{name}"] = full(d, p)
    # The user's moments exist only with user_optimizer="adamw" (empty lists for SGD).
    for name, p, mu, nu in _moments(learner):
        tensors[f"user_exp_avg/{name}"] = full(mu, p)
        tensors[f"user_exp_avg_sq/{name}"] = full(nu, p)
    if not distributed.is_main_process():
        return
    meta = {"format": FORMAT, "step_count": str(learner.step_count), "user_steps": str(learner.user_steps),
            "hparams": json.dumps(learner.config.to_json(), sort_keys=True), "names": json.dumps(learner.names),
            "c_sparsity_resolved": repr(learner.c_sparsity), "signal_count": str(learner._signal_count),
            "fingerprint": model_fingerprint(learner.module)}
    write(path, tensors, meta)


def _moments(learner: Any) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(name, parameter, exp_avg, exp_avg_sq) of the AdamW user; none for SGD."""
    if not learner._exp_avg:
        return []
    return list(zip(learner.names, learner._params, learner._exp_avg, learner._exp_avg_sq, strict=True))


@dataclass(frozen=True)
class SavedLearner:
    """A learner state as read from its file: the settings it was learned with, its parameter
    order, its step counters, its tensors and its metadata."""

    config: LearnerConfig
    names: list[str]
    step_count: int
    user_steps: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]


def read_learner(path: str, config: LearnerConfig | None = None) -> SavedLearner:
    """The learner state at ``path``. With ``config``, it must equal the saved one: a differing
    field is an error naming both values (a resumed run continues under the settings it started with)."""
    tensors, meta = read(path)
    try:
        saved = LearnerConfig.from_json({k: v for k, v in json.loads(meta["hparams"]).items()
                                         if k != "c_sparsity_resolved"})
        names = json.loads(meta["names"])
        step_count, user_steps = int(meta["step_count"]), int(meta["user_steps"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: incomplete learner metadata ({exc})") from exc
    if config is not None and config != saved:
        diff = "; ".join(f"{k}: saved {a!r}, given {b!r}" for k, (a, b) in saved.differences(config).items())
        raise ValueError(f"{path} was learned with other settings ({diff})")
    return SavedLearner(saved, names, step_count, user_steps, tensors, meta)


def restore_(learner: Any, path: str, saved: SavedLearner) -> None:
    """Put a state read by :func:`read_learner` into ``learner`` (freshly configured with the saved
    config on a model with the same parameter names and shapes)."""
    names, tensors, meta = saved.names, saved.tensors, saved.meta
    if names != learner.names:
        missing = sorted(set(names) - set(learner.names))
        extra = sorted(set(learner.names) - set(names))
        order = "" if missing or extra else ", or another parameter order"
        raise ValueError(f"{path} was saved for a different model (missing from the model: {missing[:8]}, "
                         f"not in the file: {extra[:8]}{order})")
    expected = {"logits"} | {f"{k}/{n}" for k in ("theta", "delta") for n in names}
    if learner.user_optimizer == "adamw":
        expected |= {f"{k}/{n}" for k in ("user_exp_avg", "user_exp_avg_sq") for n in names}
    if expected - tensors.keys():
        raise ValueError(f"{path} lacks tensors: {sorted(expected - tensors.keys())[:8]}")
    with torch.no_grad():
        # The file holds full tensors; under FSDP2 each rank takes its shard of them.
        for name, p, th, d in zip(learner.names, learner._params, learner._theta(), learner._delta, strict=True):
            for key, dst in ((f"theta/{name}", th), (f"delta/{name}", d)):
                if tuple(tensors[key].shape) != tuple(p.shape):
                    raise ValueError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, "
                                     f"the model's is {tuple(p.shape)}")
                dst.copy_(distributed.shard_of(tensors[key], p))
        for name, p, mu, nu in _moments(learner):
            mu.copy_(distributed.shard_of(tensors[f"user_exp_avg/{name}"], p))
            nu.copy_(distributed.shard_of(tensors[f"user_exp_avg_sq/{name}"], p))
        if tensors["logits"].shape != learner.logits.shape:
            raise ValueError(f"{path}: logits have shape {tuple(tensors['logits'].shape)}")
        learner.logits.copy_(tensors["logits"])
        # Files written before "initial_logits" was saved started from the seeded U[0, 1).
        initial = tensors.get("initial_logits")
        learner._initial.copy_(uniform_logits(len(learner.names), learner.seed) if initial is None else initial)
        if learner.c_sparsity_auto:
            resolved = meta.get("c_sparsity_resolved")
            learner.c_sparsity = (float(resolved) if resolved is not None else
                                  auto_c_sparsity(learner._initial, learner._weights, learner.freeze_ratio,
                                                  learner.temperature))
        if "signal" in tensors:  # a run stopped inside an accumulation resumes it
            learner._signal = tensors["signal"].to(learner.logits.device, torch.float32).clone()
            learner._signal_count = int(meta.get("signal_count", "0"))
    learner.step_count, learner.user_steps = saved.step_count, saved.user_steps
    learner._movement.update(learner._initial, learner.logits)  # the resumed log continues where it stopped


__all__ = ["FORMAT", "write", "read", "read_metadata", "saved_hparams", "hparam_changes", "save_learner",
           "SavedLearner", "read_learner", "restore_"]
