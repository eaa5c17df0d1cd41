"""Several processes, one mask: average gradients, keep logits identical on every rank.

Under DDP (or accelerate, which wraps the model in DDP) backward already averages gradients.
A plain model under an initialized process group gets them averaged here, in buckets, before
the fused updates, so every rank applies the same update and stays identical.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) the parameters are DTensors and the
learner works on their local shards: :func:`sharding` checks the layout once, :func:`local`
gives a shard (a view: writes land in the parameter), :func:`shard_of` cuts a rank's shard out
of a full tensor exactly as the parameter is cut, and :func:`gather` puts shards back together.

How the learner uses this: wrap the model in DDP (or ``accelerator.prepare``) and backward
averages the gradients; a plain model under an initialized process group has them averaged here.
Either way all ranks apply the same updates and stay identical (logits start from rank 0's).
Under FSDP2 (``fully_shard`` on the blocks and the root before the learner is built; every
parameter then a DTensor placed ``Shard(dim)`` or ``Replicate()`` on a mesh over all ranks,
else a ValueError up front) the learner works on local shards: Delta and the AdamW moments are
cut like the parameters, the fused ops update each rank's shard of the live weights in place,
and backward's reduce-scatter has already averaged the gradients. The per-tensor s = <Delta, g>
are partial sums on each rank, completed by one all-reduce of N floats per releaser batch (a
non-finite gradient anywhere makes s non-finite everywhere, so every rank stops with the same
error); user steps with ``check_finite`` all-reduce the N per-tensor sums of g^2 alike. Every step's
loss statistics are all-reduced before backward, so a non-finite loss on one rank stops all
ranks too. Logits, hard mask and history are identical on every rank, and the run equals one
process's up to float rounding (tests/test_learner_fsdp2.py). ``save`` is then collective:
every rank calls it, the shards are gathered and rank 0 writes the file one process would
write (``load`` resumes it at any world size; ``apps.learn.state_io``).

The learner's step goes through here for everything that differs between one process, DDP and
FSDP2: :func:`loss_stats` (the batch's loss sums over the global batch), :func:`gradients` (the
gradients every rank reduces alike, averaged or reduce-scattered), :func:`live_weights` (the
parameters' storage the fused ops write) and :func:`complete_sums` (per-tensor sums completed
over shards).

Example:
    >>> import torch
    >>> world_size()
    1
    >>> unwrap(torch.nn.Linear(2, 2)).__class__.__name__
    'Linear'
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from freezeguard.core.optim.plan import is_dtensor

_BUCKET_BYTES = 64 << 20  # bounds the temporary flat copy made for each all-reduce


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return dist.get_rank() == 0 if world_size() > 1 else True


def is_ddp(model: torch.nn.Module) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameter names are the model's own (no "module." / "_orig_mod." prefix)."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def searched_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs of ``unwrap(model)``, every one set to require grad: the learner
    searches over every tensor, as the reference does. Under DDP they must require grad before the
    model is wrapped (DDP reduces only the gradients of those that did): a ValueError names the others."""
    named = list(unwrap(model).named_parameters())
    if not named:
        raise ValueError("the model has no parameters to mask")
    frozen = [n for n, p in named if not p.requires_grad]
    if frozen:
        if is_ddp(model):
            raise ValueError("every parameter must require grad before the model is wrapped in DDP; "
                             f"these do not: {', '.join(frozen[:8])}")
        for _, p in named:
            p.requires_grad_(True)
    return named


@torch.no_grad()
def average_(tensors: list[torch.Tensor]) -> None:
    """All-reduce (mean) the tensors across ranks, in place, one flat bucket at a time."""
    ws = world_size()
    if ws == 1 or not tensors:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in group + [None]:
            if t is not None:
                bucket.append(t)
                size += t.numel() * t.element_size()
            if bucket and (t is None or size >= _BUCKET_BYTES):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat)
                flat.div_(ws)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = [], 0


@torch.no_grad()
def broadcast_(tensor: torch.Tensor, src: int = 0) -> None:
    if world_size() > 1:
        dist.broadcast(tensor, src)


@torch.no_grad()
def sum_(tensor: torch.Tensor) -> None:
    """All-reduce (sum) one tensor across ranks, in place."""
    if world_size() > 1:
        dist.all_reduce(tensor)


# FSDP2 ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sharding:
    """How the learner reduces over DTensor parameters (FSDP2): each rank holds local shards.

    ``keep``: None when every tensor is sharded over all ranks (each element lives on exactly
    one rank, so per-rank partial sums add up to the full sum); else [N] floats, 1 where this
    rank's shard counts and 0 where another rank holds the same (replicated) data, so that a sum
    over ranks counts every element once.
    """

    keep: torch.Tensor | None


