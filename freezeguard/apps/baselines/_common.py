"""Pieces every baseline shares: input checks, attention-projection lookup, LoRA, cost, weight drift.

Example:
    >>> import torch
    >>> from freezeguard.apps.baselines._common import weight_change
    >>> m = torch.nn.Linear(2, 2)
    >>> weight_change({k: v.clone() for k, v in m.state_dict().items()}, m)["tensors_changed"]
    0
"""
from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from freezeguard.apps.process_memory import rss_bytes
from freezeguard.core.names import canonical_name

LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]

#: diffusers' LoRA training scripts (train_text_to_image_lora.py, IMMA's defend/train scripts) put
#: adapters on these four projections of every attention block.
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


# ---------------------------------------------------------------------------------------------
# input checks: a baseline should fail on bad input with a message naming the argument
# ---------------------------------------------------------------------------------------------
def check_module(model: Any, who: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(True for _ in model.parameters()):
        raise ValueError(f"{who}: model has no parameters")


def check_loss_fn(loss_fn: Any, who: str) -> None:
    if not callable(loss_fn):
        raise TypeError(f"{who}: loss_fn must be callable as loss_fn(model, batch) -> Tensor[B], "
                        f"got {type(loss_fn).__name__}")


def check_condition(cond: Any, name: str, who: str, dim: int | None = None) -> torch.Tensor:
    """A text condition: [L, D] (L tokens) or [D]; returned as float [L, D]."""
    if not isinstance(cond, torch.Tensor):
        raise TypeError(f"{who}: {name} must be a tensor [tokens, dim] or [dim], got {type(cond).__name__}")
    if cond.ndim == 1:
        cond = cond[None]
    if cond.ndim != 2 or cond.numel() == 0:
        raise ValueError(f"{who}: {name} must have shape [tokens, dim] or [dim], got {tuple(cond.shape)}")
    if not torch.isfinite(cond).all():
        raise ValueError(f"{who}: {name} has non-finite values")
    if dim is not None and cond.shape[-1] != dim:
        raise ValueError(f"{who}: {name} has dim {cond.shape[-1]}, but the model's cross-attention takes {dim}")
    return cond.detach().float()


def per_sample_losses(loss_fn: LossFn, model: nn.Module, batch: Mapping[str, Any], who: str) -> torch.Tensor:
    """``loss_fn(model, batch)`` with its contract checked (one finite-or-not value per sample)."""
    losses = loss_fn(model, batch)
    if not isinstance(losses, torch.Tensor) or losses.ndim != 1:
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"{who}: loss_fn must return per-sample losses of shape [B], got {shape}")
    return losses


def target_flags(batch: Mapping[str, Any], n: int | None, who: str) -> torch.Tensor:
    if "is_target" not in batch:
        raise ValueError(f"{who}: every batch needs batch['is_target'] (bool [B]: True = target sample)")
    flags = torch.as_tensor(batch["is_target"]).bool().reshape(-1)
    if n is not None and flags.numel() != n:
        raise ValueError(f"{who}: batch['is_target'] has {flags.numel()} entries for {n} losses")
    return flags


def next_batch(stream: Iterator[Mapping[str, Any]], who: str) -> dict[str, Any]:
    try:
        batch = next(stream)
    except StopIteration:
        raise ValueError(f"{who}: the data stream ran out; pass an endless iterator "
                         "(e.g. freezeguard.integrations.diffusers.toy.batches or itertools.cycle)") from None
    if not isinstance(batch, Mapping):
        raise TypeError(f"{who}: batches must be dicts, got {type(batch).__name__}")
    return dict(batch)


def as_iterator(stream: Any, who: str) -> Iterator[Mapping[str, Any]]:
    if isinstance(stream, Mapping) or not hasattr(stream, "__iter__"):
        raise TypeError(f"{who}: batches must be an iterator of batch dicts, got {type(stream).__name__}")
    return iter(stream)


# ---------------------------------------------------------------------------------------------
# where the methods act
# ---------------------------------------------------------------------------------------------
def cross_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Cross-attention blocks (diffusers ``Attention`` with ``is_cross_attention``), by name."""
    return [(n, m) for n, m in model.named_modules() if getattr(m, "is_cross_attention", False)]


def cross_attention_kv(model: nn.Module, keys: bool = True) -> list[tuple[str, nn.Linear]]:
    """The text-facing projections: ``to_v`` (and ``to_k``) of every cross-attention block.

    These are what UCE edits and what Concept Ablation's "cross-attn" parameter group trains.
    """
    out = []
    for name, attn in cross_attention_modules(model):
        for proj in (("to_k", "to_v") if keys else ("to_v",)):
            layer = getattr(attn, proj, None)
            if isinstance(layer, nn.Linear):
                out.append((f"{name}.{proj}", layer))
    return out


def attention_projection_names(model: nn.Module) -> list[str]:
    """Module names of every attention block's q/k/v/out projections (self- and cross-attention)."""
    names = []
    for name, module in model.named_modules():
        if hasattr(module, "is_cross_attention"):
            for proj in ATTENTION_PROJECTIONS:
                sub = module.get_submodule(proj) if _has_submodule(module, proj) else None
                if isinstance(sub, nn.Linear):
                    names.append(f"{name}.{proj}")
    return names


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


