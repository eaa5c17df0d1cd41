"""One MaskLearner step, fused (freezeguard) vs the authors' per-tensor loop, on the SD-1.5 layout.

The model is a diffusers ``UNet2DConditionModel`` with the SD-1.5 tensor layout (686 tensors):
channel-scaled on CPU (block_out_channels=(96, 192, 384, 384), 85.3M parameters, or
FG_BENCH_CHANNELS="32,64,128,128" for a quicker run), full size on CUDA (the real SD-1.5 UNet). Measured, for
the releaser step and the user step:

- update: the parameter/mask update alone, given the gradients (fused ops vs the authors' loop,
  ``support.authors_loop``, as written in pittisl/FreezeAsGuard ``src/mask_learner.py``);
- step: forward + backward + update.

The literal loop is the anchor: the tables give median times and fused speedups over it
(and peak memory on CUDA). Run either way:

    pytest -s benchmarks/bench_learner.py      # pytest-benchmark, CPU (and CUDA if present); -s shows the speedups
    python benchmarks/bench_learner.py --device cuda [--dtype bf16] [--json out.json]

On a GPU machine, one command runs the learner tests (GPU cases included) and the fp32 and bf16
benchmarks of the full SD-1.5 UNet, with logs and JSON in OUT_DIR (figures for RESULTS.md):

    python benchmarks/bench_learner.py --gpu-suite $OUT
    FG_BENCH_BACKEND=cuda python benchmarks/bench_learner.py --device cuda   # the cuda backend, if built

Environment: FG_BENCH_THREADS (CPU intra-op threads, default 1: the CI machine's two cores are
shared and threads then only contend), FG_BENCH_CHANNELS, FG_BENCH_BACKEND (default auto).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import _paths  # noqa: F401  (tests/support on sys.path)
import pytest
import torch
from support import authors_loop

import freezeguard as fg
from freezeguard.apps import process_memory

HP = dict(freeze_ratio=0.2, temperature=0.2, c_sparsity=5e3, mask_lr=10.0, user_lr=1e-5, user_interval=5)


def per_sample_loss(model, batch):
    pred = model(batch["noisy"], batch["timesteps"], batch["cond"]).sample
    return ((pred.float() - batch["noise"].float()) ** 2).mean(dim=(1, 2, 3))


def releaser_objective(losses, is_target):
    t = is_target.to(losses.dtype)
    return ((losses * (1 - t)).sum() / (1 - t).sum() - (losses * t).sum() / t.sum()) / 2


# --- setup ------------------------------------------------------------------------------------
@dataclass
class Bench:
    device: torch.device
    dtype: torch.dtype
    channels: tuple[int, ...]
    backend: str
    sides: tuple[str, ...] = ("fused", "literal")  # which implementations to build
    learner: fg.MaskLearner = field(init=False)
    unet: torch.nn.Module = field(init=False)
    unet_diff: torch.nn.Module = field(init=False)
    x_for_mask: torch.Tensor = field(init=False)
    batch: dict = field(init=False)

    def __post_init__(self):
        from diffusers import UNet2DConditionModel

        full = self.channels == (320, 640, 1280, 1280)
        cfg = {} if full else {"block_out_channels": self.channels}
        torch.manual_seed(0)
        with torch.device(self.device):  # initialise in place: the full UNet is slow to build on CPU
            base = UNet2DConditionModel(**cfg)
        if self.dtype != torch.float32:
            base = base.to(self.dtype)
        self.n_tensors = len(list(base.parameters()))
        self.n_params = sum(p.numel() for p in base.parameters())
        pre = {k: v.detach().clone() for k, v in base.state_dict().items()}
        ft = {k: v + 1e-3 * torch.randn_like(v) for k, v in pre.items()}
        # Fused learner on `base`; the literal loop on its own two models (unet, unet_diff).
        # The literal loop starts from the learner's live weights, Delta and logits, so both
        # begin in the same state; built alone (memory), it keeps only its copies.
        self.learner = fg.MaskLearner(base, pre, ft, per_sample_loss, backend=self.backend, **HP)
        del pre, ft
        if "literal" in self.sides:
            self.unet = copy.deepcopy(base)
            self.unet_diff = copy.deepcopy(base)
            with torch.no_grad():
                for (n, p), d in zip(self.unet_diff.named_parameters(), self.learner._delta, strict=True):
                    p.copy_(d)
            self.x_for_mask = torch.nn.Parameter(self.learner.logits.clone())
        if "fused" not in self.sides:
            del self.learner, base
            base = self.unet
        side = 64 if full else 16
        b = 2
        gen = torch.Generator().manual_seed(1)
        self.batch = {
            "noisy": torch.randn(b, 4, side, side, generator=gen).to(self.device, self.dtype),
            "noise": torch.randn(b, 4, side, side, generator=gen).to(self.device, self.dtype),
            "timesteps": torch.tensor([10, 500], device=self.device),
            "cond": torch.randn(b, 77 if full else 8, base.config.cross_attention_dim,
                                generator=gen).to(self.device, self.dtype),
            "is_target": torch.tensor([True, False], device=self.device),
        }
        self.hp = dict(T=HP["temperature"], freeze_ratio=HP["freeze_ratio"], c_sparsity=HP["c_sparsity"],
                       mask_lr=HP["mask_lr"], user_lr=HP["user_lr"])

    # gradients in place, for the update-only timings
    def prepare_grads(self, kind: str) -> None:
        for model in (self.learner.model, self.unet):  # both sides: timing builds both
            model.zero_grad(set_to_none=True)
            losses = per_sample_loss(model, self.batch)
            (releaser_objective(losses, self.batch["is_target"]) if kind == "releaser" else losses.mean()).backward()

    def fused_update(self, kind: str) -> Callable[[], None]:
        lr = self.learner
        grads = [p.grad for p in lr._params]
        if kind == "releaser":
            return lambda: lr._releaser_update(0, None, lr._theta(), lr._delta, grads)
        return lambda: lr._user_update(1, None, lr._theta(), lr._delta, grads)

    def literal_update(self, kind: str) -> Callable[[], None]:
        params, diffs = list(self.unet.parameters()), list(self.unet_diff.parameters())
        if kind == "releaser":
            hp = {k: self.hp[k] for k in ("T", "freeze_ratio", "c_sparsity", "mask_lr")}
            return lambda: authors_loop.releaser_update(params, diffs, self.x_for_mask, **hp)
        hp = {k: self.hp[k] for k in ("T", "user_lr")}
        return lambda: authors_loop.user_update(params, diffs, self.x_for_mask, **hp)

    def fused_step(self, kind: str) -> Callable[[], None]:
        def run():
            self.learner.step_count = 0 if kind == "releaser" else 1  # pick the kind of step
            self.learner.step(self.batch)
        return run

    def literal_step(self, kind: str) -> Callable[[], None]:
        def run():
            losses = per_sample_loss(self.unet, self.batch)
            (releaser_objective(losses, self.batch["is_target"]) if kind == "releaser" else losses.mean()).backward()
            self.literal_update(kind)()
            self.unet.zero_grad(set_to_none=True)
        return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(fused: Callable[[], None], literal: Callable[[], None], device: torch.device, rounds: int,
              warmup: int = 1) -> tuple[float, float]:
    """Median seconds of each, calls interleaved so that load from other processes hits both alike."""
    out: dict[str, list[float]] = {"fused": [], "literal": []}
    for fn in (fused, literal):
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in (("fused", fused), ("literal", literal)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out[name].append(time.perf_counter() - t0)
    return statistics.median(out["fused"]), statistics.median(out["literal"])


# --- peak memory, each implementation alone in a fresh process ------------------------------------
# Timing keeps both implementations in one process (interleaved rounds), so there one side's
# models and gradients sit in memory while the other is measured. Peak memory is therefore
# measured apart: a child process builds only its own side (the learner: live model + Delta; the
# authors' loop: fine-tuned model + difference model + x), runs one warm-up step of each kind,
# resets the peak, and runs a releaser and a user step. CUDA: the allocator's peak; CPU: the
# kernel's peak resident set (VmHWM, reset through /proc/self/clear_refs), so the interpreter
# and libraries are in both figures alike.
def _resident_bytes(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else process_memory.rss_bytes()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        process_memory.reset_peak_rss()


def _peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else process_memory.peak_rss_bytes()


def memory_child(impl: str, device: torch.device, dtype: torch.dtype, channels: tuple[int, ...],
                 backend: str) -> dict:
    """Peak and resident bytes of one implementation's releaser + user step, built alone."""
    before = _resident_bytes(device)
    bench = Bench(device, dtype, channels, backend, sides=(impl,))
    gc.collect()
    resident = _resident_bytes(device)
    step = bench.fused_step if impl == "fused" else bench.literal_step
    for kind in ("releaser", "user"):  # warm-up: lazy allocations (autograd, thread pools) happen here
        step(kind)()
    _sync(device)
    gc.collect()
    _reset_peak(device)
    for kind in ("releaser", "user"):
        step(kind)()
    _sync(device)
    return {"impl": impl, "before_bytes": before, "resident_bytes": resident, "peak_bytes": _peak_bytes(device)}


