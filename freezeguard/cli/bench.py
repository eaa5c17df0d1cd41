"""`freezeguard bench`: time and memory of guarded fine-tuning against full fine-tuning."""
from __future__ import annotations

import argparse
import json
import sys

HELP = "measure step time and memory of guarded vs full fine-tuning of a diffusers denoiser"
DESCRIPTION = (HELP + ". Peak memory: torch.cuda.max_memory_allocated on CUDA; peak RSS delta of a "
               "fresh subprocess per configuration on CPU. Full-size SD-2.1, SDXL, SD3 and Flux "
               "(--model sd21|sdxl|sd3|flux), or any model with --layout, are costed from their "
               "meta-device layout without allocating them: gradient and AdamW-state bytes per GPU "
               "under FSDP2 full sharding (--world-size) and what each frozen ratio saves. The "
               "learner's fused update against the authors' loop is measured by "
               "benchmarks/bench_learner.py in the repository.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="sd15-s",
                        help="real steps: tiny | sd15-s | sd15-m | sd15 (full SD-1.5 UNet) | sd21-tiny | sdxl-tiny | "
                             "sd3-tiny | flux-tiny; layout only: sd21 | sdxl | sd3 | flux (full size)")
    parser.add_argument("--layout", action="store_true",
                        help="cost the model from its meta-device layout (no allocation, no steps); "
                             "always on for sd21, sdxl, sd3, flux")
    parser.add_argument("--world-size", default="1",
                        help="layout mode: comma-separated GPU counts (FSDP2 full sharding), e.g. 1,8,64")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="layout mode: bytes of weights, grads and AdamW moments (fp32: FSDP2 mixed "
                             "precision keeps sharded fp32; bf16: all bf16)")
    parser.add_argument("--device", default="cpu", help="torch device to measure on (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--ratios", default="0,0.1,0.3,0.5,0.7", help="comma-separated frozen ratios")
    parser.add_argument("--by", default="tensors,params", help="budget kinds: tensors, params")
    parser.add_argument("--mask", default=None, help="a learned mask (.safetensors) to measure as well")
    parser.add_argument("--batch", type=int, default=1, help="images per fine-tuning step")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default per model)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--backend", default="auto", help="freezeguard backend for the guarded optimizer")
    parser.add_argument("--lean-frozen-convs", action="store_true",
                        help="also measure each guarded config with fg.guard(..., lean_frozen_convs=True): "
                             "frozen Conv2d layers keep no input for backward")
    parser.add_argument("--in-process", action="store_true",
                        help="no subprocess per configuration (faster; no CPU peak memory)")
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run: sd15-s, ratios 0/0.3/0.7, 3 steps (~1-2 min)")
    parser.add_argument("--json", nargs="?", const="-", default=None,
                        help="write results as JSON to this path ('-' or no value: stdout)")
    parser.add_argument("--png", default=None, help="write the time/memory plot here")


def _print_result(result: dict, table: str, json_path: str | None) -> None:
    """The table on stdout (or the JSON when ``--json -``), and the JSON file written atomically."""
    from freezeguard.core import files

    if json_path == "-":
        print(json.dumps(result, indent=2))
        return
    print(table)
    if json_path:
        files.write_text(json_path, json.dumps(result, indent=2))


def _run_layout(args: argparse.Namespace) -> int:
    from freezeguard.apps.bench import format_layout_table, run_layout_bench

    try:
        sizes = [int(w) for w in args.world_size.split(",") if w]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"--world-size needs GPU counts >= 1, got {args.world_size!r}")
        result = run_layout_bench(model=args.model, ratios=[float(r) for r in args.ratios.split(",") if r],
                                  by=[b for b in args.by.split(",") if b], mask_path=args.mask, world_sizes=sizes,
                                  precision=args.precision)
    except ValueError as exc:
        print(f"freezeguard bench: error: {exc}", file=sys.stderr)
        return 2
    _print_result(result, format_layout_table(result), args.json)
    if args.png:
        print("freezeguard bench: --png is not drawn in layout mode (no timings)", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    import importlib.util
    from pathlib import Path

    from freezeguard.apps.bench import format_table, plot, run_bench
    from freezeguard.core import files
    from freezeguard.integrations.diffusers.layouts import LAYOUT_ONLY

    # Outputs are checked before the (long) measurement, not after it.
    for flag, value in (("--json", args.json if args.json != "-" else None), ("--png", args.png)):
        if value and (Path(value).is_dir() or not Path(value).parent.is_dir()):
            print(f"freezeguard bench: error: {flag} {value}: not a file in an existing folder", file=sys.stderr)
            return 2
    if args.layout or args.model in LAYOUT_ONLY:
        return _run_layout(args)
    if args.png and importlib.util.find_spec("matplotlib") is None:
        print("freezeguard bench: error: --png needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    if args.quick:
        args.ratios, args.steps, args.warmup = "0,0.3,0.7", 3, 1
    result = run_bench(model=args.model, device=args.device,
                       ratios=[float(r) for r in args.ratios.split(",") if r],
                       by=[b for b in args.by.split(",") if b], mask_path=args.mask, batch=args.batch,
                       latent=args.latent, steps=args.steps, warmup=args.warmup, bf16=args.bf16,
                       checkpointing=args.checkpointing, backend=args.backend,
                       lean_frozen_convs=args.lean_frozen_convs,
                       isolate=False if args.in_process else None, progress=sys.stderr.isatty())
    _print_result(result, format_table(result), args.json)
    if args.png:
        with files.atomic_path(args.png) as tmp:
            plot(result, str(tmp))
    return 0
