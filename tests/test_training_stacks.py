"""The mask holds in real training stacks (CPU, tiny UNet): accelerate, GradScaler, DDP, schedulers.

Each test is a small version of what a diffusers user runs (train_text_to_image.py): the mask is
enforced by fg.wrap around torch's AdamW or by fg.guard's fused AdamW.
"""
from __future__ import annotations

import os

import pytest
import torch
from support.gloo import end_worker, free_port
from support.tiny_models import build_tiny_unet

import freezeguard as fg

diffusers = pytest.importorskip("diffusers")
accelerate = pytest.importorskip("accelerate")


def tiny_unet() -> torch.nn.Module:
    return build_tiny_unet(seed=0, cross_attention_dim=8)


def make_optimizer(model, mask, how):
    if how == "wrap":
        return fg.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2), mask, model)
    return fg.guard(model, mask, lr=1e-2, weight_decay=1e-2, backend="torch")


def dataset(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    text = torch.randn(n, 3, 8, generator=g)
    return torch.utils.data.TensorDataset(latents, text)


def diffusion_loss(unet, latents, text, step):
    # Seeded per step so a run resumed from a checkpoint sees the same noise and timesteps.
    g = torch.Generator().manual_seed(1000 + step)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
    noisy = latents + noise * (t.float() / 1000).view(-1, 1, 1, 1)
    return torch.nn.functional.mse_loss(unet(noisy, t, text).sample, noise)


def params_of(model):
    model = getattr(model, "module", model)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_mask_held(released, now, mask):
    for name in mask.frozen_names:
        assert torch.equal(now[name], released[name]), f"frozen {name} changed"
    changed = [n for n in mask.trainable_names if not torch.equal(now[n], released[n])]
    assert len(changed) > len(mask.trainable_names) // 2, "trainable tensors did not train"


# --- accelerate, train_text_to_image.py style -------------------------------------------------

def fresh_accelerator(**kwargs):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return accelerate.Accelerator(cpu=True, **kwargs)


def build_run(mask, how):
    accelerator = fresh_accelerator(gradient_accumulation_steps=2)
    unet = tiny_unet()
    opt = make_optimizer(unet, mask, how)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=2, shuffle=False)
    sched = diffusers.optimization.get_scheduler("cosine", optimizer=opt, num_warmup_steps=1,
                                                 num_training_steps=8)
    unet, opt, loader, sched = accelerator.prepare(unet, opt, loader, sched)
    return accelerator, unet, opt, loader, sched


def run_epoch(accelerator, unet, opt, loader, sched, epoch):
    lrs = []
    for i, (latents, text) in enumerate(loader):
        with accelerator.accumulate(unet):
            loss = diffusion_loss(unet, latents, text, step=epoch * 100 + i)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("how", ["wrap", "guard"])
def test_accelerate_loop_with_save_and_resume(tmp_path, how):
    released = params_of(tiny_unet())
    mask = fg.FreezeMask.random(tiny_unet(), 0.4, seed=0)
    run = build_run(mask, how)
    lrs = run_epoch(*run, epoch=0)
    assert len(set(lrs)) > 1  # cosine schedule with warmup moves the lr
    run[0].save_state(str(tmp_path / "ckpt"))
    run_epoch(*run, epoch=1)
    straight = params_of(run[1])
    assert_mask_held(released, straight, mask)
    inner = run[2].optimizer
    frozen_ids = {id(p) for n, p in run[1].named_parameters() if mask.is_frozen(n)}
    assert not any(id(p) in frozen_ids for p in inner.state)

    resumed = build_run(mask, how)
    resumed[0].load_state(str(tmp_path / "ckpt"))
    run_epoch(*resumed, epoch=1)
    again = params_of(resumed[1])
    for name in straight:
        assert torch.equal(straight[name], again[name]), f"{name} differs after resume"


