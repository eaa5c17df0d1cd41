"""The memory model (freezeguard.apps.memory_model, RESULTS.md "Memory model") against what the code allocates.

- One process, tiny configs of each family: the bytes the CPU allocator hands out (torch profiler,
  net of frees) during the first guarded optimizer step equal the formula's AdamW state; the
  gradients a backward leaves equal the formula's gradients; constructing the MaskLearner
  allocates exactly Δ + logits (+ the user's moments with AdamW); a learner step holds one
  gradient per tensor (the formula's grads, a peak: the learner drops them after the update).
- Two gloo processes under FSDP2 ``fully_shard``: each rank's local shards of weights, gradients
  and AdamW state equal the formula at world size 2 for that rank; so do the sharded MaskLearner's
  live weights, Delta, gradients and user moments (and its replicated per-tensor numbers).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile

pytest.importorskip("diffusers")

from support.gloo import end_worker, free_port

import freezeguard as fg  # noqa: E402
from freezeguard.apps.memory_model import guarded_bytes, largest_unit_bytes, learner_bytes, memory_rows, shard_numel  # noqa: E402
from freezeguard.integrations.diffusers.loss import make_loss_fn  # noqa: E402
from freezeguard.integrations.diffusers.models import FAMILIES, get_family  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _net_allocated(fn):
    """(bytes allocated minus bytes freed on the CPU while ``fn`` ran, its result)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return sum(e.self_cpu_memory_usage for e in prof.events()), out


