#!/usr/bin/env bash
# The whole serving stack on the GPU machine (or, with --quick, a tiny model on this CPU):
#   bash benchmarks/stack/run_stack.sh [--quick] STEP ...
# Steps, in the order the device calls use them (benchmarks/README.md, "Whole stack"):
#   model        write the GLM-4.7-Flash-shaped random checkpoint + stack.yaml (needs no wheels)
#   install      join the staged parts, check every sha256, pip install --target the wheels
#   load PLAN    serve (disaggregated: prefill + decode replica, half the GPU each) and run the
#                Locust saturate load test; PLAN is all-F or quarter
#   compare      all-F vs quarter: results JSON + table
# Results (reports, PNGs, a tarball of each run folder, stack.json) go to $OUT.
# Settings (environment): STACK_DURATION (s of load), STACK_MODEL_ARGS (extra model.py flags,
# e.g. "--layers 24 --doc-tokens 8192 --max-tokens 256 --fit 24"), STACK_PORT.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 TRITON_F32_DEFAULT=ieee
PY=${PYTHON:-python3}
QUICK=0
if [[ ${1:-} == --quick ]]; then QUICK=1; shift; fi
if ((QUICK)); then
  base=${STACK_HOME:-.cache/stack-quick}
  MODEL=${STACK_MODEL:-$base/model} RUNS=${STACK_RUNS:-$base/runs} OUT=${OUT:-$base/out}
  DURATION=${STACK_DURATION:-40} PORT=${STACK_PORT:-8391} MODEL_FLAGS="--quick"
  BUDGET=${STACK_CALL_BUDGET:-0}
else
  MODEL=${STACK_MODEL:-/tmp/stack-model} RUNS=${STACK_RUNS:-/tmp/stack-runs} OUT=${OUT:-out}
  BUDGET=${STACK_CALL_BUDGET:-590}  # a device call is killed at 600 s: stop in time to keep results
  DURATION=${STACK_DURATION:-120} PORT=${STACK_PORT:-8000} MODEL_FLAGS=""
fi
PARTS=${STACK_PARTS:-/tmp/stack-parts} WHEELS=${STACK_WHEELS:-/tmp/stack-wheels}
SITE=${STACK_SITE:-/tmp/stack-site}
mkdir -p "$OUT" "$RUNS"
site_path() { if [[ -f $SITE/.installed ]]; then echo "$SITE:$PWD"; else echo "$PWD"; fi; }
export PYTHONPATH=$(site_path)
failed=()
gpu_mem() { command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true; }

step_model() {
  df -h "$(dirname "$MODEL")" /dev/shm | tail -2
  free -g | head -2
  "$PY" -m benchmarks.stack.model --out "$MODEL" --port "$PORT" $MODEL_FLAGS ${STACK_MODEL_ARGS:-}
}

step_install() {
  local plan
  plan=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['plan_id'])" "$PARTS/manifest.json") || return 1
  if [[ -f $SITE/.installed && $(cat "$SITE/.installed") == "$plan" ]]; then
    echo "install: plan $plan already installed in $SITE"
  else
    PYTHONPATH=$PWD "$PY" -m benchmarks.stack.device_env "$PARTS" || return 1
    PYTHONPATH=$PWD "$PY" -m benchmarks.stack.parts assemble --parts "$PARTS" --out "$WHEELS" || return 1
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl || return 1
    echo "$plan" > "$SITE/.installed"
  fi
  export PYTHONPATH=$(site_path)
  "$PY" -c "import ray, fastapi, pydantic, uvicorn, locust, llguidance, openai
print('install: ray', ray.__version__, 'from', ray.__file__)
print('install: fastapi', fastapi.__version__, 'pydantic', pydantic.__version__, 'locust', locust.__version__)" || return 1
  if ((!QUICK)); then  # replicas ask for 0.5 GPU each: a Ray that sees no GPU would never place them
    "$PY" -c "from ray._private.accelerators import NvidiaGPUAcceleratorManager as m
n = m.get_current_node_num_accelerators(); print('install: Ray sees', n, 'GPU(s)'); raise SystemExit(n < 1)" || return 1
  fi
}

step_load() {
  local plan=$1 rc
  if ((!QUICK)) && [[ ! -f $SITE/.installed ]]; then
    echo "load: no wheels installed in $SITE: the machine went back since the install call;" \
      "run the staging calls again (the plan wheels.py printed)"
    return 1
  fi
  [[ -f $MODEL/config.json ]] || step_model || return 1
  local cap=()
  if ((BUDGET)); then cap=(timeout --signal=TERM --kill-after=20 $((BUDGET - SECONDS - 40))); fi
  "${cap[@]}" "$PY" -m benchmarks.stack.run --model "$MODEL" --plan "$plan" --out "$RUNS/$plan" \
    --duration "$DURATION"
  rc=$?
  ((rc == 124)) && echo "load: stopped at the call's time budget (STACK_CALL_BUDGET=$BUDGET s)"
  gpu_mem
  for f in report.md kv.png latency.png; do
    [[ -f $RUNS/$plan/$f ]] && cp "$RUNS/$plan/$f" "$OUT/${f%.*}-$plan.${f##*.}"
  done
  tar czf "$OUT/stack-$plan.tar.gz" -C "$RUNS" "$plan"
  return $rc
}

step_compare() {
  local meta
  meta=$("$PY" -c "import json, platform, datetime, torch
d = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or 'cpu'
print(json.dumps({'device': d, 'date': datetime.date.today().isoformat(), 'torch': torch.__version__}))")
  "$PY" -m benchmarks.stack.compare "$RUNS" --out "$OUT/stack.json" --meta "$meta"
}

gpu_mem
while (($#)); do
  step=$1; shift
  t0=$SECONDS
  echo "=== $step $(date +%T)"
  case $step in
    model) step_model || failed+=(model) ;;
    install) step_install || failed+=(install) ;;
    load) plan=${1:?load needs a plan: all-F or quarter}; shift; step_load "$plan" || failed+=("load $plan") ;;
    compare) step_compare || failed+=(compare) ;;
    *) echo "run_stack: unknown step $step"; failed+=("$step") ;;
  esac
  echo "=== $step done in $((SECONDS - t0)) s"
  if [[ ${failed[*]-} == *install* || ${failed[*]-} == *model* ]]; then break; fi
done
if ((${#failed[@]})); then echo "run_stack: FAILED: ${failed[*]}"; exit 1; fi
echo "run_stack: all steps passed; results in $OUT"
