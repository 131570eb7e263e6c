#!/usr/bin/env bash
# GPU validation, for a machine with a CUDA build of torch, Triton, nvcc and compute-sanitizer and
# no network:
#   1. builds pyvae (pip install --no-build-isolation: against the installed torch),
#   2. runs the whole test suite, gpu-marked tests included, for the cuda and triton backends,
#   3. runs compute-sanitizer memcheck and racecheck on a small run of every CUDA kernel,
#   4. runs the benchmark suite,
# and leaves everything in one folder (8 files at most, flat):
#   summary.txt build.log tests.log sanitize.log bench.log <op>.csv <op>.md <op>.png
# The benchmark files are also copied to bench/results/<device>/ for committing.
#
#   bash bench/gpu_check.sh [OUT_DIR [STEP...]]   (default: gpu-check-<date>, all steps)
#
# STEP is any of build, tests, sanitize, bench (default: all four, in that order), bench:OP for one
# op family of the benchmark (reparam_kl, likelihood, vq), so that a run that must fit a time limit
# per command can be split over several commands on one machine, or tune:vq (the Triton search's
# block sizes swept on the benchmark shapes: vq_tune.md; not part of the default steps).
#
# The machines have no network: the benchmark's comparison library comes as wheels in ./.whl
# (bench/fetch_gpu_wheels.sh downloads them where pip works; carry `.whl`), installed here into
# /tmp/site when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu-check-$(date -u +%Y%m%d-%H%M%S)}
shift || true
STEPS=${*:-build tests sanitize bench}
want() { [[ " $STEPS " == *" $1 "* ]]; }
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
summary="$OUT_DIR/summary.txt"
touch "$summary"
status=0

step() {  # step NAME LOG COMMAND...
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*" | tee -a "$summary"
  "$@" >> "$log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - t0)) s (log: $(basename "$log"))" | tee -a "$summary"
  [ $rc -eq 0 ] || status=1
  return $rc
}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nvcc --version | tail -1; } >> "$summary" 2>&1

export MAX_JOBS=${MAX_JOBS:-16}
if want build; then
  step build "$OUT_DIR/build.log" "$PY" -m pip install --no-build-isolation --no-deps -v . || { cat "$summary"; exit 1; }
  (cd "$OUT_DIR" && "$PY" -m pyvae) >> "$summary" 2>&1
fi

if want tests; then
  step tests "$OUT_DIR/tests.log" "$PY" -m pytest tests -q -rs -p no:cacheprovider
  tail -3 "$OUT_DIR/tests.log" >> "$summary"
fi

if want sanitize; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool" "$OUT_DIR/sanitize.log" \
      compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" tests/cuda_sanitize_cases.py
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT_DIR/sanitize.log" | tail -1 >> "$summary"
  done
fi

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$summary" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if want tune:vq; then
  step "tune vq" "$OUT_DIR/bench.log" "$PY" bench/tune_vq_triton.py --out "$OUT_DIR/vq_tune.md"
fi

bench_ops=""
want bench && bench_ops="reparam_kl likelihood vq"
for op in reparam_kl likelihood vq; do want "bench:$op" && bench_ops="$bench_ops $op"; done
if [ -n "$bench_ops" ]; then
  for op in $bench_ops; do
    step "bench $op" "$OUT_DIR/bench.log" bash -c "cd bench && '$PY' run.py --full --ops $op --out '$PWD/$OUT_DIR'"
  done
  slug=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); import harness; print(harness.device_slug('cuda'))")
  mkdir -p "bench/results/$slug"
  cp "$OUT_DIR"/*.csv "$OUT_DIR"/*.md "$OUT_DIR"/*.png "bench/results/$slug/" 2>/dev/null
  echo "results copied to bench/results/$slug/" >> "$summary"
fi
echo "overall: $([ $status -eq 0 ] && echo PASS || echo FAIL)" | tee -a "$summary"
exit $status
