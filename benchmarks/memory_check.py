"""The memory model against the bytes a real run allocates, on the tiny config of every family.

For each family: a guarded fine-tuning step (random mask, 40% of the parameters frozen) and the
MaskLearner, measured as the CPU allocator's net bytes (torch profiler, allocations minus frees)
over the first optimizer step (= the AdamW state it creates), over forward + backward (= the
gradients left behind) and over the learner's construction (= Δ, logits and, with an AdamW user,
its moments); the learner's gradients are summed when each is accumulated. Each is printed next to
:mod:`freezeguard.apps.memory_model`'s formula. ``tests/test_memory_model.py`` asserts the same equalities
(and the FSDP2 per-rank shards on 2 gloo processes).

Run:
    python benchmarks/memory_check.py        # ~30 s on 2 CPU cores; prints a Markdown table
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

import freezeguard as fg
from freezeguard.apps.memory_model import guarded_bytes, learner_bytes
from freezeguard.integrations.diffusers.loss import make_loss_fn
from freezeguard.integrations.diffusers.models import FAMILIES


def _net(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return sum(e.self_cpu_memory_usage for e in prof.events()), out


def _batch(fam, model):
    gen = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(2, fam.latent_channels(model), 8, 8, generator=gen),
            **fam.conditioning(model, 2, generator=gen), "is_target": torch.tensor([True, False]), "generator": gen}


def check(name: str) -> dict[str, tuple[int, int]]:
    """{figure: (formula bytes, measured bytes)} for one family's tiny config."""
    fam = FAMILIES[name]
    model = fam.build("tiny")
    layout = {n: tuple(p.shape) for n, p in model.named_parameters()}
    loss_fn = make_loss_fn(fam.scheduler())
    mask = fg.FreezeMask.random(model, ratio=0.4, by="params", seed=2)
    want = guarded_bytes(layout, mask.frozen_names)
    opt = fg.guard(model, mask, lr=1e-3)
    grads, _ = _net(lambda: loss_fn(model, _batch(fam, model)).mean().backward())
    state, _ = _net(opt.step)
    out = {"guarded grads": (want["grads"], grads), "guarded AdamW state": (want["optimizer_state"], state)}

    learner_model = fam.build("tiny")
    pre = {k: v.detach().clone() for k, v in learner_model.named_parameters()}
    ft = {k: v + 0.01 for k, v in pre.items()}
    lw = learner_bytes(layout, user_optimizer="adamw")
    built, learner = _net(lambda: fg.MaskLearner(learner_model, pre, ft, loss_fn, freeze_ratio=0.3,
                                                 user_optimizer="adamw", user_interval=2))
    seen = []
    for p in learner_model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.numel() * p.grad.element_size()))
    learner.step(_batch(fam, learner_model))
    out["learner Δ + logits + moments"] = (lw["delta"] + lw["logits"] + lw["user_moments"], built)
    out["learner grads"] = (lw["grads"], sum(seen))
    return out


def main() -> None:
    torch.set_num_threads(1)
    print("| family (tiny) | figure | formula bytes | measured bytes |")
    print("|---|---|---|---|")
    for name in FAMILIES:
        for figure, (want, got) in check(name).items():
            flag = "" if want == got else " **differs**"
            print(f"| {name} | {figure} | {want:,} | {got:,}{flag} |")


if __name__ == "__main__":
    main()
