"""The MaskLearner under FSDP2 (``fully_shard``): 2 gloo processes on the CPU equal one process.

The model's parameters are DTensors sharded over dim 0, some unevenly (3 rows over 2 ranks) and
some empty on rank 1 (a 1-row weight, a 1-element bias). The learner keeps Delta, the live
weights and the AdamW user's moments as local shards, sums the per-rank sensitivities with one
all-reduce of N floats per releaser batch, and must end with the single process's hard mask,
logits (to float rounding: a dot product summed in two pieces) and gathered weights, with
bitwise identical logits on both ranks. A save under FSDP2 writes the file one process writes;
a non-finite gradient on one rank stops both with the same error.
"""
from __future__ import annotations

import os

import pytest
import torch
from support.gloo import end_worker, free_port, global_batches, half, learner_states, regression_loss

import freezeguard as fg

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard") or not torch.distributed.is_available():
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

WORLD = 2
STEPS = 8
# (user optimizer, budget, extra settings): releaser and user steps both run in 8 steps.
CASES = {
    "sgd-penalty": dict(user_optimizer="sgd", budget="penalty"),
    "adamw-projected": dict(user_optimizer="adamw", budget="projected", budget_by="params"),
    "sgd-signal2-rms": dict(user_optimizer="sgd", budget="penalty", signal_batches=2, signal_norm="rms"),
}
HP = dict(user_interval=3, user_lr=5e-2, mask_lr=10.0, freeze_ratio=0.4, backend="cpp", seed=4)
# Sharded s is the sum of two partial dot products, one process's a single one, and FSDP averages
# two half-batch gradients where one process takes one mean: they differ in float rounding, which
# the logit and weight updates carry along. The bound is normwise: RTOL of the largest magnitude in
# the compared vector, not of each element. Why: a logit is a sum of up to 8 steps of size up to
# mask_lr (10) times a normalised signal, so it can end near 0 (0.087) after a path of |steps| of
# 0.8 while others end at 9.5; its rounding error follows the steps, not where it ends. Measured
# (2-core CPU, 2026-12-07): in ONE process, changing only the dot product's summation order (cpp vs
# torch backend) moves the sgd-signal2-rms logits by up to 9.5e-7, and another machine's BLAS gave
# 3.09e-6 against the sharded run, ~3 ulp of the largest logit (ulp(9.5) = 9.5e-7) and far over an
# elementwise 1e-6 floor. A real sharding bug moves them by far more (measured the same day, the
# all-reduce of s dropped or doubled: 0.28 to 8.1), against a normwise bound of at most 9.5e-5.
RTOL, ATOL = 1e-5, 1e-6


def _close(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    """assert_close with the normwise floor: atol is RTOL of the largest |expected| (at least ATOL)."""
    atol = max(ATOL, RTOL * float(expected.abs().max())) if expected.numel() else ATOL
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=msg)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 8 tensors (not 6: the loss statistics' length), sharded over 2 ranks as 8/8, 2/1 and 1/0 rows
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3), torch.nn.Tanh(),
                               torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1))


def _shard_model(model: torch.nn.Module, mesh=None) -> torch.nn.Module:
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fsdp.fully_shard(layer, mesh=mesh)
    fsdp.fully_shard(model, mesh=mesh)
    return model


def _result(learner: fg.MaskLearner, logs: list[dict], full) -> dict:
    mask = learner.hard_mask()
    return {"logits": learner.logits.clone(), "mask": (sorted(mask.frozen_names), mask.layout),
            "weights": {n: full(p).detach().clone() for n, p in learner.module.named_parameters()},
            "target_losses": [e["target_loss"] for e in logs]}


