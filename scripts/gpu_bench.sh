#!/usr/bin/env bash
# The GPU benchmark batch behind benchmarks/RESULTS.md: op microbenchmarks (triton, cuda vs torch
# AdamW fused/foreach and the authors' per-tensor loops), Triton block-size sweep, learner step.
# Usage on a CUDA machine with freezeguard installed: bash scripts/gpu_bench.sh OUT_DIR
set -uo pipefail
OUT_DIR="${1:?usage: gpu_bench.sh OUT_DIR}"
mkdir -p "$OUT_DIR" /tmp/fg_bench
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
title="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), torch $($PY -c 'import torch;print(torch.__version__)'), triton $($PY -c 'import triton;print(triton.__version__)'), $(date -u +%F)"
echo "$title" | tee "$OUT_DIR/gpu.txt"
timeout 200 "$PY" -m pytest -q benchmarks/bench_ops.py -k cuda --fg-rounds 10 \
    --benchmark-json=/tmp/fg_bench/ops.json > /tmp/fg_bench/ops.log 2>&1
echo "bench_ops rc=$?"; tail -3 /tmp/fg_bench/ops.log
"$PY" benchmarks/report.py /tmp/fg_bench/ops.json --title "$title" > "$OUT_DIR/bench_ops.md" 2>&1
timeout 60 "$PY" benchmarks/gpu_cuda_sanitize.py --bench > "$OUT_DIR/cuda_bench.txt" 2>&1; echo "cuda bench rc=$?"
timeout 150 "$PY" benchmarks/tune_triton.py --dtypes fp32,bf16 > "$OUT_DIR/triton_tune.txt" 2>&1; echo "tune rc=$?"
for dt in fp32 bf16; do
  timeout 60 "$PY" benchmarks/bench_learner.py --device cuda --dtype $dt --json "/tmp/fg_bench/learner_$dt.json" \
      >> "$OUT_DIR/learner.txt" 2>&1; echo "learner $dt rc=$?"
done
