#!/usr/bin/env bash
# One call on the GPU machine runs several stages, each under its own time cap, and leaves logs and
# results under $OUT (the device tool brings that folder back). Stages: tests, moe, moe-sweep, e2e,
# e2e-full, glm-decode, glm-prefill, profile, fp8, kv-transfer, prefix, structured.
# Usage: benchmarks/gpu_session.sh STAGE[:SECONDS] ...
# The pending runs of issues 12, 13, 15, 16, 17 and 18 (one H200) fit one call, e.g.:
#   tests:240 profile:150 fp8:60 kv-transfer:120 structured:60 prefix:90 glm-prefill:60
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_F32_DEFAULT=ieee
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'

run_stage() {
  local name=$1 cap=$2
  echo "=== $name (cap ${cap}s) $(date +%T)"
  local t0=$SECONDS
  case $name in
    tests) timeout "$cap" python3 -m pytest -m gpu -q -p no:cacheprovider \
             tests/kernels tests/engine/test_cuda_graphs.py tests/model tests/parallel/test_tp_gpu.py \
             2>&1 | tail -25 ;;
    moe) timeout "$cap" python3 -m kernels.bench_moe --out "$OUT/moe-h200.json" 2>&1 | tail -30 ;;
    moe-sweep) timeout "$cap" python3 -m kernels.bench_moe --sweep --out "$OUT/moe-sweep.json" \
                 2>&1 | grep "^|" | tail -12 ;;
    e2e) timeout "$cap" python3 -m benchmarks.e2e --contexts 16384 65536 --batches 1 16 \
           --rounds 8 --out "$OUT/e2e-smoke.json" 2>&1 | grep -v "^ \"" | tail -40 ;;
    e2e-full) timeout "$cap" python3 -m benchmarks.e2e --chunks 4096 8192 16384 \
                --out "$OUT/e2e-h200.json" 2>&1 | grep -v "^ \"" | tail -60 ;;
    glm-decode) timeout "$cap" python3 -m kernels.bench --sections glm_decode 2>&1 | tail -30 ;;
    glm-prefill) timeout "$cap" python3 -m kernels.bench --sections glm_indexer,glm_sparse 2>&1 \
                   | tail -30 ;;
    fp8) timeout "$cap" python3 -m kernels.bench_fp8_gemm --out "$OUT/fp8-gemm-h200.json" 2>&1 \
           | tail -30 ;;
    kv-transfer) timeout "$cap" python3 -m benchmarks.kv_transfer --device cuda \
                   --out "$OUT/kv_transfer-h200.json" 2>&1 | tail -30 ;;
    prefix) timeout "$cap" python3 -m benchmarks.prefix_cache --preset glm-mid --device cuda \
              --dtype bfloat16 --prefix-tokens 131072 --new-tokens 1024 \
              --out "$OUT/prefix_cache-h200.json" 2>&1 | tail -20 ;;
    structured) timeout "$cap" python3 -m benchmarks.structured_decode --preset glm-mid \
                  --device cuda --dtype bfloat16 --out "$OUT/structured_decode-h200.json" 2>&1 \
                  | tail -20 ;;
    profile) timeout "$cap" python3 -m benchmarks.e2e_profile --out "$OUT" --top 18 2>&1 \
               | tail -90 ;;
    *) echo "unknown stage $name" ;;
  esac
  echo "=== $name done in $((SECONDS - t0)) s"
}

for spec in "$@"; do
  run_stage "${spec%%:*}" "${spec#*:}"
done
