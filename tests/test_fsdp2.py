"""fg.optim.AdamW under FSDP2 (``fully_shard``): DTensor parameters, 2 gloo processes on the CPU.

The fused op runs on each rank's local shards; frozen tensors own no state on any rank and stay
bit-identical; the sharded run equals the single-process run; ``fg.verify`` passes the state dict
gathered on every rank (``full_tensor()``) against the released weights and the mask, and catches
a frozen tensor changed in it. A DTensor handed to a fused op
directly is refused with an error naming it (never a crash inside a native kernel).
"""
from __future__ import annotations

import os

import pytest
import torch
from support.gloo import end_worker, free_port, linear_stack, regression_pair

import freezeguard as fg

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard") or not torch.distributed.is_available():
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

FROZEN = ["1.weight", "2.bias"]
STEPS = 4


def _train(model, opt, rank=0, world=1):
    for s in range(STEPS):
        x, y = regression_pair(s, 8)
        n = x.shape[0] // world
        x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]  # equal halves: FSDP averages
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _optimizer(kind: str, model: torch.nn.Module, mask: fg.FreezeMask) -> torch.optim.Optimizer:
    if kind == "wrap":  # any torch optimizer, the mask enforced around it
        return fg.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2, foreach=False), mask, model)
    return fg.optim.AdamW(model.named_parameters(), lr=1e-2, weight_decay=1e-2, mask=mask)


def _worker(rank: int, world: int, port: int, backend: str, kind: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FREEZEGUARD_BACKEND=backend)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = linear_stack()
        released = {n: v.detach().clone() for n, v in model.state_dict().items()}
        mask = fg.FreezeMask.from_names(model, FROZEN)
        mask.apply_(model)  # before fully_shard, as the README says
        for layer in model:
            fsdp.fully_shard(layer)
        fsdp.fully_shard(model)
        named = dict(model.named_parameters())
        local_before = {n: named[n].to_local().clone() for n in FROZEN}
        opt = _optimizer(kind, model, mask)
        _train(model, opt, rank, world)
        # The state dict gathered on every rank (a collective), then audited as a release would be.
        gathered = {n: v.full_tensor().detach().clone() for n, v in model.state_dict().items()}
        report = fg.verify(released, gathered, mask)
        tampered = fg.verify(released, dict(gathered, **{FROZEN[0]: gathered[FROZEN[0]] + 1e-3}), mask)
        result = {
            "full": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
            "verify": (report.ok, report.checked, report.violations),
            "verify_tampered": (tampered.ok, [n for n, _ in tampered.violations]),
            "frozen_local_equal": all(torch.equal(named[n].to_local(), local_before[n]) for n in FROZEN),
            "frozen_with_state": [n for n in FROZEN if named[n] in opt.state and opt.state[named[n]]],
            "steps": {n: float(opt.state[p]["step"]) for n, p in named.items() if p in opt.state},
        }
        torch.save(result, f"{out}.{rank}")
        dist.barrier()  # before destroy_process_group, or teardown can abort the worker
    finally:
        dist.destroy_process_group()
    end_worker()


@pytest.mark.parametrize("backend,kind", [("cpp", "fg"), ("torch", "fg"), ("cpp", "wrap")])
def test_fsdp2_matches_one_process_and_keeps_frozen_tensors(backend, kind, tmp_path):
    from freezeguard.backends import status

    if not status(backend).available:
        pytest.skip(status(backend).reason)
    world = 2
    out = str(tmp_path / "result")
    torch.multiprocessing.spawn(_worker, args=(world, free_port(), backend, kind, out), nprocs=world, join=True)
    model = linear_stack()
    mask = fg.FreezeMask.from_names(model, FROZEN)
    mask.apply_(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = _optimizer(kind, model, mask)
    _train(model, opt)
    for rank in range(world):
        res = torch.load(f"{out}.{rank}")
        assert res["frozen_local_equal"] and res["frozen_with_state"] == []
        assert res["verify"] == (True, len(FROZEN), [])
        assert res["verify_tampered"] == (False, [FROZEN[0]])
        assert set(res["steps"]) == {n for n, _ in model.named_parameters()} - set(FROZEN)
        assert all(v == STEPS for v in res["steps"].values())
        for n, p in model.named_parameters():
            if n in FROZEN:
                assert torch.equal(res["full"][n], initial[n]), n
            torch.testing.assert_close(res["full"][n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)


def test_a_dtensor_never_reaches_a_native_kernel(monkeypatch):
    """Directly, without the optimizer: a clear TypeError on every backend (issue 16: it was SIGSEGV)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        d = distribute_tensor(torch.ones(4), mesh, [Shard(0)])
        for backend in ("torch", "cpp"):
            with pytest.raises(TypeError, match="DTensor"):
                fg.ops.masked_adamw_step_([d], [d], [torch.zeros(4)], [torch.zeros(4)], [torch.tensor(0.0)],
                                          lr=1e-3, backend=backend)
    finally:
        dist.destroy_process_group()
