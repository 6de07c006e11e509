#!/usr/bin/env bash
# The GPU checks of the device path in one command, sized for a lent GPU machine (a lease is 15 minutes in all,
# the machine's start included, and one command may run 10): builds stoker with its CUDA kernels, then runs
# tests/cuda and the bench's GPU section, each step under its own time limit so that a hang in one still leaves
# the others' results. Writes under $OUT (or ./gpu-check): gpu_check.log (everything printed), summary.txt
# (one line per step: exit status and seconds), gpu.json (the bench's records).
#
# On the device machine, from the repository root (its python3 holds a CUDA build of torch; no package index):
#   bash tools/gpu_check.sh
# Here (no GPU) it builds, and the GPU tests and bench section report themselves skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/gpu-check}
mkdir -p "$out"
python=${PYTHON:-python3}
log=$out/gpu_check.log
summary=$out/summary.txt
: >"$log"
: >"$summary"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
# sm_90 (H100, H200) unless told otherwise: one architecture builds in seconds.
archs=${STOKER_CUDA_ARCHS:-90}

step() {  # name, limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  printf '\n== %s (limit %ss, started at %ss)\n' "$name" "$limit" "$start" | tee -a "$log"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  printf '%-7s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - start))" | tee -a "$summary"
  return "$rc"
}

step facts 20 bash -c '
  nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current,memory.total \
    --format=csv 2>&1 || echo "nvidia-smi: not here"
  nvcc --version 2>&1 | tail -1
  echo "cpus: $(nproc)"
  "$0" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, \
torch.cuda.is_available() and torch.cuda.get_device_name(0))"' "$python"

step build 120 "$python" -m pip install --no-build-isolation --no-deps --no-cache-dir --force-reinstall . \
  -Ccmake.define.STOKER_CUDA=ON "-Ccmake.define.STOKER_CUDA_ARCHS=$archs" || exit 1

step status 20 "$python" -c '
import json, stoker
from stoker import _core
print("stoker:", stoker.__file__)
print("driver:", json.dumps(_core.cuda_status()))
print("kernels:", _core.cuda_kernels_available(), _core.cuda_kernels_reason() or "(embedded, loadable)")'

# The checkout has no importable stoker at its root (the package is python/stoker): the installed one is used.
step tests 150 "$python" -m pytest tests/cuda -q -rs -p no:cacheprovider

step bench 190 "$python" -m stoker bench --only gpu --json "$out/gpu.json"

echo
cat "$summary"
