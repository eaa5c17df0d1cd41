"""Drive every op of the `cuda` backend through the awkward cases, for compute-sanitizer.

Odd sizes around the chunk size, views that start 1-3 elements into their allocation
(misaligned for 128-bit access, ending exactly at the allocation's end so an over-read is
caught), all three storage dtypes, mixed-dtype lists, empty tensors, many tiny tensors, and
a CUDA-graph replay of the device-scalar AdamW. Every result is compared with the reference
(freezeguard/backends/reference.py); the exit status is 1 on any mismatch, 2 when the
backend cannot run here.

`--bench` (not under a sanitizer) then times masked_adamw_ on the 686 SD-1.5 UNet shapes
(from diffusers on the meta device) against torch.optim.AdamW fused and foreach, and the
other ops against the per-tensor reference loop: median ms over CUDA events, effective GB/s.

On a GPU machine (build the extension once without the sanitizer, then run under it; the
caching allocator is switched off so each tensor is its own allocation and out-of-bounds
accesses are visible to memcheck):

    python benchmarks/gpu_cuda_sanitize.py --full     # all of the below, one summary
    python benchmarks/gpu_cuda_sanitize.py --bench
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \\
        --error-exitcode 99 python benchmarks/gpu_cuda_sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 99 python benchmarks/gpu_cuda_sanitize.py
    compute-sanitizer --tool synccheck --error-exitcode 99 python benchmarks/gpu_cuda_sanitize.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck --error-exitcode 99 \\
        python benchmarks/gpu_cuda_sanitize.py
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

CHUNK = 16384  # FG_CHUNK_SIZE in csrc/cuda/fused_ops.h
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OFFSETS = (0, 1, 3)  # elements into the allocation: 0 is 16-byte aligned, 1 and 3 are not
SHAPES = [(0,), (1,), (7,), (8,), (9,), (CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (3, 5), (2 * CHUNK + 7,)]
SHAPES_MANY_SMALL = [(n,) for n in range(1, 41)]
# --small: the reduced case for the slow sanitizer tools (racecheck): still straddles a chunk,
# still misaligned, one list per op and dtype.
SHAPES_SMALL = [(0,), (1,), (9,), (CHUNK + 1,), (3, 5)]
DEVICE = "cuda"  # --cpu-dry-run runs the same driver on CPU tensors (cpp backend)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class Checker:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.checks = 0

    def close(self, what: str, got: list[torch.Tensor], ref_lp: list[torch.Tensor],
              exact: list[torch.Tensor]) -> None:
        """fp32: tight; bf16/fp16: error vs fp32 truth at most 2x torch's own in that dtype."""
        for i, (g, r, e) in enumerate(zip(got, ref_lp, exact, strict=True)):
            self.checks += 1
            if g.numel() == 0:
                continue
            if not torch.isfinite(g.float()).all():
                self.failures.append(f"{what}[{i}] {g.dtype} {tuple(g.shape)}: non-finite output")
                continue
            if g.dtype == torch.float32:
                err = (g - r).abs().max().item()
                bound = 2e-5 * r.abs().max().item() + 1e-6
            else:
                err = (g.float() - e).abs().max().item()
                bound = 2 * (r.float() - e).abs().max().item() + 1e-6 * max(1.0, e.abs().max().item())
            if err > bound:
                self.failures.append(f"{what}[{i}] {g.dtype} {tuple(g.shape)}: error {err:.3e} > bound {bound:.3e}")

    def true(self, what: str, ok: bool) -> None:
        self.checks += 1
        if not ok:
            self.failures.append(what)


def make(shape, dtype, offset: int) -> torch.Tensor:
    """A contiguous CUDA view `offset` elements into an allocation that ends where the view ends."""
    n = math.prod(shape)
    base = torch.randn(n + offset, device=DEVICE).to(dtype)
    return base[offset:].view(shape)


def make_list(shapes, dtypes, offset):
    return [make(s, d, offset) for s, d in zip(shapes, dtypes, strict=True)]


def clone(ts):
    return [t.clone() for t in ts]


def f32(ts):
    """fp32 copies (never aliases: Tensor.float() returns fp32 tensors themselves)."""
    return [t.to(torch.float32, copy=True) for t in ts]