def measure_memory(device: torch.device, dtype: torch.dtype, channels: tuple[int, ...], backend: str) -> dict:
    """``memory_child`` for both implementations, each in its own interpreter."""
    import subprocess
    import sys

    out = {}
    for impl in ("fused", "literal"):
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", impl, "--device", str(device),
               "--dtype", "bf16" if dtype == torch.bfloat16 else "fp32"]
        env = {**os.environ, "FG_BENCH_CHANNELS": ",".join(map(str, channels)), "FG_BENCH_BACKEND": backend,
               # glibc: every block >= 64 KiB is its own mapping, returned to the kernel when freed,
               # so the resident set follows the live tensors (the default threshold adapts
               # upwards and keeps freed setup buffers resident, to be reused by either side).
               "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {impl} failed:\n{proc.stderr[-3000:]}")
        out[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _channels(device: torch.device) -> tuple[int, ...]:
    env = os.environ.get("FG_BENCH_CHANNELS")
    if env:
        return tuple(int(c) for c in env.split(","))
    return (320, 640, 1280, 1280) if device.type == "cuda" else (96, 192, 384, 384)


def run_all(device: torch.device, dtype: torch.dtype, rounds: int, memory: bool = True) -> dict:
    channels, backend_name = _channels(device), os.environ.get("FG_BENCH_BACKEND", "auto")
    bench = Bench(device, dtype, channels, backend_name)
    backend = fg.backends.resolve(bench.backend, device).name
    rows = []
    for kind in ("releaser", "user"):
        bench.prepare_grads(kind)
        fu, lu = time_pair(bench.fused_update(kind), bench.literal_update(kind), device, rounds)
        bench.unet.zero_grad(set_to_none=True)  # the steps make their own gradients
        fs, ls = time_pair(bench.fused_step(kind), bench.literal_step(kind), device, rounds)
        rows.append({"kind": kind, "update_fused_ms": fu * 1e3, "update_literal_ms": lu * 1e3,
                     "update_speedup": lu / fu, "step_fused_ms": fs * 1e3, "step_literal_ms": ls * 1e3,
                     "step_speedup": ls / fs})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result = {"device": name, "dtype": str(dtype).removeprefix("torch."), "backend": backend,
              "channels": list(bench.channels), "tensors": bench.n_tensors, "params": bench.n_params,
              "rounds": rounds, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if memory:
        del bench
        gc.collect()
        result["memory"] = measure_memory(device, dtype, channels, backend_name)
        result["memory"]["measure"] = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                                       else "peak resident set, VmHWM")
    return result


def format_table(result: dict) -> str:
    head = (f"MaskLearner step on {result['device']}, {result['dtype']}, backend {result['backend']}, UNet "
            f"{result['channels']} ({result['tensors']} tensors, {result['params'] / 1e6:.1f}M params), "
            f"median of {result['rounds']}")
    lines = [head, "| step | update fused ms | update literal ms | update speedup | step fused ms | "
                   "step literal ms | step speedup |", "|" + "---|" * 7]
    for r in result["rows"]:
        lines.append(f"| {r['kind']} | {r['update_fused_ms']:.2f} | {r['update_literal_ms']:.2f} | "
                     f"{r['update_speedup']:.2f}x | {r['step_fused_ms']:.1f} | {r['step_literal_ms']:.1f} | "
                     f"{r['step_speedup']:.2f}x |")
    mem = result.get("memory")
    if mem:
        lines += ["", f"Memory, each implementation alone in a fresh process ({mem['measure']}; releaser + user step "
                      "after one warm-up of each):",
                  "| implementation | before build MiB | resident after build MiB | peak during steps MiB |",
                  "|---|---|---|---|"]
        for impl in ("fused", "literal"):
            m = mem[impl]
            lines.append(f"| {impl} | {m['before_bytes'] / 2**20:.0f} | {m['resident_bytes'] / 2**20:.0f} | "
                         f"{m['peak_bytes'] / 2**20:.0f} |")
        f, lit = mem["fused"]["peak_bytes"], mem["literal"]["peak_bytes"]
        lines.append(f"fused / literal peak: {f / lit:.3f}")
    return "\n".join(lines)


# --- pytest-benchmark ---------------------------------------------------------------------------
_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_RESULTS: dict[tuple[str, str, str, str], float] = {}


@pytest.fixture(scope="module", params=_DEVICES)
def bench(request):
    device = torch.device(request.param)
    n = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("FG_BENCH_THREADS", "1")))
    b = Bench(device, torch.float32, _channels(device), os.environ.get("FG_BENCH_BACKEND", "auto"))
    yield b
    torch.set_num_threads(n)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    for kind in ("releaser", "user"):
        for part in ("update", "step"):
            f = _RESULTS.get((request.param, kind, part, "fused"))
            lit = _RESULTS.get((request.param, kind, part, "literal"))
            if f and lit and reporter:
                reporter.write_line(f"[{request.param}] {kind} {part}: fused {f * 1e3:.2f} ms, literal "
                                    f"{lit * 1e3:.2f} ms, speedup {lit / f:.2f}x")


