#!/usr/bin/env bash
# On the GPU machine, first in a staging call: copy this call's wheels / wheel parts (each
# sha256-checked) to a folder outside the checkout, where they wait for the last call while the
# machine stays warm, and check the machine's own packages against what the wheels need.
#   bash benchmarks/stack/stage_part.sh .stack/calls/call-N
set -euo pipefail
cd "$(dirname "$0")/../.."
src=${1:?usage: stage_part.sh CALL_FOLDER (e.g. .stack/calls/call-1)}
PY=${PYTHON:-python3}
PARTS=${STACK_PARTS:-/tmp/stack-parts}
PYTHONPATH=$PWD "$PY" -m benchmarks.stack.parts stage --src "$src" --dest "$PARTS"
# A miss here does not stop the staging (the next steps of the call still run), but the install
# step refuses to go on until the plan carries the package: re-plan as device_env says.
PYTHONPATH=$PWD "$PY" -m benchmarks.stack.device_env "$src" \
  || echo "stage_part: WARNING: the machine's packages miss a need (above): re-plan before the last call"