def run_case(be, ref, ck: Checker, shapes, dtypes, offset: int, tag: str) -> None:
    n = len(shapes)
    # masked_adamw_, two steps with per-tensor step counts
    p, m, v = (make_list(shapes, dtypes, offset) for _ in range(3))
    for t in m + v:
        t.zero_()
    rp, rm, rv = clone(p), clone(m), clone(v)
    ep, em, ev = f32(p), f32(m), f32(v)
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    n_steps = 2 if all(d == torch.float32 for d in dtypes) else 1
    for k in range(n_steps):
        g = make_list(shapes, dtypes, offset)
        steps = [float(k + 1 + i % 4) for i in range(n)]
        be.masked_adamw_(p, g, m, v, steps, **hp)
        ref.masked_adamw_(rp, g, rm, rv, steps, **hp)
        ref.masked_adamw_(ep, f32(g), em, ev, steps, **hp)
    sync()
    ck.close(f"{tag} adamw param", p, rp, ep)
    ck.close(f"{tag} adamw exp_avg", m, rm, em)
    ck.close(f"{tag} adamw exp_avg_sq", v, rv, ev)

    # segment_dot: accuracy and bitwise reproducibility
    a, b = make_list(shapes, dtypes, offset), make_list(shapes, dtypes, offset)
    got, again, want = be.segment_dot(a, b), be.segment_dot(a, b), ref.segment_dot(a, b)
    scale = torch.stack([(x.float() * y.float()).abs().sum() for x, y in zip(a, b, strict=True)])
    ck.true(f"{tag} segment_dot not reproducible", torch.equal(got, again))
    bad = ((got - want).abs() > 1e-5 * scale + 1e-6).nonzero().flatten().tolist()
    ck.true(f"{tag} segment_dot mismatch at {bad}: got {got[bad].tolist()} want {want[bad].tolist()}", not bad)

    # mask_shift_
    theta, delta = make_list(shapes, dtypes, offset), make_list(shapes, dtypes, offset)
    dm = torch.rand(n, device=DEVICE) - 0.5
    rt, et = clone(theta), f32(theta)
    be.mask_shift_(theta, delta, dm)
    ref.mask_shift_(rt, delta, dm)
    ref.mask_shift_(et, f32(delta), dm)
    ck.close(f"{tag} mask_shift theta", theta, rt, et)

    # user_update_
    theta, delta, grad = (make_list(shapes, dtypes, offset) for _ in range(3))
    mm = torch.rand(n, device=DEVICE)
    mm[0] = 1.0  # fully frozen share
    rt, rd, et, ed = clone(theta), clone(delta), f32(theta), f32(delta)
    be.user_update_(theta, delta, grad, mm, 0.05)
    ref.user_update_(rt, rd, grad, mm, 0.05)
    ref.user_update_(et, ed, f32(grad), mm, 0.05)
    ck.close(f"{tag} user_update theta", theta, rt, et)
    ck.close(f"{tag} user_update delta", delta, rd, ed)


def run_graph(be, ref, ck: Checker) -> None:
    shapes = [(CHUNK + 5,), (31, 7), (1,)]
    p = [make(s, torch.float32, 0) for s in shapes]
    g = [make(s, torch.float32, 1) for s in shapes]
    m, v = [torch.zeros_like(t) for t in p], [torch.zeros_like(t) for t in p]
    rp, rm, rv = clone(p), clone(m), clone(v)
    hp = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    steps = torch.tensor([1.0, 2.0, 7.0], device="cuda", dtype=torch.float64)
    lr = torch.tensor([1e-2], device="cuda", dtype=torch.float64)
    host_steps = steps.tolist()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        be.masked_adamw_capturable_(p, g, m, v, steps, lr=lr, **hp)
    torch.cuda.current_stream().wait_stream(side)
    ref.masked_adamw_(rp, g, rm, rv, host_steps, lr=1e-2, **hp)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        steps.add_(1)
        be.masked_adamw_capturable_(p, g, m, v, steps, lr=lr, **hp)
    for new_lr in (5e-3, 2e-2):
        lr.fill_(new_lr)
        graph.replay()
        host_steps = [s + 1 for s in host_steps]
        ref.masked_adamw_(rp, g, rm, rv, host_steps, lr=new_lr, **hp)
    torch.cuda.synchronize()
    ck.close("graph adamw param", p, rp, f32(rp))
    ck.close("graph adamw exp_avg", m, rm, f32(rm))


