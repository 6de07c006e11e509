#!/usr/bin/env bash
# The GPU checks of the device path in one command, sized for a lent GPU machine (a lease is 15 minutes in all,
# the machine's start included, and one command may run 10): builds stoker with its CUDA kernels (without them
# should that fail), launches the kernel once, then runs tests/cuda and the bench's GPU section, each step under
# its own time limit so that a hang in one still leaves the others' results (the limits add up to 570 s, under
# the device tool's 600 s for one command, whatever happens). Writes under $OUT (or ./gpu-check):
# gpu_check.log (everything printed), summary.txt (one line per step: exit status and seconds), gpu.json (the
# bench's records).
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
# A system Python may be marked externally managed (pip then refuses to install); nvcc may be off PATH.
export PIP_BREAK_SYSTEM_PACKAGES=1
[ -d /usr/local/cuda/bin ] && export PATH=$PATH:/usr/local/cuda/bin
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
  df -h /dev/shm 2>&1 | tail -1
  "$0" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, \
torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  "$0" -m pip --version
  "$0" -m pip list 2>/dev/null | grep -iE "^(scikit.build.core|pybind11|cmake|ninja|numpy|pytest) " || true
  cmake --version 2>&1 | head -1' "$python"

# With the kernels; should that build fail (no nvcc, say), without them: the device stage is tested all the same.
# (A build that ran out of time is not tried again without them: the rest of the run needs that time.)
install=("$python" -m pip install --no-build-isolation --no-deps --no-cache-dir --force-reinstall .)
# Both builds together get 200 s.
built=$SECONDS
step build 150 "${install[@]}" -Ccmake.define.STOKER_CUDA=ON "-Ccmake.define.STOKER_CUDA_ARCHS=$archs"
rc=$?
if [ "$rc" -ne 0 ]; then
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && exit 1
  left=$((200 - (SECONDS - built)))
  step build-no-kernels "$((left > 30 ? left : 30))" "${install[@]}" || exit 1
fi

# Launches the kernel once (a driver older than the toolkit, or kernels built for other GPUs, show here).
step status 30 "$python" -c '
import json, warnings, torch, stoker
from stoker import _core, _normalize
print("stoker:", stoker.__file__)
print("driver:", json.dumps(_core.cuda_status()))
print("kernels:", _core.cuda_kernels_available(), _core.cuda_kernels_reason() or "(embedded)")
if torch.cuda.is_available():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = stoker.normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8, device="cuda"), 0.5, 0.25)
    torch.cuda.synchronize()
    print("normalise on the GPU:", out.flatten().tolist(), "by the kernel" if _normalize._kernels else "by torch ops",
          *[str(w.message) for w in caught])'

# The checkout has no importable stoker at its root (the package is python/stoker): the installed one is used.
# Each test has a minute (pyproject's 300 s would outlast the step): a hang is reported as that test's failure,
# with its stack, and the others still run.
step tests 150 "$python" -m pytest tests/cuda -q -rs -p no:cacheprovider -o addopts="" --timeout=60 \
  --timeout-method=signal --durations=10

# The bench prints each workload's figures as it goes: the log keeps them even if the step runs out of time.
step bench 170 "$python" -m stoker bench --only gpu --json "$out/gpu.json"

echo
cat "$summary"