def sharding(names: Sequence[str], params: Sequence[torch.Tensor]) -> Sharding | None:
    """None for plain parameters; for DTensors (FSDP2) the :class:`Sharding`, checked up front.

    Every parameter must be a DTensor on a device mesh spanning all ranks, each mesh dimension
    placed as ``Shard(dim)`` or ``Replicate()``; anything else (plain and DTensor parameters
    mixed, ``Partial``, a strided shard, a mesh over part of the ranks) is a ValueError naming
    the tensor.
    """
    flags = [is_dtensor(p) for p in params]
    if not any(flags):
        return None
    if not all(flags):
        plain = [n for n, f in zip(names, flags, strict=True) if not f]
        raise ValueError("the model mixes plain and DTensor (FSDP2) parameters; shard every parameter "
                         f"(fully_shard the root module too) or none: plain: {', '.join(plain[:8])}")
    from torch.distributed.tensor import Replicate, Shard

    world = world_size()
    keep: list[float] = []
    for name, p in zip(names, params, strict=True):
        mesh = p.device_mesh
        if mesh.size() != world:
            raise ValueError(f"{name}: its device mesh has {mesh.size()} ranks but the process group "
                             f"has {world}; the learner reduces over all ranks")
        kept = True
        for dim, placement in enumerate(p.placements):
            if type(placement) is Replicate:
                kept = kept and mesh.get_local_rank(dim) == 0
            elif type(placement) is not Shard:
                raise ValueError(f"{name}: placement {placement!r} is not supported by the learner "
                                 "(only Shard(dim) and Replicate(), as FSDP2 and HSDP place parameters)")
        keep.append(1.0 if kept else 0.0)
    device = local(params[0]).device
    return Sharding(None if world == 1 or all(k == 1.0 for k in keep)
                    else torch.tensor(keep, dtype=torch.float32, device=device))


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard as a plain tensor sharing its storage (in-place writes land in the
    parameter); a plain tensor detached."""
    with torch.no_grad():
        return t.to_local().detach() if is_dtensor(t) else t.detach()


def shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``full`` cut as the DTensor ``like`` is cut (no communication: every
    rank holds ``full``); ``full`` itself when ``like`` is a plain tensor."""
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    full = full.to(local(like).device)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def gather(shard: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full tensor of ``shard``, this rank's piece of a tensor laid out as the DTensor ``like``
    (a collective: every rank must call it); ``shard`` itself when ``like`` is a plain tensor."""
    if not is_dtensor(like):
        return shard
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(shard, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()


# The learner's step on one process, DDP or FSDP2 ------------------------------------------------
def live_weights(params: Sequence[torch.Tensor], sharding_: Sharding | None) -> list[torch.Tensor]:
    """Detached aliases of the parameters (their local shards under FSDP2) that the fused ops
    write in place. Take them afresh each step: FSDP2 may re-pad a shard's storage on its first
    forward (lazy init), so a view kept from before could point at the old one."""
    if sharding_ is None:
        return [p.detach() for p in params]
    return [local(p) for p in params]


@torch.no_grad()
def loss_stats(stats: torch.Tensor) -> torch.Tensor:
    """[sum_target, n_target, sum_innocent, n_innocent, objective, n_bad] summed over ranks, the
    objective averaged: the losses of the global batch, and every rank sees a bad loss anywhere."""
    if world_size() > 1:
        dist.all_reduce(stats)
        stats[4] /= world_size()
    return stats


def gradients(model: torch.nn.Module, names: Sequence[str], params: Sequence[torch.Tensor],
              sharding_: Sharding | None, *, check_layout: bool) -> tuple[list[int], list[torch.Tensor]]:
    """(indices, gradients) of the parameters that received a gradient after backward, reduced
    across ranks: averaged here for a plain model under a process group, already averaged by
    DDP, and under FSDP2 the local shards of what backward reduce-scattered. Several ranks
    reduce the same list (a tensor unused on this rank may be used on another: it gets zeros).
    ``check_layout`` (once, FSDP2): every gradient must be placed as its parameter is."""
    world = world_size()
    if world > 1 or sharding_ is not None:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    present = [i for i, p in enumerate(params) if p.grad is not None]
    grads = [params[i].grad for i in present]
    if sharding_ is not None:
        if check_layout:
            bad = [names[i] for i, g in zip(present, grads, strict=True)
                   if tuple(g.placements) != tuple(params[i].placements)]
            if bad:
                raise ValueError("gradients placed unlike their DTensor parameters (the learner needs them "
                                 f"reduced as FSDP2 does): {', '.join(bad[:8])}")
        grads = [local(g) for g in grads]
    elif world > 1 and not is_ddp(model):
        average_(grads)
    return present, grads


def complete_sums(partial: torch.Tensor, sharding_: Sharding | None) -> torch.Tensor:
    """Per-tensor sums (e.g. s = <Delta, g>) completed over the shards: under FSDP2 each rank's
    covers its shards and one all-reduce (sum) of N floats completes them, replicated data counted
    once. A non-finite value on any rank makes the sum non-finite on every rank, so a finiteness
    check after it stops them all alike. ``partial`` itself without FSDP2."""
    if sharding_ is None:
        return partial
    if sharding_.keep is not None:
        partial = partial * sharding_.keep
    sum_(partial)
    return partial


__all__ = ["world_size", "is_main_process", "is_ddp", "unwrap", "searched_parameters", "average_", "broadcast_",
           "sum_", "Sharding", "sharding", "local", "shard_of", "gather", "live_weights", "loss_stats", "gradients", "complete_sums"]