def _batch(fam, model, bsz=2):
    gen = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(bsz, fam.latent_channels(model), 8, 8, generator=gen),
            **fam.conditioning(model, bsz, generator=gen), "is_target": torch.tensor([True, False] * (bsz // 2)),
            "generator": gen}


def _layout(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_shard_arithmetic():
    assert [shard_numel((5, 3), 2, r) for r in range(2)] == [9, 6]
    assert [shard_numel((3,), 4, r) for r in range(4)] == [1, 1, 1, 0]  # torch.chunk: the last rank gets none
    assert shard_numel((7, 2, 2), 1) == 28 and shard_numel((), 8) == 1
    lay = {"a": (4, 3), "b": (5,)}
    assert guarded_bytes(lay, {"b"}) == {"weights": 68, "grads": 48, "optimizer_state": 100, "total": 216}
    assert learner_bytes(lay, user_optimizer="adamw")["user_moments"] == 2 * 17 * 4
    assert largest_unit_bytes({"blocks.0.w": (10,), "blocks.1.w": (12,), "x": (5,)}) == ("blocks.1", 48)
    with pytest.raises(ValueError, match="not in the layout"):
        guarded_bytes(lay, {"c"})


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_guarded_step_allocates_what_the_formula_says(name):
    fam = get_family(name)
    model = fam.build("tiny")
    mask = fg.FreezeMask.random(model, ratio=0.4, by="params", seed=2)
    want = guarded_bytes(_layout(model), mask.frozen_names)
    opt = fg.guard(model, mask, lr=1e-3)
    loss_fn = make_loss_fn(fam.scheduler())
    batch = _batch(fam, model)
    assert want["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())

    def fwd_bwd():
        loss_fn(model, batch).mean().backward()

    grads, _ = _net_allocated(fwd_bwd)  # activations and temporaries are freed again by the end
    assert grads == want["grads"] == sum(p.grad.numel() * 4 for p in model.parameters() if p.grad is not None)
    state, _ = _net_allocated(opt.step)  # the first step creates the AdamW state
    assert state == want["optimizer_state"]
    full_state, _ = _net_allocated(lambda: fg.guard(model, fg.FreezeMask.from_names(model, []), lr=1e-3))
    assert full_state == 0  # state is created lazily, by the step
    assert want["optimizer_state"] < guarded_bytes(_layout(model), ())["optimizer_state"]


@pytest.mark.parametrize("user_optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_learner_allocates_what_the_formula_says(name, user_optimizer):
    fam = get_family(name)
    model = fam.build("tiny")
    pre = {k: v.detach().clone() for k, v in model.named_parameters()}
    ft = {k: v + 0.01 for k, v in pre.items()}
    want = learner_bytes(_layout(model), user_optimizer=user_optimizer)
    loss_fn = make_loss_fn(fam.scheduler())
    built, learner = _net_allocated(lambda: fg.MaskLearner(model, pre, ft, loss_fn,
                                                           freeze_ratio=0.3, user_optimizer=user_optimizer,
                                                           user_interval=2))
    assert built == want["delta"] + want["logits"] + want["user_moments"]
    assert want["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())
    seen: dict[str, int] = {}
    for n, p in model.named_parameters():  # the gradient each tensor holds when the fused update runs
        p.register_post_accumulate_grad_hook(lambda p, n=n: seen.__setitem__(n, p.grad.numel() * p.grad.element_size()))
    stepped, _ = _net_allocated(lambda: learner.step(_batch(fam, model)))
    assert sum(seen.values()) == want["grads"] and len(seen) == len(_layout(model))
    assert stepped == 0  # the learner drops the gradients after each step: nothing else stays


def test_flux_rows_of_results_md():
    rows = memory_rows("flux", world_sizes=(8, 64), ratios=(0.0, 0.5))
    by = {(r["kind"], r["world_size"], r.get("ratio")): r for r in rows}
    full8 = by[("guarded", 8, 0.0)]
    # 11,901,408,320 fp32 parameters over 8 ranks; rank 0 holds ceil(d0 / 8) rows of each tensor
    assert 11_901_408_320 * 4 / 8 <= full8["weights"] <= 11_901_408_320 * 4 / 8 * 1.001
    assert full8["optimizer_state"] == 2 * full8["grads"] + 4 * 1160
    half = by[("guarded", 8, 0.5)]
    assert abs(half["grads"] / full8["grads"] - 0.5) < 0.01 and half["weights"] == full8["weights"]
    learner = by[("learner (adamw user)", 64, None)]
    assert learner["total"] == 5 * learner["weights"] + learner["logits"]


# -- FSDP2, two gloo ranks -------------------------------------------------------------------------
WORLD = 2


def _local_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def _shard_units(model: torch.nn.Module, layout) -> None:
    """``fully_shard`` each unit of the usual recipe (``apps.memory_model.unit_of``: the numbered
    blocks), then the root, as the memory model assumes."""
    from torch.distributed.fsdp import fully_shard

    from freezeguard.apps.memory_model import unit_of

    for u in sorted({unit_of(n) for n in layout} - {""}):
        fully_shard(model.get_submodule(u))
    fully_shard(model)


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    try:
        for name in ("sd3", "flux"):
            fam = get_family(name)
            model = fam.build("tiny", seed=0)
            lay = _layout(model)
            mask = fg.FreezeMask.random(model, ratio=0.4, by="params", seed=2)
            mask.apply_(model)  # before fully_shard
            _shard_units(model, lay)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            batch = _batch(fam, model, bsz=2)
            make_loss_fn(fam.scheduler())(model, batch).mean().backward()
            opt.step()
            results[name] = {
                "got": {"weights": sum(_local_bytes(p) for p in model.parameters()),
                        "grads": sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None),
                        "optimizer_state": sum(_local_bytes(v) for s in opt.state.values() for v in s.values())},
                "want": guarded_bytes(lay, mask.frozen_names, world_size=WORLD, rank=rank),
            }
        # odd first dimensions: uneven shards, and a rank with none (torch.chunk of 3 or 1 rows)
        torch.manual_seed(0)
        odd = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3), torch.nn.Linear(3, 1))
        lay = _layout(odd)
        mask = fg.FreezeMask.from_names(odd, ["2.weight"])
        mask.apply_(odd)
        for i in (0, 2, 3):
            fully_shard(odd[i])
        fully_shard(odd)
        opt = torch.optim.AdamW([p for p in odd.parameters() if p.requires_grad], lr=1e-3)
        odd(torch.randn(4, 5)).sum().backward()
        opt.step()
        results["odd"] = {
            "got": {"weights": sum(_local_bytes(p) for p in odd.parameters()),
                    "grads": sum(_local_bytes(p.grad) for p in odd.parameters() if p.grad is not None),
                    "optimizer_state": sum(_local_bytes(v) for s in opt.state.values() for v in s.values())},
            "want": guarded_bytes(lay, mask.frozen_names, world_size=WORLD, rank=rank),
        }
        # The MaskLearner on a sharded tiny Flux (AdamW user): its local Delta, moments, live
        # weights and the gradients backward leaves it, against learner_bytes at world size 2.
        fam = get_family("flux")
        model = fam.build("tiny", seed=0)
        lay = _layout(model)
        pre = {k: v.detach().clone() for k, v in model.named_parameters()}
        ft = {k: v + 0.01 for k, v in pre.items()}
        _shard_units(model, lay)
        loss_fn = make_loss_fn(fam.scheduler())
        learner = fg.MaskLearner(model, pre, ft, loss_fn, freeze_ratio=0.3, user_optimizer="adamw")
        loss_fn(model, _batch(fam, model)).mean().backward()
        results["flux learner"] = {
            "got": {"weights": sum(_local_bytes(p) for p in model.parameters()),
                    "delta": sum(_local_bytes(d) for d in learner._delta),
                    "grads": sum(_local_bytes(p.grad) for p in model.parameters()),
                    "user_moments": sum(_local_bytes(m) for m in learner._exp_avg + learner._exp_avg_sq),
                    "logits": sum(_local_bytes(t) for t in (learner.logits, learner._weights, learner._initial,
                                                             learner._signal))},
            "want": {k: v for k, v in learner_bytes(lay, world_size=WORLD, rank=rank, user_optimizer="adamw").items()
                     if k != "total"},
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    end_worker()


def test_fsdp2_local_shards_match_the_formula(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    mp.spawn(_fsdp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, r in res.items():
            for key, got in r["got"].items():
                assert got == r["want"][key], f"{name} rank {rank} {key}: {got} != {r['want'][key]}"