def _record(benchmark, key, fn, device, rounds):
    benchmark.pedantic(fn, setup=lambda: _sync(device), rounds=rounds, iterations=1, warmup_rounds=1)
    _RESULTS[key] = benchmark.stats.stats.median


@pytest.mark.parametrize("kind", ["releaser", "user"])
@pytest.mark.parametrize("impl", ["fused", "literal"])
def test_update(benchmark, bench, kind, impl):
    benchmark.group = f"{bench.device.type}-{kind}-update"
    bench.prepare_grads(kind)
    fn = bench.fused_update(kind) if impl == "fused" else bench.literal_update(kind)
    _record(benchmark, (bench.device.type, kind, "update", impl), lambda: (fn(), _sync(bench.device)), bench.device, 10)


@pytest.mark.parametrize("kind", ["releaser", "user"])
@pytest.mark.parametrize("impl", ["fused", "literal"])
def test_step(benchmark, bench, kind, impl):
    benchmark.group = f"{bench.device.type}-{kind}-step"
    fn = bench.fused_step(kind) if impl == "fused" else bench.literal_step(kind)
    _record(benchmark, (bench.device.type, kind, "step", impl), lambda: (fn(), _sync(bench.device)), bench.device, 5)


def gpu_suite(out_dir: str, *, device: str = "cuda", rounds: int = 5, step_timeout: int = 240) -> int:
    """Everything the learner needs checked on a GPU machine, results under ``out_dir``:
    the learner's GPU tests, then fp32 and bf16 benchmarks (the full SD-1.5 UNet on CUDA), each in a
    fresh process, so one's memory does not weigh on the other; every step is cut at
    ``step_timeout`` seconds. ``device="cpu"`` (with a small ``FG_BENCH_CHANNELS``) runs the same
    steps on the CPU: the dry run of ``scripts/gpu_bench.sh --dry-run``."""
    import subprocess
    import sys

    os.makedirs(out_dir, exist_ok=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tests = ["tests/test_learner.py", "tests/test_learner_reference.py"]
    steps = [("tests", [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu", *tests])]
    for dtype in ("fp32", "bf16"):
        json_path = os.path.join(out_dir, f"bench_learner_{dtype}.json")
        steps.append((f"bench_{dtype}", [sys.executable, os.path.abspath(__file__), "--device", device,
                                         "--dtype", dtype, "--rounds", str(rounds), "--json", json_path]))
    worst = 0
    for name, cmd in steps:
        with open(os.path.join(out_dir, f"{name}.log"), "w") as log:
            try:
                rc = subprocess.run(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=step_timeout).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        # pytest exits 5 when every selected test was deselected or skipped (a CPU dry run)
        rc = 0 if (name == "tests" and rc == 5 and device == "cpu") else rc
        print(f"{name}: exit {rc} (log {os.path.join(out_dir, name + '.log')})", flush=True)
        worst = max(worst, rc)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the result as JSON here")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-process peak memory measurement")
    parser.add_argument("--memory-child", choices=("fused", "literal"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gpu-suite", metavar="OUT_DIR", default=None,
                        help="run the learner's GPU tests and the fp32 + bf16 benchmarks on --device, "
                             "logs and JSON into OUT_DIR")
    parser.add_argument("--step-timeout", type=int, default=240, help="--gpu-suite: seconds per step")
    args = parser.parse_args()
    if args.gpu_suite:
        raise SystemExit(gpu_suite(args.gpu_suite, device=args.device, rounds=args.rounds,
                                   step_timeout=args.step_timeout))
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("FG_BENCH_THREADS", "1")))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.memory_child:  # one side alone, for measure_memory: its figures as one JSON line
        print(json.dumps(memory_child(args.memory_child, device, dtype, _channels(device),
                                      os.environ.get("FG_BENCH_BACKEND", "auto"))))
        return
    result = run_all(device, dtype, args.rounds, memory=not args.no_memory)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