def sd15_shapes() -> list[tuple[int, ...]]:
    """The SD-1.5 UNet's parameter shapes (686 tensors), built on the meta device: no download."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel()
    return [tuple(p.shape) for p in unet.parameters()]


def time_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench(be, ref, dtype: torch.dtype) -> None:
    try:
        shapes = sd15_shapes()
    except ImportError as exc:
        print(f"bench skipped: the SD-1.5 shapes need diffusers ({exc})")
        return
    numel = sum(math.prod(s) for s in shapes)
    size = torch.finfo(dtype).bits // 8
    print(f"\n{len(shapes)} tensors, {numel / 1e6:.1f}M parameters, {dtype}")

    def row(name, ms, moved):
        print(f"  {name:<34} {ms:9.3f} ms  {moved * numel * size / ms / 1e6:8.1f} GB/s")

    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    hp = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
    steps = [1.0] * len(params)
    with torch.no_grad():
        row("masked_adamw_ cuda", time_ms(lambda: be.masked_adamw_(params, grads, m, v, steps, **hp)), 7)
        for flavour in ("fused", "foreach"):
            opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, **{flavour: True})
            row(f"torch.optim.AdamW({flavour}=True)", time_ms(opt.step), 7)
            del opt
    del m, v
    a, b = params, grads
    dm = torch.rand(len(a), device="cuda")
    with torch.no_grad():
        row("segment_dot cuda", time_ms(lambda: be.segment_dot(a, b)), 2)
        row("segment_dot reference loop", time_ms(lambda: ref.segment_dot(a, b), iters=5), 2)
        row("mask_shift_ cuda", time_ms(lambda: be.mask_shift_(a, b, dm)), 3)
        row("mask_shift_ reference loop", time_ms(lambda: ref.mask_shift_(a, b, dm), iters=5), 3)
        delta = [torch.zeros_like(p) for p in params]
        row("user_update_ cuda", time_ms(lambda: be.user_update_(a, delta, b, dm, 1e-5)), 5)
        row("user_update_ reference loop", time_ms(lambda: ref.user_update_(a, delta, b, dm, 1e-5), iters=5), 5)
    del params, grads, delta
    torch.cuda.empty_cache()


def find_sanitizer() -> str | None:
    import os
    import shutil

    found = shutil.which("compute-sanitizer")
    if found:
        return found
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None,
             "/usr/local/cuda"]
    for home in filter(None, homes):
        for rel in ("bin/compute-sanitizer", "compute-sanitizer/compute-sanitizer"):
            if os.path.exists(os.path.join(home, rel)):
                return os.path.join(home, rel)
    return None


def full(timeout: int) -> int:
    """Everything the lead runs on a GPU, in order, each step in its own process."""
    import os
    import subprocess

    me, py = os.path.abspath(__file__), sys.executable
    repo = os.path.dirname(os.path.dirname(me))
    san = find_sanitizer()
    steps = [("gpu tests", [py, "-m", "pytest", "-q", "-m", "gpu", "tests/test_cuda_backend.py"], {}),
             ("driver (builds the extension)", [py, me], {})]
    if san:
        no_cache = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        steps += [("memcheck", [san, "--tool", "memcheck", "--error-exitcode", "99", py, me, "--no-graph"], no_cache),
                  ("racecheck", [san, "--tool", "racecheck", "--error-exitcode", "99", py, me], {}),
                  ("synccheck", [san, "--tool", "synccheck", "--error-exitcode", "99", py, me], {}),
                  ("initcheck", [san, "--tool", "initcheck", "--error-exitcode", "99", py, me, "--no-graph"], no_cache)]
    steps.append(("bench", [py, me, "--bench"], {}))
    results = []
    for name, cmd, env in steps:
        print(f"\n===== {name}: {' '.join(cmd)}", flush=True)
        try:
            rc = subprocess.run(cmd, cwd=repo, env={**os.environ, **env}, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        results.append((name, rc))
    print("\n===== summary")
    if not san:
        print("compute-sanitizer not found: sanitizer steps skipped")
    for name, rc in results:
        print(f"  {name:<32} {'ok' if rc == 0 else f'FAILED ({rc})'}")
    return 0 if all(rc == 0 for _, rc in results) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph case")
    ap.add_argument("--bench", action="store_true", help="then time the ops on the SD-1.5 UNet shapes")
    ap.add_argument("--full", action="store_true",
                    help="run the GPU tests, this driver under each compute-sanitizer tool, then --bench")
    ap.add_argument("--step-timeout", type=int, default=240, help="seconds per --full step")
    ap.add_argument("--small", action="store_true",
                    help="the reduced case (fewer shapes, offsets 0 and 1), for racecheck")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run the driver on CPU tensors with the cpp backend (no GPU): checks the script itself")
    args = ap.parse_args(argv)
    if args.full:
        return full(args.step_timeout)

    global DEVICE
    from freezeguard.backends import reference as ref

    if args.cpu_dry_run:
        from freezeguard.backends import cpp_backend as be

        DEVICE, name, args.no_graph = "cpu", "cpp", True
    else:
        from freezeguard.backends import cuda_backend as be

        name = "cuda"
    ok, reason = be.availability()
    if not ok:
        print(f"{name} backend unavailable: {reason}")
        return 2
    torch.manual_seed(0)
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    print(f"device: {where}; backend {name}: {reason}", flush=True)
    ck = Checker()
    shapes, offsets = (SHAPES_SMALL, (0, 1)) if args.small else (SHAPES, OFFSETS)
    for dtype in DTYPES:
        for offset in offsets:
            run_case(be, ref, ck, shapes, [dtype] * len(shapes), offset, f"{dtype}/+{offset}")
        if not args.small:
            run_case(be, ref, ck, SHAPES_MANY_SMALL, [dtype] * len(SHAPES_MANY_SMALL), 0, f"{dtype}/many-small")
    mixed = [DTYPES[i % 3] for i in range(len(shapes))]
    for offset in (0, 1):
        run_case(be, ref, ck, shapes, mixed, offset, f"mixed/+{offset}")
    if not args.no_graph:
        run_graph(be, ref, ck)
    sync()
    for f in ck.failures:
        print("FAIL", f)
    print(f"{ck.checks} checks, {len(ck.failures)} failures")
    if ck.failures:
        return 1
    if args.bench and DEVICE == "cuda":
        for dtype in (torch.float32, torch.bfloat16):
            bench(be, ref, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