# --- GradScaler ---------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["wrap", "guard"])
def test_grad_scaler_skips_inf_step(how):
    unet = tiny_unet()
    released = params_of(unet)
    mask = fg.FreezeMask.random(unet, 0.4, seed=1)
    opt = make_optimizer(unet, mask, how)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    latents, text = dataset(2)[:]

    opt.zero_grad()
    scaler.scale(diffusion_loss(unet, latents, text, 0)).backward()
    trainable = next(p for n, p in unet.named_parameters() if not mask.is_frozen(n) and p.grad is not None)
    trainable.grad.view(-1)[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    now = params_of(unet)
    assert all(torch.equal(now[n], released[n]) for n in now), "a skipped step wrote a tensor"
    assert len(opt.state) == 0 and scaler.get_scale() < 2.0**8

    for step in range(1, 3):
        opt.zero_grad()
        scaler.scale(diffusion_loss(unet, latents, text, step)).backward()
        scaler.step(opt)
        scaler.update()
    assert_mask_held(released, params_of(unet), mask)


# --- schedulers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cosine", "linear", "constant_with_warmup"])
def test_diffusers_schedulers_see_the_same_lrs(name):
    model = torch.nn.Linear(3, 3)
    mask = fg.FreezeMask.from_names(model, ["weight"])
    plain = torch.optim.AdamW(model.parameters(), lr=0.1)
    wrapped = fg.wrap(torch.optim.AdamW(model.parameters(), lr=0.1), mask, model)
    scheds = [diffusers.optimization.get_scheduler(name, optimizer=o, num_warmup_steps=2, num_training_steps=6)
              for o in (plain, wrapped)]
    seen = [[], []]
    for _ in range(6):
        for k, (o, s) in enumerate(zip((plain, wrapped), scheds, strict=True)):
            o.step()
            s.step()
            seen[k].append(o.param_groups[0]["lr"])
    assert seen[0] == seen[1] and len(set(seen[0])) > 1


# --- DDP -------------------------------------------------------------------------------------------

def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        unet = tiny_unet()
        mask = fg.FreezeMask.random(unet, 0.4, seed=2)
        # Freeze before DDP so its reducer only expects gradients for trainable tensors.
        mask.apply_(unet)
        model = torch.nn.parallel.DistributedDataParallel(unet)
        # ...then someone turns gradients back on: the frozen tensors now get local, unreduced
        # gradients (different on each rank), and only the wrap keeps them from moving.
        for p in unet.parameters():
            p.requires_grad_(True)
        opt = fg.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2), mask, model,
                      apply=False)
        data = dataset(4, seed=10 + rank)  # different data per rank: gradients must be averaged
        for step in range(2):
            opt.zero_grad()
            diffusion_loss(model, data[:][0][:2], data[:][1][:2], step).backward()
            opt.step()
        save_file({n: p.detach().contiguous() for n, p in unet.named_parameters()},
                  os.path.join(out_dir, f"rank{rank}.safetensors"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    end_worker()


def test_ddp_two_gloo_processes(tmp_path):
    from safetensors.torch import load_file

    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    for name in r0:
        assert torch.equal(r0[name], r1[name]), f"ranks disagree on {name}"
    unet = tiny_unet()
    assert_mask_held(params_of(unet), r0, fg.FreezeMask.random(unet, 0.4, seed=2))


# --- GPU (run by the lead on a CUDA machine; skipped elsewhere) ------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("how", ["wrap", "guard"])
def test_cuda_autocast_grad_scaler(how):
    unet = tiny_unet().cuda()
    released = params_of(unet)
    mask = fg.FreezeMask.random(unet, 0.4, seed=3)
    if how == "wrap":
        opt = fg.wrap(torch.optim.AdamW(unet.parameters(), lr=1e-2, fused=True), mask, unet)
    else:
        opt = fg.guard(unet, mask, lr=1e-2, backend="auto")
    for p in unet.parameters():  # gradients back on: only the enforcement protects frozen tensors
        p.requires_grad_(True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)
    latents, text = (t.cuda() for t in dataset(2)[:])
    for step in range(3):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            g = torch.Generator(device="cuda").manual_seed(step)
            noise = torch.randn(latents.shape, generator=g, device="cuda")
            loss = torch.nn.functional.mse_loss(unet(latents + noise, torch.tensor([10, 500], device="cuda"),
                                                     text).sample.float(), noise)
        scaler.scale(loss).backward()
        if step == 0:  # an overflow: the step must be skipped and write nothing
            next(p for n, p in unet.named_parameters() if not mask.is_frozen(n)).grad.view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        if step == 0:
            now = params_of(unet)
            assert all(torch.equal(now[n], released[n]) for n in now)
    assert_mask_held(released, params_of(unet), mask)
