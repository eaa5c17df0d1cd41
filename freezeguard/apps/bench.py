"""End-to-end cost of guarded fine-tuning against full fine-tuning (``freezeguard bench``).

For one UNet preset, measures full fine-tuning (``torch.optim.AdamW``, fused where available)
and guarded fine-tuning (``fg.guard`` with random masks at each frozen ratio, by tensors and by
parameters, or a learned mask from a file): median step time, optimizer step time (wall, host and,
on CUDA, device), peak memory,
gradient and optimizer-state bytes, each also as a ratio to full fine-tuning measured in the same
run. See :mod:`freezeguard.apps.bench_step` for what each memory figure means.

Layout-only mode (``freezeguard bench --model sdxl|sd3|flux``, or ``--layout`` for any preset):
the model is built on the meta device, nothing is allocated or run, and each frozen ratio is
costed with the memory model (:mod:`freezeguard.apps.memory_model`): gradient and AdamW-state bytes
per GPU, and what freezing saves, at each ``--world-size`` under FSDP2 full sharding.

Run:
    freezeguard bench --quick                    # CPU, 1-2 minutes
    freezeguard bench --device cuda --model sd15 --bf16 --checkpointing --json $OUT/bench.json
    freezeguard bench --model flux --world-size 1,8,64   # layout only: seconds, no allocation

Example:
    >>> from freezeguard.apps.bench import run_bench, format_table
    >>> res = run_bench(model="tiny", ratios=(0.5,), by=("tensors",), steps=1, warmup=0, latent=8,
    ...                 isolate=False, progress=False)
    >>> [r["mode"] for r in res["rows"]]
    ['full', 'guard']
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from freezeguard.apps.bench_step import measure
from freezeguard.apps.memory_model import memory_rows
from freezeguard.core.mask import FreezeMask
from freezeguard.integrations.diffusers.bench_presets import build_model

RATIOS = (0.0, 0.1, 0.3, 0.5, 0.7)


def _measure_isolated(cfg: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in a fresh interpreter, so its peak RSS is its own."""
    cmd = [sys.executable, "-m", "freezeguard.apps.bench", "--worker", json.dumps(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {cfg}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def configs(*, ratios: Sequence[float], by: Sequence[str], mask_path: str | None,
            **common: Any) -> list[dict[str, Any]]:
    """The configurations of one run: full first (the anchor), then each guarded one."""
    out = [dict(common, mode="full")]
    if mask_path:
        out.append(dict(common, mode="guard", mask_path=mask_path))
    for b in by:
        for r in ratios:
            if r == 0.0 and b != by[0]:
                continue  # an empty mask is the same by tensors or by params
            out.append(dict(common, mode="guard", ratio=float(r), by=b))
    return out


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    full = rows[0]
    for r in rows:
        for key in ("step_s", "opt_step_s", "opt_host_s", "opt_device_s", "peak_bytes", "grad_bytes", "state_bytes", "saved_bytes"):
            a, b = r.get(key), full.get(key)
            r[f"{key}_vs_full"] = (a / b) if a is not None and b else None


def run_bench(*, model: str = "sd15-s", device: str = "cpu", ratios: Iterable[float] = RATIOS,
              by: Sequence[str] = ("tensors", "params"), mask_path: str | None = None, batch: int = 1,
              latent: int | None = None, steps: int = 5, warmup: int = 2, bf16: bool = False,
              checkpointing: bool = False, backend: str = "auto", lean_frozen_convs: bool = False,
              isolate: bool | None = None, progress: bool = True) -> dict[str, Any]:
    """Measure every configuration; returns ``{"meta": ..., "rows": [...]}``.

    The learner's fused update against the authors' per-tensor loop is a development benchmark
    (``benchmarks/bench_learner.py``), not part of this command.

    ``isolate`` (default: True on CPU) runs each configuration in a fresh subprocess, which is
    what makes the CPU peak-RSS figure meaningful; on CUDA the allocator's counters are used.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    if bf16 and not device.startswith("cuda"):
        raise ValueError("bf16 mixed precision is measured on CUDA only (CPU autocast timings mislead)")
    isolate = (not device.startswith("cuda")) if isolate is None else isolate
    common = dict(model=model, device=device, batch=batch, latent=latent, steps=steps, warmup=warmup,
                  bf16=bf16, checkpointing=checkpointing, backend=backend)
    todo = configs(ratios=tuple(ratios), by=tuple(by), mask_path=mask_path, **common)
    if lean_frozen_convs:  # each guarded configuration again, frozen convs keeping no input (core/lean_convs.py)
        todo += [dict(c, lean_frozen_convs=True) for c in todo if c["mode"] == "guard" and c.get("ratio")]
    rows = []
    for cfg in tqdm(todo, desc="bench", disable=not progress):
        rows.append(_measure_isolated(cfg) if isolate else measure(cfg))
    _add_ratios(rows)
    meta = dict(torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
                device_name=torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor()
                or platform.machine(), isolate=isolate, **common)
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = None
    return {"meta": meta, "rows": rows}


def run_layout_bench(*, model: str, ratios: Iterable[float] = RATIOS, by: Sequence[str] = ("tensors", "params"),
                     mask_path: str | None = None, world_sizes: Sequence[int] = (1,), precision: str = "fp32",
                     seed: int = 0) -> dict[str, Any]:
    """Cost every configuration from the meta-device layout (no allocation); ``{"meta", "rows"}``.

    Rows are :func:`freezeguard.apps.memory_model.memory_rows` guarded rows (full fine-tuning is the 0
    ratio), each with ``saved_vs_full``: the share of full fine-tuning's gradient + AdamW-state
    bytes that the mask saves.
    """
    meta_model = build_model(model, device="meta", seed=seed)
    ratios = sorted({0.0, *map(float, ratios)})
    masks = {mask_path: FreezeMask.load(mask_path, model=meta_model)} if mask_path else None
    rows: list[dict[str, Any]] = []
    for i, b in enumerate(by):
        rs = ratios if i == 0 else [r for r in ratios if r > 0]  # the empty mask once
        rows += [r for r in memory_rows(meta_model, world_sizes=world_sizes, ratios=rs, by=b, precision=precision,
                                        seed=seed, masks=masks if i == 0 else None) if r["kind"] == "guarded"]
    for r in rows:
        full = next(f for f in rows if f["world_size"] == r["world_size"] and f["ratio"] == 0.0)
        r["saved_vs_full"] = r["saved_grads_state"] / (full["grads"] + full["optimizer_state"])
    rows.sort(key=lambda r: (r["world_size"], r["ratio"] is None, r["by"] != by[0], r["ratio"] or 0.0))
    meta = dict(model=model, layout_only=True, precision=precision, world_sizes=list(world_sizes),
                tensors=len(list(meta_model.parameters())),
                parameters=sum(p.numel() for p in meta_model.parameters()), model_class=type(meta_model).__name__,
                torch=torch.__version__)
    return {"meta": meta, "rows": rows}


def format_layout_table(result: dict[str, Any]) -> str:
    """Markdown: per GPU (rank 0 under FSDP2 full sharding), GiB, and the share saved."""
    m = result["meta"]
    gib = 2**30
    lines = [f"model {m['model']} ({m['model_class']}, {m['tensors']} tensors, {m['parameters'] / 1e9:.3f}B "
             f"parameters), layout only (meta device, nothing allocated); {m['precision']} weights, grads and "
             f"AdamW moments; per GPU = rank 0 of FSDP2 full sharding"
             + (f"; totals include {result['rows'][0]['buffers'] / 2**20:.0f} MiB of replicated buffers"
                if result["rows"] and result["rows"][0].get("buffers") else ""),
             "",
             "| GPUs | config | frozen t/p | weights GiB | grads GiB | AdamW state GiB | total GiB "
             "| grads+state saved GiB | saved / full |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["ratio"] is None:
            name = "guard mask file"
        elif r["ratio"] == 0:
            name = "full"
        else:
            name = f"guard {r['ratio']:.0%} by {r['by']}"
        lines.append(f"| {r['world_size']} | {name} | {r['frozen_ratio_tensors']:.2f}/{r['frozen_ratio_params']:.2f} "
                     f"| {r['weights'] / gib:.2f} | {r['grads'] / gib:.2f} | {r['optimizer_state'] / gib:.2f} "
                     f"| {r['total'] / gib:.2f} | {r['saved_grads_state'] / gib:.2f} | {r['saved_vs_full']:.1%} |")
    return "\n".join(lines)


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.2f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table: one row per configuration, ratios against full fine-tuning."""
    m = result["meta"]
    lines = [f"model {m['model']} on {m['device']} ({m['device_name']}), batch {m['batch']}, "
             f"bf16 {m['bf16']}, checkpointing {m['checkpointing']}, torch {m['torch']}; "
             f"peak = {result['rows'][0]['peak_measure']}",
             "",
             "| config | frozen t/p | step ms | x full | opt ms | x full | peak MiB | x full "
             "| grad MiB | state MiB | x full | saved act. MiB | opt host ms | x full | opt device ms | x full |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["mode"] == "full":
            name = r["impl"]
        elif r.get("mask_path"):
            name = "guard mask file"
        else:
            name = f"guard {r['ratio']:.0%} by {r['by']}" + (" lean-conv" if r.get("lean_frozen_convs") else "")
        lines.append(
            f"| {name} | {r['frozen_ratio_tensors']:.2f}/{r['frozen_ratio_params']:.2f} "
            f"| {r['step_s'] * 1e3:.1f} | {_x(r['step_s_vs_full'])} | {r['opt_step_s'] * 1e3:.2f} "
            f"| {_x(r['opt_step_s_vs_full'])} | {_mib(r['peak_bytes'])} | {_x(r['peak_bytes_vs_full'])} "
            f"| {_mib(r['grad_bytes'])} | {_mib(r['state_bytes'])} | {_x(r['state_bytes_vs_full'])} "
            f"| {_mib(r.get('saved_bytes'))} | {r['opt_host_s'] * 1e3:.2f} | {_x(r['opt_host_s_vs_full'])} "
            f"| {_ms(r.get('opt_device_s'))} | {_x(r.get('opt_device_s_vs_full'))} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """PNG: step time and peak memory (or grad + state bytes) against frozen ratio, per budget kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    mem_key = "peak_bytes_vs_full" if rows[0].get("peak_bytes") else "state_bytes_vs_full"
    for by in ("tensors", "params"):
        # x = the realised frozen fraction in the budget's own unit; the 0% mask counts for both.
        sel = [r for r in rows if r["mode"] == "guard" and not r.get("mask_path") and not r.get("lean_frozen_convs")
               and (r["by"] == by or r["ratio"] == 0)]
        if not any(r["by"] == by for r in sel):
            continue
        for ax, key in zip(axes, ("step_s_vs_full", mem_key), strict=True):
            xy = sorted((r[f"frozen_ratio_{by}"], r[key]) for r in sel)
            ax.plot([a for a, _ in xy], [b for _, b in xy], "o-", label=f"guard, by {by}")
    learned = [r for r in rows if r.get("mask_path")]
    for r in learned:
        axes[0].plot([r["frozen_ratio_tensors"]], [r["step_s_vs_full"]], "k*", label="guard, mask file")
        axes[1].plot([r["frozen_ratio_tensors"]], [r[mem_key]], "k*", label="guard, mask file")
    for ax, title in zip(axes, ("step time / full fine-tuning", f"{mem_key[:-8]} / full fine-tuning"), strict=True):
        ax.axhline(1.0, color="gray", ls="--", label="full (torch AdamW)")
        ax.set_xlabel("frozen fraction (realised, in the budget's unit)")
        ax.set_title(title)
        ax.legend()
    m = result["meta"]
    fig.suptitle(f"freezeguard bench: {m['model']} on {m['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """The subprocess entry of :func:`_measure_isolated`: ``--worker CONFIG_JSON`` measures one config."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["--worker"] or len(argv) != 2:
        print("usage: python -m freezeguard.apps.bench --worker CONFIG_JSON (use `freezeguard bench`)",
              file=sys.stderr)
        return 2
    print(json.dumps(measure(json.loads(argv[1]), track_rss=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
