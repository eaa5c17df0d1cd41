"""Memory model: bytes per GPU of guarded fine-tuning and of the MaskLearner, from a layout.

Everything here is arithmetic on a model *layout* (parameter name -> shape, e.g. from the meta
device: :func:`freezeguard.integrations.diffusers.models.layout`), so a 12B Flux is costed
without allocating it. The formulas are the allocations the code makes:

Guarded fine-tuning (``fg.guard`` / ``fg.optim.AdamW``; the same for ``torch.optim.AdamW`` over
the trainable tensors), per tensor i of n_i elements:

- weights: every tensor, frozen or not: n_i * param_bytes;
- gradients: trainable tensors only (frozen ones have ``requires_grad=False``): n_i * grad_bytes;
- AdamW state: trainable tensors only: exp_avg + exp_avg_sq (2 * n_i * moment_bytes) and one
  fp32 step counter (4 bytes) per tensor.

Full fine-tuning is the same with nothing frozen. The MaskLearner (``fg.MaskLearner``) keeps,
for *every* tensor: the live weights theta, Delta = theta_pre - theta_ft (same dtype), a gradient,
with ``user_optimizer="adamw"`` two moments; and per tensor four fp32 numbers: the logit, the
budget weight, the initial logit (what "moved" is measured from) and the accumulated data signal.

Sharding. Under FSDP2 full sharding (``torch.distributed.fsdp.fully_shard``) each tensor is cut
along dim 0 into ``world_size`` chunks of ceil(d0 / W) rows (``torch.chunk``; the last ranks get
fewer or none) and every per-element figure above is per rank of its local shard: rank 0 holds
the largest shard, which the tables report. The logits (one float per tensor) are replicated.
Not counted: activations (they depend on batch and resolution), the transient unsharded
parameters and gradients of the FSDP unit being computed (:func:`largest_unit_bytes` gives that
working set), communication buffers and allocator slack.

Run (the RESULTS.md table):
    python -m freezeguard.apps.memory_model --model flux --world-sizes 8,64

Example:
    >>> from freezeguard.apps.memory_model import guarded_bytes
    >>> lay = {"a": (4, 3), "b": (5,)}
    >>> guarded_bytes(lay, frozen={"b"})["grads"], guarded_bytes(lay, frozen={"b"}, world_size=2)["grads"]
    (48, 24)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Iterable, Mapping, Sequence

from freezeguard.core.mask import FreezeMask
from freezeguard.integrations.diffusers.models import get_family

Layout = Mapping[str, Sequence[int]]
STEP_BYTES = 4  # the per-tensor fp32 step counter of fg.optim.AdamW and torch.optim.AdamW

# Precision recipes: bytes per element of (sharded) weights, gradients and each AdamW moment.
PRECISIONS: dict[str, dict[str, int]] = {
    # FSDP2 MixedPrecisionPolicy(param_dtype=bf16): sharded weights, grads and moments stay fp32
    "fp32": dict(param_bytes=4, grad_bytes=4, moment_bytes=4),
    # weights, gradients and moments all kept in bf16
    "bf16": dict(param_bytes=2, grad_bytes=2, moment_bytes=2),
}


def shard_numel(shape: Sequence[int], world_size: int = 1, rank: int = 0) -> int:
    """Elements of ``rank``'s dim-0 shard of a tensor of ``shape`` (FSDP2's torch.chunk split)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got {world_size}, {rank}")
    shape = tuple(int(s) for s in shape)
    if not shape:  # a 0-dim tensor is not split: FSDP2 refuses them; count it whole on every rank
        return 1
    rest = math.prod(shape[1:])
    rows = -(-shape[0] // world_size)
    mine = max(0, min(rows, shape[0] - rank * rows))
    return mine * rest


def _numels(layout: Layout, world_size: int, rank: int) -> dict[str, int]:
    return {n: shard_numel(s, world_size, rank) for n, s in layout.items()}


def guarded_bytes(layout: Layout, frozen: Iterable[str] = (), *, world_size: int = 1, rank: int = 0,
                  param_bytes: int = 4, grad_bytes: int = 4, moment_bytes: int = 4,
                  buffer_bytes: int = 0) -> dict[str, int]:
    """Bytes on ``rank`` of weights, gradients and AdamW state for fine-tuning with ``frozen`` frozen.

    ``buffer_bytes``: the model's buffers (e.g. SD3's positional table), replicated on every rank
    (FSDP2 does not shard buffers); counted in the total when given.
    """
    frozen = set(frozen)
    unknown = frozen - set(layout)
    if unknown:
        raise ValueError(f"frozen names not in the layout: {sorted(unknown)[:5]}")
    numel = _numels(layout, world_size, rank)
    trainable = [n for n in layout if n not in frozen]
    t_numel = sum(numel[n] for n in trainable)
    out = {"weights": sum(numel.values()) * param_bytes,
           "grads": t_numel * grad_bytes,
           "optimizer_state": 2 * t_numel * moment_bytes + STEP_BYTES * len(trainable)}
    if buffer_bytes:
        out["buffers"] = int(buffer_bytes)
    out["total"] = sum(out.values())
    return out


def learner_bytes(layout: Layout, *, world_size: int = 1, rank: int = 0, param_bytes: int = 4,
                  user_optimizer: str = "sgd", buffer_bytes: int = 0) -> dict[str, int]:
    """Bytes on ``rank`` of the MaskLearner: live weights, Delta, gradients, logits, user moments."""
    if user_optimizer not in ("sgd", "adamw"):
        raise ValueError(f"user_optimizer must be 'sgd' or 'adamw', got {user_optimizer!r}")
    elems = sum(_numels(layout, world_size, rank).values())
    out = {"weights": elems * param_bytes, "delta": elems * param_bytes, "grads": elems * param_bytes,
           # per tensor, replicated: fp32 logit, budget weight, initial logit, accumulated signal
           "logits": 4 * 4 * len(layout),
           "user_moments": 2 * elems * param_bytes if user_optimizer == "adamw" else 0}
    if buffer_bytes:
        out["buffers"] = int(buffer_bytes)
    out["total"] = sum(out.values())
    return out


def unit_of(name: str) -> str:
    """The FSDP unit of a parameter in the usual recipe: one per numbered block, the rest in the root."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    return ""


def largest_unit_bytes(layout: Layout, *, param_bytes: int = 4) -> tuple[str, int]:
    """The FSDP unit with the most elements and its unsharded size in bytes (gathered for compute)."""
    units: dict[str, int] = {}
    for n, s in layout.items():
        units[unit_of(n)] = units.get(unit_of(n), 0) + math.prod(int(x) for x in s)
    name = max(units, key=units.get)
    return name or "(root)", units[name] * param_bytes


def memory_rows(family: str | Any, *, world_sizes: Sequence[int] = (1,),
                ratios: Sequence[float] = (0.0, 0.3, 0.5, 0.7), by: str = "params", precision: str = "fp32",
                seed: int = 0, masks: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per (world size, frozen ratio) for guarded fine-tuning, plus the learner rows.

    ``family`` is a family name (its full-size model is built on the meta device) or a model
    (meta or real; only names and shapes are read). Masks are ``FreezeMask.random(ratio, by,
    seed)`` (a learned mask of the same ratio by params costs the same, up to shard rounding);
    ``masks`` adds named masks (e.g. a learned one) as rows of their own.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    prec = PRECISIONS[precision]
    if isinstance(family, str):
        model = get_family(family).build("full", device="meta")
    else:
        model, family = family, type(family).__name__
    lay = {n: tuple(p.shape) for n, p in model.named_parameters()}
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    todo = [(f"{r:g}", r, FreezeMask.random(model, ratio=r, by=by, seed=seed)) for r in ratios]
    todo += [(label, None, m) for label, m in (masks or {}).items()]
    rows: list[dict[str, Any]] = []
    for w in world_sizes:
        full = guarded_bytes(lay, (), world_size=w, buffer_bytes=buffers, **prec)
        for label, r, mask in todo:
            g = guarded_bytes(lay, mask.frozen_names, world_size=w, buffer_bytes=buffers, **prec)
            rows.append(dict(kind="guarded", family=family, world_size=w, ratio=r, by=by, mask=label,
                             precision=precision, tensors=len(lay),
                             frozen_ratio_tensors=mask.ratio("tensors"), frozen_ratio_params=mask.ratio("params"),
                             frozen_tensors=len(mask.frozen_names), **g, saved=full["total"] - g["total"],
                             saved_grads_state=(full["grads"] + full["optimizer_state"])
                             - (g["grads"] + g["optimizer_state"])))
        for uo in ("sgd", "adamw"):
            rows.append(dict(kind=f"learner ({uo} user)", family=family, world_size=w, precision=precision,
                             **learner_bytes(lay, world_size=w, param_bytes=prec["param_bytes"], user_optimizer=uo,
                                             buffer_bytes=buffers)))
    unit, unit_b = largest_unit_bytes(lay, param_bytes=prec["param_bytes"])
    for row in rows:
        row["largest_unit"], row["largest_unit_bytes"] = unit, unit_b
    return rows


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f}"


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Markdown: GiB per GPU (rank 0, the largest shard)."""
    lines = ["| GPUs | configuration | weights | Δ | grads | AdamW state / user moments | logits | total "
             "| saved vs full |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "guarded":
            if r["ratio"] is None:
                name = f"guarded, mask {r['mask']} ({r['frozen_tensors']} tensors)"
            elif r["ratio"] == 0:
                name = "full fine-tune"
            else:
                name = f"guarded, {r['ratio']:.0%} frozen by {r['by']} ({r['frozen_tensors']} tensors)"
            lines.append(f"| {r['world_size']} | {name} | {_gib(r['weights'])} | - | {_gib(r['grads'])} "
                         f"| {_gib(r['optimizer_state'])} | - | {_gib(r['total'])} | {_gib(r['saved'])} |")
        else:
            lines.append(f"| {r['world_size']} | {r['kind']} | {_gib(r['weights'])} | {_gib(r['delta'])} "
                         f"| {_gib(r['grads'])} | {_gib(r['user_moments'])} | {r['logits'] / 2**10:.1f} KiB "
                         f"| {_gib(r['total'])} | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m freezeguard.apps.memory_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="flux", help="model family: sd15, sd21, sdxl, sd3, flux")
    p.add_argument("--world-sizes", default="1,8,64", help="comma-separated GPU counts (FSDP2 full sharding)")
    p.add_argument("--ratios", default="0,0.3,0.5,0.7", help="comma-separated frozen ratios")
    p.add_argument("--by", default="params", choices=("tensors", "params"))
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS))
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    rows = memory_rows(a.model, world_sizes=[int(w) for w in a.world_sizes.split(",") if w],
                       ratios=[float(r) for r in a.ratios.split(",") if r], by=a.by, precision=a.precision)
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        r0 = rows[0]
        buf = f"; totals include {r0['buffers'] / 2**20:.0f} MiB of replicated buffers" if r0.get("buffers") else ""
        print(f"{a.model}: GiB per GPU on rank 0 (largest shard), {a.precision} weights/grads/moments; "
              f"largest FSDP unit {r0['largest_unit']} gathers {_gib(r0['largest_unit_bytes'])} GiB unsharded{buf}")
        print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
