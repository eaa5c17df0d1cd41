"""Two processes learn one mask: gradients averaged before the fused updates, ranks identical.

Two gloo processes on 127.0.0.1 (torch.multiprocessing.spawn), each on its half of every batch,
with the model plain (the learner all-reduces), wrapped in DDP or prepared by accelerate (both:
backward all-reduces). Both
ranks must end bitwise identical, and equal to one process learning on the whole batches.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from support.gloo import end_worker, free_port, global_batches, half, learner_states, regression_loss

import freezeguard as fg
import freezeguard.apps.learn.distributed  # noqa: F401
from freezeguard.apps.learn import distributed as learn_distributed

WORLD = 2
STEPS = 6
MODES = ("plain", "ddp", "accelerate")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


HP = dict(user_interval=3, user_lr=5e-2, mask_lr=10.0, freeze_ratio=0.3, backend="torch", seed=4)


def _run(model, pre, ft, batches):
    learner = fg.MaskLearner(model, pre, ft, regression_loss, **HP)
    logs = [learner.step(b) for b in batches]
    inner = learner.module
    out = {"logits": learner.logits.clone()}
    out.update({f"theta/{n}": p.detach().clone() for n, p in inner.named_parameters()})
    out.update({f"delta/{n}": d.clone() for n, d in zip(learner.names, learner._delta, strict=True)})
    return out, logs


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        pre, ft = learner_states(_model)
        shards = [half(b, rank) for b in global_batches(STEPS)]
        for mode in MODES:
            model = _model()
            if mode == "ddp":
                model = torch.nn.parallel.DistributedDataParallel(model)
            elif mode == "accelerate":
                from accelerate import Accelerator

                model = Accelerator(cpu=True).prepare(model)
                assert learn_distributed.is_ddp(model), type(model)
            out, logs = _run(model, pre, ft, shards)
            # Logged losses are over the global batch (reduced across ranks).
            out["target_losses"] = torch.tensor([e["target_loss"] for e in logs])
            save_file(out, os.path.join(out_dir, f"{mode}-rank{rank}.safetensors"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    end_worker()


def test_two_gloo_ranks_end_identical_and_match_one_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    torch.set_num_threads(1)
    pre, ft = learner_states(_model)
    single, single_logs = _run(_model(), pre, ft, global_batches(STEPS))
    for mode in MODES:
        r0 = load_file(str(tmp_path / f"{mode}-rank0.safetensors"))
        r1 = load_file(str(tmp_path / f"{mode}-rank1.safetensors"))
        for key in r0:
            assert torch.equal(r0[key], r1[key]), f"{mode}: ranks differ in {key}"
        # Averaging per-rank gradients of balanced halves = the gradient of the whole batch.
        for key, value in single.items():
            torch.testing.assert_close(r0[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{mode} {key}: {m}")
        torch.testing.assert_close(r0["target_losses"], torch.tensor([e["target_loss"] for e in single_logs]))
    assert (single["logits"] != fg.MaskLearner(_model(), pre, ft, regression_loss, **HP).logits).any()
