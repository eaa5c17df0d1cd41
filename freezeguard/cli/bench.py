"""`freezeguard bench`: time and memory of guarded fine-tuning against full fine-tuning."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from freezeguard.cli.flags import Renamed, RenamedSwitch
from freezeguard.core.values import check_ratio

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
                             "sd3-tiny | flux-tiny; layout only: sd21 | sdxl | sd3 | flux (full size). sd15-s and "
                             "sd15-m are the SD-1.5 UNet's layout (all 686 tensors, same blocks) with the channels "
                             "scaled down to 32-128 and 96-384 so a CPU runs them; every model is built from its "
                             "config with random weights (nothing is downloaded)")
    parser.add_argument("--layout", action="store_true",
                        help="cost the model from its meta-device layout (no allocation, no steps); "
                             "always on for sd21, sdxl, sd3, flux")
    parser.add_argument("--world-size", default="1",
                        help="layout mode: comma-separated GPU counts (FSDP2 full sharding), e.g. 1,8,64")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="real steps: bf16 autocast for forward and backward (CUDA only); layout mode: bytes "
                             "of weights, grads and AdamW moments (fp32: FSDP2 mixed precision keeps sharded "
                             "fp32; bf16: all bf16)")
    parser.add_argument("--device", default="cpu", help="torch device to measure on (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--ratios", default="0,0.1,0.3,0.5,0.7", help="comma-separated frozen ratios")
    parser.add_argument("--budget-by", "--by", dest="by", action=Renamed, default="tensors,params",
                        help="what each ratio counts, comma-separated: tensors, params (--by: deprecated spelling)")
    parser.add_argument("--mask", default=None, help="a learned mask (.safetensors) to measure as well")
    parser.add_argument("--batch-size", "--batch", dest="batch", type=int, action=Renamed, default=1,
                        help="images per fine-tuning step (--batch: deprecated spelling)")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default per model)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    parser.add_argument("--bf16", dest="precision", action=RenamedSwitch, new="--precision", const="bf16")
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


class _Usage(ValueError):
    """A bad argument, said (exit 2) before any model is built or step timed."""


def _numbers(flag: str, text: str, kind=float) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise _Usage(f"{flag} needs comma-separated numbers, got {text!r}") from None
    if not values:
        raise _Usage(f"{flag} is empty")
    return values


def _is_ratio(value: float) -> bool:
    try:
        check_ratio(value)
    except ValueError:
        return False
    return True


def check_args(args: argparse.Namespace) -> dict:
    """Every argument checked before any work; returns the run's values (ratios, by, world sizes,
    steps, warmup, layout), ``--quick``'s presets applied; ``args`` is left as parsed."""
    from freezeguard.backends import status
    from freezeguard.integrations.diffusers.bench_presets import LAYOUT_ONLY, preset_names

    if args.model not in preset_names():
        raise _Usage(f"--model {args.model!r} is not a model this build knows; choose one of "
                     f"{', '.join(preset_names())}")
    ratios_text, steps, warmup = ("0,0.3,0.7", 3, 1) if args.quick else (args.ratios, args.steps, args.warmup)
    ratios = _numbers("--ratios", ratios_text)
    bad = [r for r in ratios if not _is_ratio(r)]
    if bad:
        raise _Usage(f"--ratios must lie in [0, 1], got {', '.join(map(str, bad))}")
    by = [b.strip() for b in args.by.split(",") if b.strip()]
    if not by or set(by) - {"tensors", "params"}:
        raise _Usage(f"--budget-by takes tensors, params or both (comma-separated), got {args.by!r}")
    sizes = _numbers("--world-size", args.world_size, int)
    if min(sizes) < 1:
        raise _Usage(f"--world-size needs GPU counts >= 1, got {args.world_size!r}")
    for flag, value, low in (("--batch-size", args.batch, 1), ("--steps", steps, 1), ("--warmup", warmup, 0),
                             ("--latent", 1 if args.latent is None else args.latent, 1)):
        if value < low:
            raise _Usage(f"{flag} must be >= {low}, got {value}")
    if args.mask is not None and not Path(args.mask).is_file():
        raise _Usage(f"--mask {args.mask} does not exist")
    layout = args.layout or args.model in LAYOUT_ONLY
    if not layout:
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise _Usage(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise _Usage(f"--device {args.device}: torch sees no CUDA device")
        if args.precision == "bf16" and device.type != "cuda":
            raise _Usage("--precision bf16 is measured on CUDA only (CPU autocast timings mislead)")
        if args.backend != "auto":
            try:
                known = status(args.backend)
            except (KeyError, ValueError) as exc:
                raise _Usage(f"--backend: {exc}") from None
            if not known.available:
                raise _Usage(f"--backend {args.backend} is not available here: {known.reason}")
    json_path = args.json if args.json != "-" else None
    try:
        from freezeguard.core import files

        files.check_outputs({"--json": json_path, "--png": args.png}, {"--mask": args.mask})
    except ValueError as exc:
        raise _Usage(str(exc)) from None
    for flag, value in (("--json", json_path), ("--png", args.png)):
        if value and Path(value).is_dir():
            raise _Usage(f"{flag} {value} is a folder; give a file name")
    return {"ratios": ratios, "by": by, "world_sizes": sizes, "steps": steps, "warmup": warmup, "layout": layout}


def _run_layout(args: argparse.Namespace, checked: dict) -> int:
    from freezeguard.apps.bench import format_layout_table, run_layout_bench

    try:
        result = run_layout_bench(model=args.model, ratios=checked["ratios"], by=checked["by"], mask_path=args.mask,
                                  world_sizes=checked["world_sizes"], precision=args.precision)
    except ValueError as exc:
        print(f"freezeguard bench: error: {exc}", file=sys.stderr)
        return 2
    _print_result(result, format_layout_table(result), args.json)
    if args.png:
        print("freezeguard bench: --png is not drawn in layout mode (no timings)", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    from freezeguard.apps.plots import plots_available

    try:
        checked = check_args(args)
        if args.png and not checked["layout"] and not plots_available():
            raise _Usage("--png needs matplotlib (pip install matplotlib)")
    except _Usage as exc:
        print(f"freezeguard bench: error: {exc}", file=sys.stderr)
        return 2
    if checked["layout"]:
        return _run_layout(args, checked)

    from freezeguard.apps.bench import format_table, plot, run_bench
    from freezeguard.core import files

    result = run_bench(model=args.model, device=args.device, ratios=checked["ratios"], by=checked["by"],
                       mask_path=args.mask, batch=args.batch, latent=args.latent, steps=checked["steps"],
                       warmup=checked["warmup"], bf16=args.precision == "bf16", checkpointing=args.checkpointing,
                       backend=args.backend, lean_frozen_convs=args.lean_frozen_convs,
                       isolate=False if args.in_process else None, progress=sys.stderr.isatty())
    _print_result(result, format_table(result), args.json)
    if args.png:
        with files.atomic_path(args.png) as tmp:
            plot(result, str(tmp))
    return 0
