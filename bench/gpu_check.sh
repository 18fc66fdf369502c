#!/usr/bin/env bash
# The GPU check, in one call on a lent GPU machine (device tool): build for the GPU, the whole test suite (GPU tests
# included), compute-sanitizer memcheck (with torch's caching allocator off, so out-of-bounds accesses land outside
# an allocation) / initcheck / racecheck / synccheck on a small clip through every kernel (bench/sanitize.py), and
# the benchmark. compute-sanitizer is taken from the toolkit, else from PATH, else from the nvidia-cuda-sanitizer
# wheel (pip, when an index is reachable); where none is found the sanitizer steps are reported not run. Writes
# report.md, build.log, tests.log, sanitizer.log, bench.log and the benchmark's .json/.md/.png to $OUT (8 files;
# default bench/results/gpu-check). Not yet run on a GPU. The whole
# script keeps within GPU_CHECK_BUDGET seconds (570: the device tool's 10-minute call, less the start); a step that
# finds too little time left is recorded as not run, and GPU_CHECK_STEPS="build bench" in a second call runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT"
steps=${GPU_CHECK_STEPS:-build tests sanitizer bench}
report="$OUT/report.md"
# torch guesses CUDA_HOME from `which nvcc`, which may be a wrapper script: ask nvcc where its toolkit is (as .ci/run).
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  top=$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  [ -n "$top" ] && CUDA_HOME=$(cd "$top" && pwd)
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"
  echo "arch list $TORCH_CUDA_ARCH_LIST, CUDA_HOME $CUDA_HOME"
  echo
  echo "| step | exit | seconds | last line |"
  echo "|---|---|---|---|"
} > "$report"
status=0
deadline=$(( $(date +%s) + ${GPU_CHECK_BUDGET:-570} ))
run() {  # run NAME LOG CMD...: appends CMD's output to LOG and a row to the report, within the budget
  local name=$1 log=$2 t0 rc left
  shift 2
  t0=$(date +%s)
  left=$(( deadline - t0 ))
  if [ "$left" -lt 30 ]; then
    echo "| $name | not run | 0 | out of time: run it in another call |" >> "$report"
    status=1
    return
  fi
  echo "== $name: $*" >> "$log"
  timeout "$left" "$@" >> "$log" 2>&1
  rc=$?
  echo "| $name | $rc | $(( $(date +%s) - t0 )) | $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-120 | tr '|' '/') |" >> "$report"
  [ $rc -eq 0 ] || status=1
}
find_sanitizer() {  # prints the path of a compute-sanitizer, or nothing
  local s cuda_major pkg
  for s in "$CUDA_HOME/bin/compute-sanitizer" "$CUDA_HOME/compute-sanitizer/compute-sanitizer" \
           "$(command -v compute-sanitizer 2>/dev/null)"; do
    [ -n "$s" ] && [ -x "$s" ] && { echo "$s"; return; }
  done
  # The wheels: nvidia-cuda-sanitizer-api-cu12 (12.x, has nvidia/cuda_sanitizer_api/bin/compute-sanitizer) and
  # nvidia-cuda-sanitizer-api (13.x). The lent GPU machine reaches no package index: a wheel carried into the folder
  # GPU_CHECK_WHEELS is installed from there, else the index is tried.
  cuda_major=$(python -c "import torch; print((torch.version.cuda or '12').split('.')[0])")
  pkg="nvidia-cuda-sanitizer-api==$cuda_major.*"
  [ "$cuda_major" = 12 ] && pkg=nvidia-cuda-sanitizer-api-cu12
  { [ -n "${GPU_CHECK_WHEELS:-}" ] && timeout 120 python -m pip install --quiet --disable-pip-version-check \
      --no-index --find-links "$GPU_CHECK_WHEELS" "$pkg" >/dev/null 2>&1; } \
    || timeout 120 python -m pip install --quiet --disable-pip-version-check "$pkg" >/dev/null 2>&1 || return
  python - <<'PY' 2>/dev/null
import glob, os, site
for d in site.getsitepackages() + [site.getusersitepackages()]:
    for s in glob.glob(os.path.join(d, "nvidia", "**", "compute-sanitizer"), recursive=True):
        if os.path.isfile(s) and os.access(s, os.X_OK):
            print(s)
            raise SystemExit
PY
}
for step in $steps; do
  case $step in
    build) run build "$OUT/build.log" python setup.py build_ext --inplace ;;  # in place: any setuptools will do
    tests) run tests "$OUT/tests.log" python -m pytest -q -rs -p no:cacheprovider ;;
    sanitizer)
      san=$(find_sanitizer)
      if [ -z "$san" ]; then
        echo "| sanitizer | not run | 0 | compute-sanitizer not found (toolkit, PATH, pip wheel) |" >> "$report"
        status=1
        continue
      fi
      for tool in memcheck initcheck racecheck synccheck; do
        run "sanitizer $tool" "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
          "$san" --tool "$tool" --error-exitcode 1 python bench/sanitize.py
      done ;;
    bench) run bench "$OUT/bench.log" python -m bench --out "$OUT" --compile-timeout 45 ;;
  esac
done
echo >> "$report"
grep -E "passed|failed" "$OUT/tests.log" 2>/dev/null | tail -n 1 >> "$report"
grep -E "ERROR SUMMARY" "$OUT/sanitizer.log" 2>/dev/null >> "$report"
exit $status
