"""accelerate's FSDP2 plugin path with a guarded optimizer: 2 gloo processes on the CPU.

A user script does ``mask.apply_(unet)``, builds ``fg.guard`` (an ``fg.optim.AdamW``) and hands both
to ``accelerator.prepare`` with ``FullyShardedDataParallelPlugin(fsdp_version=2)``. accelerate then
calls ``fully_shard`` on the model and swaps the optimizer's parameters for the sharded DTensors.
The test checks that the frozen tensors stay bit-identical and get no state, and that the
trainable ones equal a one-process run.

accelerate (1.15) turns its FSDP plugin on only for accelerator devices (GPU, XPU, ...). On the
CPU it falls back to DDP (``DistributedType.MULTI_CPU``) and ignores the plugin. So the workers set
``AcceleratorState.distributed_type = FSDP`` themselves. After that, ``prepare`` runs accelerate's
own FSDP2 code: ``fsdp2_prepare_model`` and the optimizer parameter switch. That code is what this
test exercises.
"""
from __future__ import annotations

import os

import pytest
import torch
from support.gloo import end_worker, free_port, linear_stack, regression_pair

import freezeguard as fg

accelerate = pytest.importorskip("accelerate")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard") or not torch.distributed.is_available():
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)
try:
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    FullyShardedDataParallelPlugin(fsdp_version=2)
except (ImportError, TypeError, ValueError) as exc:  # an accelerate without FSDP2 support
    pytest.skip(f"this accelerate has no FSDP2 plugin: {exc}", allow_module_level=True)

FROZEN = ["1.weight", "2.bias"]
STEPS = 3


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    accelerator = accelerate.Accelerator(cpu=True)
    try:
        # See the module docstring: on the CPU accelerate would ignore the plugin.
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="size_based_wrap", min_num_params=10)
        model = linear_stack()
        mask = fg.FreezeMask.from_names(model, FROZEN)
        mask.apply_(model)  # before prepare, as for DDP
        opt = fg.guard(model, mask, lr=1e-2, weight_decay=1e-2)  # an fg.optim.AdamW
        model, opt = accelerator.prepare(model, opt)
        params = dict(model.named_parameters())
        sharded = all(isinstance(p, torch.distributed.tensor.DTensor) for p in params.values())
        for s in range(STEPS):  # every rank trains on the same batch: the averaged gradient is its own
            x, y = regression_pair(s, 4)
            opt.zero_grad(set_to_none=True)
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            opt.step()
        inner = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps ours
        result = {
            "sharded": sharded,
            "full": {n: p.full_tensor().detach().clone() for n, p in params.items()},
            "with_state": sorted(n for n, p in params.items() if inner.state.get(p)),
        }
        torch.save(result, f"{out}.{rank}")
        torch.distributed.barrier()  # before destroy_process_group, or teardown can abort the worker
    finally:
        torch.distributed.destroy_process_group()
    end_worker()


def test_accelerate_fsdp2_plugin_keeps_frozen_tensors_and_matches_one_process(tmp_path):
    world = 2
    out = str(tmp_path / "result")
    torch.multiprocessing.spawn(_worker, args=(world, free_port(), out), nprocs=world, join=True)

    model = linear_stack()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for n, p in model.named_parameters() if n not in FROZEN]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=1e-2)
    for n, p in model.named_parameters():
        p.requires_grad_(n not in FROZEN)
    for s in range(STEPS):
        x, y = regression_pair(s, 4)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for rank in range(world):
        res = torch.load(f"{out}.{rank}")
        assert res["sharded"], "accelerate did not shard the model: the FSDP2 path was not exercised"
        assert res["with_state"] == sorted(set(initial) - set(FROZEN))
        for n, p in model.named_parameters():
            if n in FROZEN:
                assert torch.equal(res["full"][n], initial[n]), n
            else:
                assert not torch.equal(res["full"][n], initial[n]), n
            torch.testing.assert_close(res["full"][n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)
