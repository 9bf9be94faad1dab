#!/usr/bin/env bash
# One-call GPU check: build the extension from source, run the test suite on the GPU, run
# c2c-bench and the microbenchmarks, and leave logs, JSON and a PNG in OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Needs python3 with torch, triton, pytest and pytest-benchmark, nvcc, and no internet.
# Every stage has a time limit (seconds, overridable) so the whole check ends in under 8
# minutes on an H200; a stage that fails or times out is reported and the next one still runs.
# OUTDIR gets 8 files, no folders: summary.txt, build.log, tests.log, bench.log, bench.json,
# bench.png, micro.log, micro.json. The summary is also printed.
#
# Overrides (environment): PYTHON, TORCH_CUDA_ARCH_LIST (default: this GPU's), MAX_JOBS,
# C2C_SKIP_BUILD=1, C2C_TESTS (pytest arguments, default "tests"), C2C_BENCH_ARGS,
# C2C_MICRO_ARGS, C2C_LIMIT_BUILD/TESTS/BENCH/MICRO, C2C_CHECK_ALLOW_CPU=1 (dry run without a GPU).
set -u -o pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
rm -f "$OUT"/{summary.txt,build.log,tests.log,bench.log,bench.json,bench.png,micro.log,micro.json}
START=$SECONDS
FAILED=0

say() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME LIMIT LOG CMD...: run CMD with a time limit, its output appended to LOG.
stage() {
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$SECONDS rc status
  echo "\$ $*" >> "$log"
  timeout -k 10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="TIMED OUT (limit ${limit}s)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  [ $rc -ne 0 ] && FAILED=1
  say "$(printf '%-7s %-26s %4ds   %s' "$name" "$status" $((SECONDS - t0)) "$(basename "$log")")"
  return $rc
}

GPU=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>/dev/null)
if [ -z "$GPU" ] && [ "${C2C_CHECK_ALLOW_CPU:-0}" != 1 ]; then
  echo "gpu_check: torch sees no CUDA device (set C2C_CHECK_ALLOW_CPU=1 for a dry run on the CPU)" >&2
  exit 2
fi
say "c2c-kernels GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
say "$($PY - <<'PY'
import platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "missing"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (dry run)"
print(f"{gpu}; python {platform.python_version()}, torch {torch.__version__}, triton {tv}, "
      f"CUDA {torch.version.cuda}")
PY
)"
say ""

# 1. Build the extension from source for this GPU only (one architecture keeps it quick).
if [ "${C2C_SKIP_BUILD:-0}" != 1 ]; then
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && [ -n "$GPU" ]; then
    TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))")
    export TORCH_CUDA_ARCH_LIST
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS" >> "$OUT/build.log"
  stage build "${C2C_LIMIT_BUILD:-140}" "$OUT/build.log" \
    $PY -m pip install --no-build-isolation --no-deps --no-index -e .
  $PY -c "from c2c_kernels import _native as n; print('native extension:', n.unavailable() or 'built', '| CUDA kernels:', n.has_cuda_kernels())" >> "$OUT/build.log" 2>&1
  say "        $(tail -n 1 "$OUT/build.log")"
else
  say "build   skipped (C2C_SKIP_BUILD=1)"
fi

# 2. The test suite, GPU rows included (conftest runs Triton natively when a GPU is visible).
# The CPU emulator of the CUDA sources is for machines without a GPU: not built here.
export C2C_CUDA_EMULATOR=${C2C_CUDA_EMULATOR:-0}
XDIST=()
if $PY -c "import xdist" 2>/dev/null; then
  XDIST=(-n "$(( $(nproc) / 2 < 8 ? $(nproc) / 2 : 8 ))")
fi
# shellcheck disable=SC2086
stage tests "${C2C_LIMIT_TESTS:-150}" "$OUT/tests.log" $PY -m pytest ${C2C_TESTS:-tests} -q -ra -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"}
say "        $(grep -E '[0-9]+ (passed|failed|error)' "$OUT/tests.log" | tail -n 1)"

# 3. c2c-bench: the first workload, every fused layer, short to long prompts.
# shellcheck disable=SC2086
stage bench "${C2C_LIMIT_BENCH:-120}" "$OUT/bench.log" $PY -m c2c_kernels.bench --quiet \
  ${C2C_BENCH_ARGS:---device cuda --tokens 64 1024 4096 16384 --dtype bf16} \
  --json "$OUT/bench.json" --plot "$OUT/bench.png"

# 4. The microbenchmarks (fuse, project, merge per backend).
# shellcheck disable=SC2086
stage micro "${C2C_LIMIT_MICRO:-50}" "$OUT/micro.log" $PY -m pytest benchmarks -q -p no:cacheprovider \
  --benchmark-json "$OUT/micro.json" --benchmark-max-time=0.25 --benchmark-min-rounds=3 ${C2C_MICRO_ARGS:-}

say ""
say "c2c-bench rows (median ms, speedup over eager, check):"
$PY - "$OUT/bench.json" <<'PY' | tee -a "$SUMMARY"
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    print(f"  no bench.json ({e})"); sys.exit()
peaks = data["peaks"]
print("  peaks: " + ", ".join(f"{d} matmul {v:.0f} TFLOP/s" if v > 1 else f"{d} matmul {v:.3g} TFLOP/s"
                           for d, v in peaks["matmul_tflops"].items()) + f", copy {peaks['copy_gbs']:.0f} GB/s")
for r in data["rows"]:
    if r["error"]:
        status = "ERROR " + r["error"].splitlines()[0][:70]
    else:
        status = "ok" if r["correct"] else ("unchecked" if r["correct"] is None else "MISMATCH")
        status += f"  {r['median_ms']:9.3f} ms  {r['tflops']:7.2f} TFLOP/s  {100 * r['peak_fraction']:5.1f}% roofline"
        if r["speedup"]:
            status += f"  {r['speedup']:6.2f}x eager"
    print(f"  {r['dtype']:8s} {r['total_tokens']:6d} tok  {r['backend']:8s} {status}")
PY
$PY - "$OUT/micro.json" <<'PY' | tee -a "$SUMMARY"
import json, sys
try:
    runs = json.load(open(sys.argv[1]))["benchmarks"]
except (OSError, ValueError, KeyError) as e:
    print(f"  no micro.json ({e})"); sys.exit()
for run in runs:
    info = run.get("extra_info", {})
    if "ratio" in info:  # bench_cuda_merge.py: the merge alone against a copy (target >= 0.85)
        print(f"  cuda merge alone: {info['merge_gbs']:.0f} GB/s, copy {info['copy_gbs']:.0f} GB/s, "
              f"ratio {info['ratio']:.3f} ({info['entries']} entries x {info['tokens']} tokens)")
PY
say ""
say "total $((SECONDS - START))s; $( [ $FAILED = 0 ] && echo 'every stage passed' || echo 'SOME STAGES FAILED: see the logs' ); files in $OUT"
exit $FAILED
