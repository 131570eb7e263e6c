#!/usr/bin/env bash
# The GPU check, staged to fit one device session (15 minutes with the machine's start): on a
# machine with a CUDA build of torch, Triton, nvcc and compute-sanitizer and no network, it builds
# pyvae for that GPU, tests it, runs compute-sanitizer and the benchmarks, and packs every log and
# result into one archive. The whole run stays under GPU_CHECK_BUDGET_S seconds (default 560:
# one 600 s command).
#
#   bash bench/gpu_check.sh [--out DIR] [FAMILY...]
#
# FAMILY: op families of pyvae/registry.py (default: all, plus the training-step benchmark), e.g.
#   bash bench/gpu_check.sh reparam_kl likelihood     (issue #10)
#   bash bench/gpu_check.sh vq                        (issue #11, with its Triton block-size sweep)
#
# Stages, in this order; each has a time limit (cut to what is left of the budget), and a stage
# that fails or runs out of time is recorded and the next one runs:
#   info       GPU, driver, nvcc, torch and Triton versions
#   build      pip install --no-build-isolation -e . (the tests import this checkout; its extension is
#              built in place), for this GPU's architecture only (PYVAE_CUDA_ARCHS)
#   report     python -m pyvae: how the extension was built, the backends it serves
#   resources  registers, shared and local memory of the built CUDA kernels (tests/kernel_resources.py)
#   gpu        the gpu-marked tests of the families
#   cuda       the families' tests on the cuda backend, float32 cases only
#   triton     the same on the triton backend
#   memcheck   compute-sanitizer memcheck on the trimmed cases (tests/cuda_sanitize_cases.py --trim)
#   racecheck  compute-sanitizer racecheck on the same cases
#   bench      bench/run.py's headline cases (GPU_CHECK_BENCH=--full: the whole sweep)
#   tune       each family's Triton block-size sweep (registry `tune`: bench/tune_vq_triton.py --quick)
#   dtypes     the cuda and triton tests in float16 and bfloat16
# Output: DIR/gpu_check.tar.gz (summary.txt, logs/<stage>.log, results/<device>/ with the benchmark
# files, <tune script>.md) and DIR/summary.txt beside it. DIR is --out, else $OUT (the device
# tool's folder), else ./gpu-check-<date>. `tar -xzf gpu_check.tar.gz -C bench ./results` puts the
# benchmark results where they are committed, bench/results/<device>/.
# Each stage prints one line: its name, status, seconds taken and its log's last line.
#
# DRY_RUN=1 proves the script on a machine without a GPU: it runs what a CPU can (the resource
# check on the compile-only CUDA objects, pytest's collection of each selection, the sanitizer
# cases on the cpu backend) and prints the rest. PYTHON picks the interpreter (default python3).
# The benchmark's comparison library comes as wheels in ./.whl (bench/fetch_gpu_wheels.sh; carry
# `.whl`), installed into /tmp/site when present.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1  # a stage stopped at its time limit leaves its whole log

OUT_DIR=${OUT:-gpu-check-$(date -u +%Y%m%d-%H%M%S)}
if [ "${1:-}" = "--out" ]; then OUT_DIR=$2; shift 2; fi
PY=${PYTHON:-python3}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # stages run in other folders
DRY=${DRY_RUN:-0}
BUDGET_S=${GPU_CHECK_BUDGET_S:-560}
RESERVE_S=15  # kept for packing the archive

# the families, checked against the registry (an unknown name stops here, naming the known ones)
FAMILIES=$("$PY" pyvae/registry.py name "$@") || exit 2
FAMILIES=$(echo $FAMILIES)
if [ $# -eq 0 ]; then
  TESTS=tests
  BENCH_OPS="$FAMILIES train_step posterior"
else
  TESTS=$(echo $("$PY" pyvae/registry.py test_files "$@"))
  BENCH_OPS=$FAMILIES
fi
TUNES=$(echo $("$PY" pyvae/registry.py tune "$@"))

WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
LOGS=$WORK/logs
mkdir -p "$LOGS" "$OUT_DIR"
SUMMARY=$WORK/summary.txt
FAILED=0

say() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME LIMIT_S COMMAND...: runs COMMAND (output to logs/NAME.log) for at most LIMIT_S
# seconds and what is left of the budget; prints NAME, status, seconds and the log's last line.
stage() {
  local name=$1 limit=$2; shift 2
  local log=$LOGS/$name.log left=$((BUDGET_S - RESERVE_S - SECONDS))
  if [ "$left" -lt 10 ]; then
    say "$(printf '%-10s %-12s %4s s  %s' "$name" SKIPPED 0 "no time left in the ${BUDGET_S} s budget")"
    FAILED=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "\$ $*" > "$log"
  local t0=$SECONDS rc status
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    5) status="no tests" ;;  # pytest: the selection is empty (e.g. a family without cuda-only cases)
    124|137) status="TIMEOUT ${limit}s"; FAILED=1 ;;
    *) status="FAIL (exit $rc)"; FAILED=1 ;;
  esac
  say "$(printf '%-10s %-12s %4d s  %s' "$name" "$status" $((SECONDS - t0)) "$(tail -n 1 "$log" | cut -c1-150)")"
}

