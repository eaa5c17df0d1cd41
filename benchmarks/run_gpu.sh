#!/usr/bin/env bash
# GPU checks for the fused ops (issue 2): the op grid on CUDA, then the CUDA benchmarks on
# the full-size SD-1.5 UNet list, summarised as Markdown for benchmarks/RESULTS.md.
# Usage (repository root, freezeguard importable):  bash benchmarks/run_gpu.sh [OUT_DIR]
set -uo pipefail
OUT_DIR="${1:-${OUT:-/tmp/freezeguard_gpu}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
"$PY" -m freezeguard info | tee "$OUT_DIR/info.txt"

# 1. the grid on CUDA (and CPU, for the cpp backend built on this machine)
"$PY" -m pytest -q tests/test_ops.py tests/test_build.py -rs 2>&1 | tail -40 | tee "$OUT_DIR/test_ops.txt"

# 2. the CUDA benchmarks (triton, cuda vs torch fused/foreach AdamW and the authors' loops)
"$PY" -m pytest -q benchmarks/bench_ops.py -k cuda --fg-rounds 10 \
    --benchmark-json="$OUT_DIR/bench_gpu.json" 2>&1 | tail -15 | tee "$OUT_DIR/bench_gpu.txt"
"$PY" benchmarks/report.py "$OUT_DIR/bench_gpu.json" \
    --title "CUDA: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u +%F)" \
    | tee "$OUT_DIR/bench_gpu.md"