def _single(case: str) -> tuple[fg.MaskLearner, dict]:
    torch.set_num_threads(1)
    pre, ft = learner_states(_model)
    learner = fg.MaskLearner(_model(), pre, ft, regression_loss, **HP, **CASES[case])
    logs = [learner.step(b) for b in global_batches(STEPS)]
    return learner, _result(learner, logs, lambda p: p)


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        pre, ft = learner_states(_model)
        halves = [half(b, rank) for b in global_batches(STEPS)]
        results: dict = {}
        for case, extra in CASES.items():
            model = _shard_model(_model())
            learner = fg.MaskLearner(model, pre, ft, regression_loss, **HP, **extra)
            calls: list[tuple[int, int]] = []   # (step, numel) of every all_reduce
            real = dist.all_reduce

            def counting(tensor, *args, _calls=calls, _learner=learner, **kwargs):
                _calls.append((_learner.step_count, tensor.numel()))
                return real(tensor, *args, **kwargs)

            dist.all_reduce = counting
            try:
                logs = [learner.step(b) for b in halves]
            finally:
                dist.all_reduce = real
            res = _result(learner, logs, lambda p: p.full_tensor())
            res["kinds"] = [e["kind"] for e in logs]
            res["calls"] = calls
            res["local_numel"] = sum(t.numel() for t in learner._theta())
            res["delta_numel"] = sum(d.numel() for d in learner._delta)
            results[case] = res
            if case == "adamw-projected":  # save mid-run (collective), resume, continue: the same end
                model = _shard_model(_model())
                first = fg.MaskLearner(model, pre, ft, regression_loss, **HP, **extra)
                for b in halves[:5]:
                    first.step(b)
                first.save(f"{out}.state")   # every rank calls it; rank 0 writes
                dist.barrier()
                model = _shard_model(_model())
                resumed = fg.MaskLearner.load(f"{out}.state", model, regression_loss, backend=HP["backend"])
                logs = [resumed.step(b) for b in halves[5:]]
                results["resumed"] = _result(resumed, logs, lambda p: p.full_tensor())
        # HSDP on a (2 replicas x 1 shard) mesh: placements (Replicate(), Shard(0)), every rank holds
        # whole tensors; only replica 0's partial s may count in the sum over ranks.
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
        learner = fg.MaskLearner(_shard_model(_model(), mesh), pre, ft, regression_loss, **HP)
        logs = [learner.step(b) for b in halves]
        results["hsdp"] = _result(learner, logs, lambda p: p.full_tensor())
        keep = learner._sharding.keep   # None: every tensor's partial s counts on this rank
        results["hsdp"]["keep"] = [1.0] * len(learner.names) if keep is None else keep.tolist()
        results["errors"] = _non_finite(rank, pre, ft, halves)
        torch.save(results, f"{out}.{rank}")
        dist.barrier()  # before destroy_process_group, or teardown can abort the worker
    finally:
        dist.destroy_process_group()
    end_worker()