# dry NAME COMMAND...: in a dry run, records the command a GPU run would run instead of running it
dry() { say "$(printf '%-10s %-12s %4s s  %s' "$1" "dry run" - "would run: ${*:2}")"; }

PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider --maxfail=25)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=120)
# xdist: tests in parallel processes, mostly to spread Triton's kernel compiles over the cores
PARALLEL=()
"$PY" -c "import xdist" 2>/dev/null && [ "$DRY" = 0 ] && PARALLEL=(-n "${GPU_CHECK_WORKERS:-6}")
COLLECT=()
[ "$DRY" != 0 ] && COLLECT=(--collect-only)
F32='not float16 and not bfloat16'

say "pyvae GPU check: families $FAMILIES; budget ${BUDGET_S} s$([ "$DRY" != 0 ] && echo '; DRY RUN')"

# ------------------------------------------------------------------ info, build
stage info 30 bash -c '
  date -u; git log -1 --format="commit %h %s"
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader
  nvcc --version | tail -n 1; compute-sanitizer --version | tail -n 1
  "$0" -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__)"' "$PY"

if [ -z "${PYVAE_CUDA_ARCHS:-}" ] && [ "$DRY" = 0 ]; then
  # e.g. 9.0 -> 90a: the architecture-specific target, whose kernels use Hopper's own instructions
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '.')
  export PYVAE_CUDA_ARCHS=$cap$([ "$cap" = 90 ] && echo a)
fi
export MAX_JOBS=${MAX_JOBS:-16}
BUILD=("$PY" -m pip install --no-build-isolation --no-deps -v -e .)
if [ "$DRY" = 0 ]; then
  stage build 240 env PYVAE_CUDA_ARCHS="$PYVAE_CUDA_ARCHS" "${BUILD[@]}"
  stage report 30 "$PY" -P -m pyvae  # -P: the pyvae the install points at (this checkout), found as any tool finds it
else
  dry build "PYVAE_CUDA_ARCHS=<this GPU's, e.g. 90a> MAX_JOBS=$MAX_JOBS ${BUILD[*]}"
fi
stage resources 30 "$PY" tests/kernel_resources.py

# ------------------------------------------------------------------ tests
# the float32 cases of each backend first; the other dtypes last, if time is left
stage gpu 100 "${PYTEST[@]}" "${COLLECT[@]}" $TESTS -m gpu
stage cuda 90 "${PYTEST[@]}" "${COLLECT[@]}" "${PARALLEL[@]}" $TESTS -m "not gpu" -k "cuda and not triton and $F32"
stage triton 150 "${PYTEST[@]}" "${COLLECT[@]}" "${PARALLEL[@]}" $TESTS -m "not gpu" -k "triton and $F32"

# ------------------------------------------------------------------ compute-sanitizer
CASES=("$PY" tests/cuda_sanitize_cases.py --trim $FAMILIES)
if [ "$DRY" = 0 ]; then
  for tool in memcheck racecheck; do
    stage $tool 90 compute-sanitizer --tool $tool --error-exitcode 9 "${CASES[@]}"
  done
else
  stage sanitize 60 "${CASES[@]}" --cpu
  dry memcheck "compute-sanitizer --tool memcheck --error-exitcode 9 ${CASES[*]}"
  dry racecheck "compute-sanitizer --tool racecheck --error-exitcode 9 ${CASES[*]}"
fi

# ------------------------------------------------------------------ benchmarks
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$LOGS/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
SLUG=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); import harness; print(harness.device_slug('cuda'))" 2>/dev/null)
BENCH=("$PY" run.py ${GPU_CHECK_BENCH:-} --ops $BENCH_OPS --out "$WORK/results/${SLUG:-gpu}")
if [ "$DRY" = 0 ]; then
  stage bench 150 bash -c 'cd bench && "$@"' bench "${BENCH[@]}"
  for tune in $TUNES; do
    stage tune 90 bash -c 'cd bench && "$@"' tune "$PY" "$tune.py" --quick --out "$WORK/$tune.md"
  done
else
  stage bench 30 bash -c 'cd bench && "$@" --help > /dev/null && echo "run.py takes ${*:2}"' bench "${BENCH[@]}"
  for tune in $TUNES; do dry tune "cd bench && $PY $tune.py --quick --out $WORK/$tune.md"; done
fi

# ------------------------------------------------------------------ the other dtypes
stage dtypes 150 "${PYTEST[@]}" "${COLLECT[@]}" "${PARALLEL[@]}" $TESTS -m "not gpu" \
  -k "(cuda or triton) and (float16 or bfloat16)"

# ------------------------------------------------------------------ pack
say "overall: $([ $FAILED = 0 ] && echo PASS || echo FAIL) after $SECONDS s"
cp "$SUMMARY" "$OUT_DIR/summary.txt"
tar -czf "$OUT_DIR/gpu_check.tar.gz" -C "$WORK" . && echo "archive: $OUT_DIR/gpu_check.tar.gz ($(du -h "$OUT_DIR/gpu_check.tar.gz" | cut -f1))"
exit $FAILED
