"""Fine-tuning step of a diffusers UNet: full (torch.optim.AdamW) vs guarded (fg.guard), issue 6.

pytest-benchmark (CPU; CUDA too when visible), the SD-1.5 layout channel-scaled ("sd15-s"):

    pytest benchmarks/bench_finetune.py --benchmark-json=ft.json && python benchmarks/report.py ft.json

GPU suite (one command, a few minutes on an H100): the full SD-1.5 UNet in fp32 and in bf16
autocast with gradient checkpointing, ratios 0/10/30/50/70% by tensors and by params, plus the
learner update fused vs the authors' loop; prints the tables and writes JSON, PNG and Markdown
to $OUT (or the given directory):

    python benchmarks/bench_finetune.py --gpu-suite ${OUT:-/tmp/fg_bench_gpu}

The table itself (`freezeguard bench`, :mod:`freezeguard.apps.bench`) is the same code path.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import pytest
import torch

import freezeguard as fg
from freezeguard.apps.bench import format_table, plot, run_bench
from freezeguard.integrations.diffusers.bench_presets import DEFAULT_LATENT, build_unet, make_batch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _step_fn(model: str, device: str, ratio: float | None):
    unet = build_unet(model, device)
    batch = make_batch(unet, 1, DEFAULT_LATENT[model])
    target = torch.randn_like(batch["sample"])
    if ratio is None:
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)
    else:
        opt = fg.guard(unet, fg.FreezeMask.random(unet, ratio=ratio, by="tensors", seed=0), lr=1e-5)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(unet(**batch).sample, target).backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
    return step, sum(p.numel() * p.element_size() for p in unet.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ratio", [None, 0.3, 0.7], ids=["full", "guard30", "guard70"])
def test_finetune_step(benchmark, request, device, ratio):
    model = "sd15-s" if device == "cpu" else "sd15"
    step, nbytes = _step_fn(model, device, ratio)
    step()  # warm-up (triton compiles on first use)
    benchmark.group = f"finetune-step-{model}-{device}"
    benchmark.extra_info.update(impl="torch.optim.AdamW(fused)" if ratio is None else f"fg.guard {ratio:.0%}",
                                role="anchor" if ratio is None else "candidate", bytes=nbytes, device=device)
    benchmark.pedantic(step, rounds=request.config.getoption("--fg-rounds"), iterations=1)


def gpu_suite(out_dir: str) -> int:
    """The full SD-1.5 UNet on CUDA: fp32, then bf16 autocast + gradient checkpointing."""
    if not torch.cuda.is_available():
        print("gpu suite: torch sees no CUDA device", file=sys.stderr)
        return 2
    os.makedirs(out_dir, exist_ok=True)
    name = torch.cuda.get_device_name()
    md = [f"## freezeguard bench on {name}, {time.strftime('%Y-%m-%d', time.gmtime())}"]
    suites = {"fp32_b2": dict(batch=2, bf16=False, checkpointing=False, learner=True, lean_frozen_convs=True),
              "bf16_ckpt_b8": dict(batch=8, bf16=True, checkpointing=True, learner=False)}
    for tag, kw in suites.items():
        t0 = time.perf_counter()
        res = run_bench(model="sd15", device="cuda", steps=5, warmup=2, progress=False, **kw)
        res["meta"]["wall_s"] = time.perf_counter() - t0
        table = format_table(res)
        print(f"\n### {tag} ({res['meta']['wall_s']:.0f} s)\n{table}", flush=True)
        md += ["", f"### {tag}: `python -m freezeguard.apps.bench --device cuda --model sd15 --batch {kw['batch']}"
               f"{' --bf16' if kw['bf16'] else ''}{' --checkpointing' if kw['checkpointing'] else ''}{' --lean-frozen-convs' if kw.get('lean_frozen_convs') else ''}`", "", table]
        with open(os.path.join(out_dir, f"bench_{tag}.json"), "w") as f:
            json.dump(res, f, indent=2)
        plot(res, os.path.join(out_dir, f"bench_{tag}.png"))
    with open(os.path.join(out_dir, "bench_finetune.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-suite", nargs="?", const=os.environ.get("OUT", "/tmp/fg_bench_gpu"), default=None,
                        metavar="OUT_DIR")
    args = parser.parse_args()
    if args.gpu_suite is None:
        parser.error("give --gpu-suite [OUT_DIR] (or run the file with pytest)")
    sys.exit(gpu_suite(args.gpu_suite))
