"""Sweep BLOCK x num_warps of the Triton kernels on a GPU, against the anchors, and print a table.

The tensor list is the SD-1.5 UNet's 686 parameter shapes (diffusers' default
UNet2DConditionModel built on the meta device, ~860M parameters), all trainable. Anchors,
measured in the same run on the same tensors:

* ``masked_adamw_``: ``torch.optim.AdamW(fused=True)`` and ``(foreach=True)`` ``.step()``;
* learner ops: the per-tensor loop of ``freezeguard.backends.reference``.

Effective bandwidth counts each tensor element read or written once (AdamW: 4 reads + 3
writes); "%peak" is against the nominal DRAM bandwidth from the device properties, and
"%copy" against a large device-to-device copy measured here.

Usage (GPU machine; a few minutes, ~25 GB of GPU memory at fp32):
    python benchmarks/tune_triton.py [--dtypes fp32,bf16] [--blocks 1024,2048,4096] [--warps 4,8]
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch


def sd15_shapes() -> tuple[list[torch.Size], str]:
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        sys.exit("tune_triton: diffusers is needed for the SD-1.5 shapes (pip install diffusers)")
    with torch.device("meta"):
        unet = UNet2DConditionModel()
    return [p.shape for p in unet.parameters()], "SD-1.5 UNet (diffusers default UNet2DConditionModel)"


def nominal_bandwidth(device: torch.device) -> float | None:
    """Bytes/s from the memory clock and bus width (double data rate), if torch exposes them."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8


def bench(fn) -> float:
    """Median milliseconds per call (CUDA events, after warmup)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=50, rep=300, return_mode="median"))


def _bench_once(fn) -> float:
    """--smoke: one timed call on the CPU (checks the script runs; the figure means nothing)."""
    import time

    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--blocks", default="1024,2048,4096")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--ops", default="masked_adamw_,segment_dot,mask_shift_,user_update_")
    ap.add_argument("--smoke", action="store_true",
                    help="run the script on tiny CPU tensors under TRITON_INTERPRET=1 (checks it; measures nothing)")
    args = ap.parse_args(argv)
    global bench
    if args.smoke:
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("tune_triton --smoke: set TRITON_INTERPRET=1")
        bench = _bench_once
    elif not torch.cuda.is_available():
        sys.exit("tune_triton: needs a CUDA GPU")

    import triton

    import freezeguard as fg
    from freezeguard.backends import reference as ref
    from freezeguard.kernels import adamw, mask_updates
    from freezeguard.kernels.launch import CONFIGS

    if args.smoke:
        dev, shapes, what, peak = torch.device("cpu"), [torch.Size([5]), torch.Size([0]), torch.Size([70, 3])], "smoke", None
    else:
        dev = torch.device("cuda")
        shapes, what = sd15_shapes()
        peak = nominal_bandwidth(dev)
    numel = sum(s.numel() for s in shapes)
    big = torch.empty(1 << (10 if args.smoke else 29), dtype=torch.float32, device=dev)  # 2 GiB
    big2 = torch.empty_like(big)
    copy_bw = 2 * big.numel() * 4 / (bench(lambda: big2.copy_(big)) * 1e-3)
    del big, big2
    gpu = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name(dev)
    print(f"# {gpu}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"torch {torch.__version__}, triton {triton.__version__}, freezeguard {fg.__version__}")
    print(f"# {what}: {len(shapes)} tensors, {numel / 1e6:.1f}M parameters")
    print(f"# nominal DRAM bandwidth: {peak / 1e9:.0f} GB/s" if peak else "# nominal DRAM bandwidth: unknown")
    print(f"# device-to-device copy: {copy_bw / 1e9:.0f} GB/s")
    print(f"# defaults (BLOCK, warps): {CONFIGS}")
    print(f"{'op':14s} {'dtype':5s} {'variant':22s} {'ms':>8s} {'GB/s':>7s} {'%peak':>6s} {'%copy':>6s} {'x anchor':>9s}")

    def row(op, dt, variant, ms, nbytes, anchor_ms):
        gbs = nbytes / (ms * 1e-3) / 1e9
        pk = f"{100 * gbs * 1e9 / peak:6.1f}" if peak else "     -"
        x = f"{anchor_ms / ms:9.2f}" if anchor_ms else "        -"
        print(f"{op:14s} {dt:5s} {variant:22s} {ms:8.3f} {gbs:7.0f} {pk} {100 * gbs * 1e9 / copy_bw:6.1f} {x}", flush=True)

    ops = args.ops.split(",")
    blocks = [int(b) for b in args.blocks.split(",")]
    warps = [int(w) for w in args.warps.split(",")]
    for name in args.dtypes.split(","):
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        esize = torch.tensor([], dtype=dt).element_size()

        def make(scale=1.0, positive=False):
            out = []
            for s in shapes:
                t = torch.empty(s, dtype=dt, device=dev)
                t.uniform_(0, scale) if positive else t.normal_(0, scale)
                out.append(t)
            return out

        if "masked_adamw_" in ops:
            p, g, m = make(), make(1e-3), make(1e-4)
            v = make(1e-8, positive=True)
            steps = [10.0] * len(p)
            kw = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
            nbytes = 7 * numel * esize
            anchors = {}
            for flavour in ("fused", "foreach"):
                params = [torch.nn.Parameter(t.detach().clone()) for t in p]
                for q, gr in zip(params, g, strict=True):
                    q.grad = gr
                opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, **{flavour: True})
                opt.step()
                anchors[flavour] = bench(opt.step)
                row("masked_adamw_", name, f"torch AdamW {flavour}", anchors[flavour], nbytes, None)
                del opt, params
                _empty_cache()
            ms = bench(lambda: fg.ops.masked_adamw_(p, g, m, v, steps, lr=1e-5, betas=(0.9, 0.999), eps=1e-8,
                                                    weight_decay=1e-2, backend="triton"))
            row("masked_adamw_", name, "fg.ops (defaults)", ms, nbytes, anchors["fused"])
            for b in blocks:
                for w in warps:
                    ms = bench(lambda: adamw.masked_adamw_(p, g, m, v, steps, block=b, num_warps=w, **kw))
                    row("masked_adamw_", name, f"kernel {b}x{w}", ms, nbytes, anchors["fused"])
            del p, g, m, v
            _empty_cache()

        theta, delta, grad = make(), make(1e-3), make(1e-3)
        mvec = torch.rand(len(shapes), device=dev)
        learner_ops = {
            "segment_dot": (2, lambda: ref.segment_dot(delta, grad),
                            lambda **c: mask_updates.segment_dot(delta, grad, **c)),
            "mask_shift_": (3, lambda: ref.mask_shift_(theta, delta, mvec * 1e-3),
                            lambda **c: mask_updates.mask_shift_(theta, delta, mvec * 1e-3, **c)),
            "user_update_": (5, lambda: ref.user_update_(theta, delta, grad, mvec, 1e-5),
                             lambda **c: mask_updates.user_update_(theta, delta, grad, mvec, 1e-5, **c)),
        }
        for op, (touches, reference, kernel) in learner_ops.items():
            if op not in ops:
                continue
            nbytes = touches * numel * esize
            anchor = bench(reference)
            row(op, name, "reference loop", anchor, nbytes, None)
            for b in blocks:
                for w in warps:
                    row(op, name, f"kernel {b}x{w}", bench(lambda: kernel(block=b, num_warps=w)), nbytes, anchor)
        del theta, delta, grad
        _empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