def _non_finite(rank: int, pre, ft, halves) -> dict[str, str]:
    """A NaN in one local gradient shard (rank 1 only) or one rank's loss stops both ranks alike."""
    errors = {}
    for kind, step in (("releaser", 0), ("user", 1)):
        learner = fg.MaskLearner(_shard_model(_model()), pre, ft, regression_loss, **HP)
        gradients = learner._gradients

        def poisoned(_gradients=gradients, _learner=learner, _step=step):
            idx, theta, delta, grads = _gradients()
            if rank == 1 and _learner.step_count == _step:
                grads[2][0, 0] = float("nan")   # "2.weight": 1 of its 3 rows lives on rank 1
            return idx, theta, delta, grads

        learner._gradients = poisoned
        try:
            for b in halves[:step + 1]:
                learner.step(b)
            errors[kind] = "no error"
        except FloatingPointError as exc:
            errors[kind] = str(exc)
    learner = fg.MaskLearner(_shard_model(_model()), pre, ft, regression_loss, **HP)
    nan_loss = (lambda m, b: regression_loss(m, b) * float("nan")) if rank == 1 else regression_loss
    learner.loss_fn = nan_loss
    try:
        learner.step(halves[0])
        errors["loss"] = "no error"
    except FloatingPointError as exc:
        errors["loss"] = str(exc)
    return errors


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from freezeguard.backends import status

    if not status(HP["backend"]).available:
        pytest.skip(status(HP["backend"]).reason)
    out = str(tmp_path_factory.mktemp("fsdp2") / "result")
    torch.multiprocessing.spawn(_worker, args=(free_port(), out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{r}") for r in range(WORLD)], out


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_learner_equals_one_process(case, sharded):
    ranks, _ = sharded
    _, single = _single(case)
    r0, r1 = ranks[0][case], ranks[1][case]
    assert {"releaser", "user"} <= set(r0["kinds"])
    assert torch.equal(r0["logits"], r1["logits"]), "logits differ across ranks"
    assert r0["mask"] == r1["mask"] == single["mask"]
    _close(r0["logits"], single["logits"])
    assert (single["logits"] != fg.MaskLearner(_model(), *learner_states(_model), regression_loss, **HP, **CASES[case]).logits).any()
    for rank in ranks:
        for name, w in single["weights"].items():
            _close(rank[case]["weights"][name], w, msg=name)
    torch.testing.assert_close(torch.tensor(r0["target_losses"]), torch.tensor(single["target_losses"]))
    # Per rank, the live weights and Delta are shards: together one copy of the model.
    total = sum(p.numel() for p in _model().parameters())
    assert r0["local_numel"] + r1["local_numel"] == total == r0["delta_numel"] + r1["delta_numel"]
    assert 0 < r1["local_numel"] < r0["local_numel"] < total


def test_hsdp_replicated_shards_count_once(sharded):
    ranks, _ = sharded
    _, single = _single("sgd-penalty")
    n = len(single["logits"])
    assert ranks[0]["hsdp"]["keep"] == [1.0] * n and ranks[1]["hsdp"]["keep"] == [0.0] * n
    for rank in ranks:
        assert rank["hsdp"]["mask"] == single["mask"]
        _close(rank["hsdp"]["logits"], single["logits"])
        for name, w in single["weights"].items():
            _close(rank["hsdp"]["weights"][name], w, msg=name)
    assert torch.equal(ranks[0]["hsdp"]["logits"], ranks[1]["hsdp"]["logits"])


def test_fsdp2_one_all_reduce_of_n_floats_per_releaser_batch(sharded):
    """Per step: the loss statistics (6 floats, reduced before backward so a bad loss on one rank
    stops all), then one N-float sum: the sensitivities s on releaser batches, the per-tensor
    sums of g^2 of the finiteness check on user batches. FSDP2 itself reduce-scatters (no
    all_reduce)."""
    ranks, _ = sharded
    n = len(list(_model().parameters()))
    assert n != 6
    for case in CASES:
        for rank in ranks:
            res = rank[case]
            assert len(res["kinds"]) == STEPS
            for step, kind in enumerate(res["kinds"]):
                numels = [m for s, m in res["calls"] if s == step]
                assert numels == [6, n], (case, step, kind, numels)


def test_fsdp2_save_gathers_and_resumes(sharded):
    ranks, out = sharded
    single_learner, single = _single("adamw-projected")
    for rank in ranks:
        resumed = rank["resumed"]
        assert resumed["mask"] == single["mask"]
        _close(resumed["logits"], single["logits"])
        for name, w in single["weights"].items():
            _close(resumed["weights"][name], w, msg=name)
    # The sharded save is the whole state, as one process saves it after the same 5 steps.
    pre, ft = learner_states(_model)
    one = fg.MaskLearner(_model(), pre, ft, regression_loss, **HP, **CASES["adamw-projected"])
    for b in global_batches(STEPS)[:5]:
        one.step(b)
    path = out + ".single"
    one.save(path)
    from safetensors.torch import load_file

    got, want = load_file(out + ".state"), load_file(path)
    assert got.keys() == want.keys()
    for key in want:
        _close(got[key], want[key], msg=key)


def test_fsdp2_non_finite_on_one_rank_stops_every_rank_alike(sharded):
    ranks, _ = sharded
    e0, e1 = ranks[0]["errors"], ranks[1]["errors"]
    assert e0 == e1
    assert "step 0: non-finite gradient in the releaser step in 2.weight" in e0["releaser"]
    assert "step 1: non-finite gradient in the user step in 2.weight" in e0["user"]
    assert "step 0: non-finite loss in the releaser step" in e0["loss"]


def test_fsdp2_unsupported_layouts_are_refused_up_front(monkeypatch):
    """Plain and DTensor parameters mixed, or a Partial placement: a ValueError before any step."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        pre, ft = learner_states(_model)
        mixed = _model()
        fsdp.fully_shard(mixed[0])   # only the first layer: the others stay plain
        with pytest.raises(ValueError, match="mixes plain and DTensor"):
            fg.MaskLearner(mixed, pre, ft, regression_loss, **HP)
        mesh = init_device_mesh("cpu", (1,))
        for placement, ok in ((Partial(), False), (Replicate(), True)):
            model = _model()
            for layer in model:
                for name, p in list(layer.named_parameters(recurse=False)):
                    dt = DTensor.from_local(p.detach().clone(), mesh, [placement])
                    setattr(layer, name, torch.nn.Parameter(dt))
            if ok:   # replicated parameters: the local tensor is the whole one
                learner = fg.MaskLearner(model, pre, ft, regression_loss, **HP)
                assert learner._sharding is not None and learner._sharding.keep is None
                assert all(isinstance(d, torch.Tensor) and not isinstance(d, DTensor) for d in learner._delta)
                continue
            with pytest.raises(ValueError, match="placement Partial"):
                fg.MaskLearner(model, pre, ft, regression_loss, **HP)
    finally:
        dist.destroy_process_group()
