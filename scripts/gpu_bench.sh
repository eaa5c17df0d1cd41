#!/usr/bin/env bash
# Everything issue 29 measures on a GPU, in one call of under 8 minutes on a bare H100/H200 whose
# python3 has torch and triton but not diffusers (see benchmarks/RESULTS.md, "What a GPU session runs").
#
#   bash scripts/gpu_wheels.sh                  # here, once: diffusers & co. into .whl/ (~7 MB)
#   bash scripts/gpu_bench.sh "$OUT"            # there: `run` with carry [".whl"], timeout_s 540
#   bash scripts/gpu_bench.sh --dry-run DIR     # on a CPU: every step at tiny size, same commands
#
# Steps (each its own log under OUT_DIR, its exit status and seconds in OUT_DIR/summary.tsv; a step
# past its time limit is stopped with exit 124 and the next one runs; the whole stays under
# FG_DEADLINE_S, default 470 s):
#   install   the carried wheels, then freezeguard editable with its C++ and CUDA extensions built
#   gpu_tests pytest -m gpu over tests/ (ops, optimizer, capturable + CUDA graphs, learner, stacks)
#   bench_fp32, bench_bf16_ckpt
#             freezeguard bench --model sd15: fp32 batch 2, and bf16 + checkpointing batch 8, at 0 % and
#             70 % of parameters frozen against torch.optim.AdamW(fused) in the same run (JSON)
#   graph     the sanitizer driver's CUDA-graph capture/replay of the capturable AdamW vs the eager reference
#   racecheck compute-sanitizer --tool racecheck on the reduced driver case (--small)
#   learner   benchmarks/bench_learner.py --gpu-suite: learner GPU tests, peak memory and update speed
#             against the authors' loop, fp32 and bf16
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR="${1:-${OUT:-/tmp/fg_gpu}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"
DEADLINE=$(( $(date +%s) + ${FG_DEADLINE_S:-$([ "$DRY" = 1 ] && echo 1200 || echo 470)} ))
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/fg_torch_ext}"  # JIT builds stay out of OUT_DIR
SUMMARY="$OUT_DIR/summary.tsv"
printf 'step\texit\tseconds\tlog\n' > "$SUMMARY"

# step NAME LIMIT_S CMD...: run CMD with its output in OUT_DIR/NAME.log, cut at LIMIT_S (or the deadline)
step() {
    local name="$1" limit="$2"; shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -lt 15 ]; then
        printf '%s\tskipped (deadline)\t0\t-\n' "$name" >> "$SUMMARY"; echo "== $name: skipped (deadline)"; return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$name.log" >> "$SUMMARY"
    echo "   exit $rc after $(( $(date +%s) - t0 ))s; last lines:"; tail -4 "$OUT_DIR/$name.log" | sed 's/^/   | /'
}

if [ "$DRY" = 1 ]; then
    # The same steps on the CPU at tiny size; only the install is checked instead of done (this
    # machine's environment already has freezeguard and diffusers).
    DEV=cpu
    export FG_BENCH_CHANNELS="32,64,128,128" FG_BENCH_THREADS=1 OMP_NUM_THREADS=1
    BENCH=(--device cpu --model tiny --latent 8 --steps 1 --warmup 0 --in-process)
    BENCH_FP32=(--batch 1); BENCH_BF16=(--batch 2 --checkpointing)
    LEARNER=(--rounds 1 --step-timeout 150); LEARNER_LIMIT=400  # the CPU builds each UNet slowly
    install() {
        ls .whl/*.whl || { echo "no .whl/: run scripts/gpu_wheels.sh first (the GPU machine has no diffusers)"; return 1; }
        "$PY" -m pip install --dry-run --no-index --no-deps --target /tmp/fg_dry_site .whl/*.whl &&
        "$PY" -c "from freezeguard.backends import _build; print(_build.load_extension('cpu'))"
    }
    graph() { "$PY" benchmarks/gpu_cuda_sanitize.py --cpu-dry-run --small; }
    racecheck() { "$PY" benchmarks/gpu_cuda_sanitize.py --cpu-dry-run --small; }
    FG=("$PY" -m freezeguard)
else
    DEV=cuda
    BENCH=(--device cuda --model sd15 --steps 5 --warmup 2 --in-process)
    BENCH_FP32=(--batch 2); BENCH_BF16=(--batch 8 --bf16 --checkpointing)
    LEARNER=(--rounds 3 --step-timeout 50); LEARNER_LIMIT=110
    install() {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        "$PY" -c 'import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)'
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl &&
        MAX_JOBS=16 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . &&
        "$PY" -m freezeguard info
    }
    graph() { "$PY" benchmarks/gpu_cuda_sanitize.py --small; }
    racecheck() {
        local san; san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
        [ -n "$san" ] || { echo "compute-sanitizer not found"; return 2; }
        "$san" --tool racecheck --error-exitcode 99 "$PY" benchmarks/gpu_cuda_sanitize.py --small --no-graph
    }
    FG=("$PY" -m freezeguard)
fi
export -f install graph racecheck 2>/dev/null
export PY

{
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
    date -u +%FT%TZ
    [ "$DRY" = 1 ] && echo "DRY RUN on the CPU: no figure here is a GPU figure"
} > "$OUT_DIR/run.txt"

step install 150 bash -c install
step gpu_tests 110 "$PY" -m pytest tests -q -rs -p no:cacheprovider -m gpu --junitxml="$OUT_DIR/gpu_tests.xml"
step bench_fp32 70 "${FG[@]}" bench "${BENCH[@]}" "${BENCH_FP32[@]}" --ratios 0,0.7 --by params \
    --json "$OUT_DIR/bench_fp32.json"
step bench_bf16_ckpt 80 "${FG[@]}" bench "${BENCH[@]}" "${BENCH_BF16[@]}" --ratios 0,0.7 --by params \
    --json "$OUT_DIR/bench_bf16_ckpt.json"
step graph 30 bash -c graph
step racecheck 60 bash -c racecheck
# last: it takes whatever time is left (each of its three parts is cut at --step-timeout)
step learner "$LEARNER_LIMIT" "$PY" benchmarks/bench_learner.py --gpu-suite "$OUT_DIR/learner" --device "$DEV" \
    "${LEARNER[@]}"
echo "== summary ($SUMMARY)"; column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