# ---------------------------------------------------------------------------------------------
# LoRA without a dependency (peft is optional in this project)
# ---------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """``base_layer(x) + scale * up(down(x))``, the low-rank adapter of diffusers' LoRA scripts.

    The attribute is called ``base_layer`` as in peft, so :func:`freezeguard.core.names.canonical_name`
    maps ``....to_k.base_layer.weight`` back to the released ``....to_k.weight``.
    Initialisation follows diffusers' ``LoRALinearLayer``: down ~ N(0, 1/rank), up = 0, so the
    adapted model starts equal to the base model.

    Example:
        >>> layer = LoRALinear(torch.nn.Linear(4, 3), rank=2)
        >>> layer(torch.ones(1, 4)).shape
        torch.Size([1, 3])
    """

    def __init__(self, base_layer: nn.Linear, rank: int = 4, alpha: float | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        self.lora_down = nn.Parameter(torch.empty(rank, base_layer.in_features, dtype=w.dtype).normal_(
            0.0, 1.0 / rank, generator=generator).to(w.device))
        self.lora_up = nn.Parameter(torch.zeros(base_layer.out_features, rank, dtype=w.dtype, device=w.device))
        self.scale = (alpha if alpha is not None else rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scale * (x @ self.lora_down.t() @ self.lora_up.t())


def add_lora(model: nn.Module, module_names: list[str], rank: int = 4, *, seed: int = 0) -> list[nn.Parameter]:
    """Wrap each named ``nn.Linear`` of ``model`` in place by a :class:`LoRALinear`; returns the adapter params.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> len(add_lora(m, ["0"], rank=2))
        2
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
    gen = torch.Generator().manual_seed(seed)
    params: list[nn.Parameter] = []
    for name in module_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child) if not child.isdigit() else parent[int(child)]
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"LoRA target {name!r} is {type(layer).__name__}, not nn.Linear")
        wrapped = LoRALinear(layer, rank, generator=gen)
        if child.isdigit():
            parent[int(child)] = wrapped
        else:
            setattr(parent, child, wrapped)
        params += [wrapped.lora_down, wrapped.lora_up]
    return params


# ---------------------------------------------------------------------------------------------
# the publisher's cost and how far the weights moved
# ---------------------------------------------------------------------------------------------
@dataclass
class Cost:
    """Wall time and peak memory of producing a protection.

    ``peak_bytes``: on CUDA, ``torch.cuda.max_memory_allocated`` during the call minus the
    allocation before it; on CPU, the peak resident set (sampled every few ms from
    /proc/self/statm) minus the resident set before it (``None`` where /proc is missing).

    Example:
        >>> Cost(seconds=1.5).to_json()["seconds"]
        1.5
    """

    seconds: float = 0.0
    peak_bytes: int | None = None
    peak_measure: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "peak_bytes": self.peak_bytes, "peak_measure": self.peak_measure,
                **self.extra}


def _rss_bytes() -> int | None:
    try:
        return rss_bytes()
    except (OSError, ValueError, IndexError):  # no /proc: the cost is reported without a peak
        return None


@contextmanager
def measure_cost(device: torch.device | str | None = None, interval_s: float = 0.005) -> Iterator[Cost]:
    """Time and peak memory of the enclosed block, filled into the yielded :class:`Cost` on exit.

    Example:
        >>> with measure_cost() as cost:
        ...     _ = torch.ones(1000).sum()
        >>> cost.seconds >= 0
        True
    """
    cost = Cost()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cuda = dev.type == "cuda" and torch.cuda.is_available()
    stop = threading.Event()
    peak = [0]
    start_rss = None
    sampler = None
    if cuda:
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        start_rss = _rss_bytes()
        if start_rss is not None:
            peak[0] = start_rss

            def sample() -> None:
                # The peak of a short call is easy to miss; a background sampler is the cheapest
                # way to see it without a profiler.
                while not stop.wait(interval_s):
                    rss = _rss_bytes()
                    if rss is not None and rss > peak[0]:
                        peak[0] = rss

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
    t0 = time.perf_counter()
    try:
        yield cost
    finally:
        if cuda:
            torch.cuda.synchronize(dev)
        cost.seconds = time.perf_counter() - t0
        if cuda:
            cost.peak_bytes = int(torch.cuda.max_memory_allocated(dev) - base)
            cost.peak_measure = "cuda max_memory_allocated delta"
        elif sampler is not None:
            stop.set()
            sampler.join()
            rss = _rss_bytes()
            cost.peak_bytes = int(max(peak[0], rss or 0) - start_rss)
            cost.peak_measure = "cpu peak RSS delta (sampled)"


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter, by name (θ_pre for :func:`weight_change`)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@torch.no_grad()
def weight_change(reference: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, Any]:
    """How far ``model``'s parameters moved from ``reference`` (θ_pre): relative L2, max |Δ|, counts.

    Names are matched after :func:`freezeguard.core.names.canonical_name`, so a LoRA-wrapped model
    compares its base weights (adapter parameters are not in θ_pre and are skipped).
    """
    diff_sq = ref_sq = 0.0
    max_abs = 0.0
    changed = changed_params = total_params = 0
    for name, p in model.named_parameters():
        ref = reference.get(name)
        if ref is None:
            ref = reference.get(canonical_name(name))
        if ref is None:
            continue
        d = (p.detach().double() - ref.to(p.device).double())
        diff_sq += float((d * d).sum())
        ref_sq += float((ref.double() ** 2).sum())
        total_params += p.numel()
        if d.numel() and bool((d != 0).any()):
            changed += 1
            changed_params += p.numel()
            max_abs = max(max_abs, float(d.abs().max()))
    return {"rel_l2": math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else 0.0, "max_abs": max_abs,
            "tensors_changed": changed, "params_changed_share": changed_params / max(total_params, 1)}
