#!/usr/bin/env bash
# One-call GPU check, sized for a short lease on a GPU machine: build the extension for this GPU,
# run the kernel tests, c2c-bench and the merge-bandwidth benchmark, then the rest of the tests,
# all within 6 minutes, and leave at most 8 flat files in OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Needs python3 with torch, triton and pytest, and nvcc; no network. pytest-xdist and
# pytest-timeout are used when installed. Stages, most valuable answer first:
#   build         pip install -e (no index, no isolation), else setup.py build_ext --inplace;
#                 this GPU's architecture only; meanwhile the bench's Triton kernels compile
#   kernel-tests  triton, cuda, ops and safety tests, -v streamed, a time limit per test
#   bench         c2c-bench, first workload, every fused layer, bf16, 64 / 1024 / 16384 tokens
#   merge         benchmarks/bench_cuda_merge.py: the CUDA merge alone against the copy bandwidth
#   rest-tests    every other test file, with whatever time is left
# Each stage runs under `timeout`: its limit is the smaller of its cap and the time left of the
# budget (360 s in all), so the check ends in time even when a stage hangs, and a stage that fails
# or times out does not stop the next one. Every stage streams into its own file, so a killed
# stage keeps what it printed. OUTDIR gets: summary.txt (also printed, last), build.log,
# tests-kernel.log, bench.log, bench.json, bench.png, merge.log, tests-rest.log.
#
# Overrides (environment): PYTHON, TORCH_CUDA_ARCH_LIST (default: this GPU's), MAX_JOBS (default:
# the CPU count), C2C_SKIP_BUILD=1, C2C_TESTS / C2C_REST_TESTS (pytest arguments as shell words;
# C2C_REST_TESTS=none skips that stage), C2C_BENCH_ARGS, C2C_MERGE_ARGS, C2C_WORKERS (xdist
# workers, 0 = none), C2C_TEST_TIMEOUT (seconds per test), C2C_WARMUP=0 (no Triton warm-up),
# C2C_LIMIT_BUILD/KERNEL/BENCH/MERGE (stage caps, seconds), C2C_BUDGET (seconds, at most 360),
# C2C_CHECK_ALLOW_CPU=1 (a dry run without a GPU, for CI: tests/test_gpu_check.py).
set -u -o pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# The fallback build is in place, not installed: the benchmarks import the package from here.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
rm -f "$OUT"/{summary.txt,build.log,tests-kernel.log,bench.log,bench.json,bench.json.partial,bench.png,merge.log,tests-rest.log}
START=$SECONDS

BUDGET=${C2C_BUDGET:-360}
(( BUDGET > 360 )) && BUDGET=360
KILL_GRACE=5           # after the limit, SIGTERM; this much later, SIGKILL
RESERVE=10             # kept back for the last stage's kill grace and the summary
MIN_STAGE=5            # a stage with less time than this left is skipped
CAP_BUILD=${C2C_LIMIT_BUILD:-100}
CAP_KERNEL=${C2C_LIMIT_KERNEL:-100}
CAP_BENCH=${C2C_LIMIT_BENCH:-120}
CAP_MERGE=${C2C_LIMIT_MERGE:-20}
KERNEL_TESTS=""
for f in tests/test_{triton,cuda_backend,ops,safety,triton_safety,cuda_safety}.py; do
  [ -e "$f" ] && KERNEL_TESTS+=" $f"  # a renamed file must not stop the whole stage
done
LINES=(); command -v stdbuf >/dev/null && LINES=(stdbuf -oL)
FAILED=()
WARM_LOG=$(mktemp "${TMPDIR:-/tmp}/gpu_check_warmup.XXXXXX")
trap 'rm -f "$WARM_LOG"' EXIT

say() { echo "$*" | tee -a "$SUMMARY"; }

# words VAR TEXT: split TEXT into the array VAR as the shell would (quotes honoured).
words() { eval "$1=($2)"; }

# run_stage NAME CAP LOG CMD...: run CMD under its limit, stdout and stderr streamed into LOG
# (progress bars' carriage returns made newlines). Sets RC, USED, LIMIT, BEGAN.
run_stage() {
  local name=$1 cap=$2 log=$3; shift 3
  BEGAN=$((SECONDS - START))
  local left=$((BUDGET - RESERVE - BEGAN))
  LIMIT=$(( cap < left ? cap : left ))
  USED=0
  if (( LIMIT < MIN_STAGE )); then
    RC=skip; LIMIT=0
    SKIPPED="not run: a ${cap}s cap with ${left}s of the budget left is under ${MIN_STAGE}s"
    echo "gpu_check: $name $SKIPPED" >> "$log"
    return
  fi
  echo "$(date -u +%H:%M:%S) $name (limit ${LIMIT}s): $*" >&2
  echo "\$ $*" >> "$log"
  timeout -k "$KILL_GRACE" "$LIMIT" "$@" 2>&1 | ${LINES[@]+"${LINES[@]}"} tr '\r' '\n' >> "$log"
  RC=${PIPESTATUS[0]}
  USED=$((SECONDS - START - BEGAN))
}

# record NAME LOG DETAIL: the stage's summary line, from RC (or STATUS when set).
record() {
  local name=$1 log=$2 detail=$3 status
  [[ $RC == skip && -n ${SKIPPED:-} ]] && detail=$SKIPPED
  SKIPPED=
  case ${STATUS:-$RC} in
    0|ok) status=ok ;;
    skip|skipped) status=skipped ;;
    124|137) status=TIMEOUT ;;
    *) status=FAILED; detail="exit $RC; $detail" ;;
  esac
  STATUS=
  [[ $status == FAILED || $status == TIMEOUT ]] && FAILED+=("$name")
  say "$(printf '%-12s %-8s %4ds %5ds %5ds  %-16s %s' "$name" "$status" "$USED" "$LIMIT" "$BEGAN" \
    "$(basename "$log")" "$detail")"
}

# test_counts LOG: counts from pytest's -v lines (so also from a killed run), then, one per line,
# the first tests that failed, crashed their xdist worker, or had not finished when it stopped.
test_counts() {
  $PY - "$1" <<'PY'
import re, sys
verbs = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")
alt = "|".join(verbs)
xdist = re.compile(r"^\[gw\d+\] \[ *\d+%\] (" + alt + r") (\S+)")  # -n: the verdict on its own line
plain = re.compile(r"^(\S+::.*?) (" + alt + r")\b")               # no -n: id and verdict on one line
begun = re.compile(r"^(\S+::.*?) ?$")                              # an id alone: started, no verdict yet
counts, bad, crashed, started, done = dict.fromkeys(verbs, 0), [], {}, [], set()
try:
    lines = open(sys.argv[1], errors="replace").read().splitlines()
except OSError:
    lines = []
for line in lines:
    test = None
    if (m := xdist.match(line)):
        verb, test = m.groups()
    elif (m := plain.match(line)):
        test, verb = m.groups()
    elif (m := begun.match(line)):
        started.append(m.group(1))
        continue
    elif (m := re.search(r"worker '(gw\d+)' crashed while running '([^']+)'", line)):
        crashed[m.group(2)] = m.group(1)
        continue
    else:
        continue
    counts[verb] += 1
    done.add(test)
    if verb in ("FAILED", "ERROR") and test != "[location]":  # a crashed worker's test, named below
        bad.append(f"{verb} {test}")
unfinished = [t for t in dict.fromkeys(started) if t not in done and t not in crashed]
print(f"{counts['PASSED']} passed, {counts['FAILED']} failed, {counts['ERROR']} errors, "
      f"{counts['SKIPPED']} skipped" + (f" ({len(crashed)} crashed their worker)" if crashed else "")
      + (f", {len(unfinished)} unfinished" if unfinished else ""))
notes = ([f"CRASHED {t} ({w}: per-test timeout or a fault)" for t, w in crashed.items()] + bad
         + [f"UNFINISHED {t}" for t in unfinished])
for line in notes[:15]:
    print("    " + line)
if len(notes) > 15:
    print(f"    ... {len(notes) - 15} more in the log")
PY
}

# The machine: one Python start for the GPU, its architecture and the versions.
INFO=$($PY - <<'PY' 2>&1
import os, platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "missing"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability()
    print(f"{major}.{minor}" + ("a" if major == 9 else ""))  # sm_90a: wgmma and setmaxnreg
    what = f"{p.name} (sm {major}.{minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"
else:
    print("")
    what = "no GPU (dry run)"
print(f"{what}; python {platform.python_version()}, torch {torch.__version__}, triton {tv}, "
      f"CUDA {torch.version.cuda}; {os.cpu_count()} CPUs")
PY
)
rc=$?
ARCH=$(sed -n 1p <<< "$INFO")
say "c2c-kernels GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if (( rc != 0 )); then
  say "python with torch does not start ($PY):"; say "$INFO"; exit 2
fi
say "$(sed -n 2p <<< "$INFO")"
if [ -z "$ARCH" ] && [ "${C2C_CHECK_ALLOW_CPU:-0}" != 1 ]; then
  say "gpu_check: torch sees no CUDA device (C2C_CHECK_ALLOW_CPU=1 for a dry run on the CPU)"
  exit 2
fi
say "budget ${BUDGET}s: build <=${CAP_BUILD}s, kernel-tests <=${CAP_KERNEL}s, bench <=${CAP_BENCH}s," \
    "merge <=${CAP_MERGE}s, rest-tests: the time left; each limit = min(cap, time left - ${RESERVE}s)"
say ""
say "$(printf '%-12s %-8s %5s %6s %6s  %-16s %s' stage status used limit start file detail)"

# Test runs: parallel when pytest-xdist is there, with few OpenMP threads per worker (16 workers of
# 16 threads each stall the machine), and a per-test limit when pytest-timeout is there.
NPROC=$(nproc)
if [ -n "${C2C_WORKERS:-}" ]; then
  WORKERS=$C2C_WORKERS
elif $PY -c "import xdist" 2>/dev/null; then
  WORKERS=$(( NPROC / 2 < 8 ? NPROC / 2 : 8 ))
else
  WORKERS=0
fi
(( WORKERS < 2 )) && WORKERS=0
PYTEST=(-v --tb=short -rfE --durations=10 -p no:cacheprovider)
THREADS=$NPROC
if (( WORKERS > 0 )); then
  PYTEST+=(-n "$WORKERS")
  THREADS=$(( NPROC / WORKERS > 1 ? NPROC / WORKERS : 1 ))
fi
if $PY -c "import pytest_timeout" 2>/dev/null; then
  # thread: a test stuck in a CUDA call never returns to Python for a signal; under xdist the
  # stuck worker is ended and replaced.
  PYTEST+=(--timeout="${C2C_TEST_TIMEOUT:-60}" --timeout-method=$( (( WORKERS > 0 )) && echo thread || echo signal))
fi
TEST_ENV=(env OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS")
# The CPU emulator of the CUDA sources is for machines without a GPU: not built here.
export C2C_CUDA_EMULATOR=${C2C_CUDA_EMULATOR:-0}

# 1. Build, for this GPU's architecture only.
LOG=$OUT/build.log
if [ "${C2C_SKIP_BUILD:-0}" = 1 ]; then
  RC=skip USED=0 LIMIT=0 BEGAN=$((SECONDS - START))
  record build "$LOG" "C2C_SKIP_BUILD=1"
else
  [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && [ -n "$ARCH" ] && export TORCH_CUDA_ARCH_LIST=$ARCH
  export MAX_JOBS=${MAX_JOBS:-$NPROC}
  echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS" >> "$LOG"
  # While nvcc runs (and then the kernel tests), c2c-bench's Triton kernels compile once for
  # every autotune candidate of the bench's token buckets, into Triton's disk cache: the bench
  # stage then only times the candidates instead of compiling about 35 GEMMs one after another.
  # Only the compile cache is shared, not the picks: those are made again in the bench.
  if [ -n "$ARCH" ] && [ "${C2C_WARMUP:-1}" = 1 ]; then
    timeout -k "$KILL_GRACE" $((CAP_BUILD + CAP_KERNEL)) "$PY" -m c2c_kernels.bench --device cuda --backends triton \
      --no-check --dtype bf16 --tokens 64 1024 --min-time 0.001 --quiet > "$WARM_LOG" 2>&1 &
    WARM_PID=$!
  fi
  run_stage build "$CAP_BUILD" "$LOG" bash -c '
    "$0" -m pip install -v --no-build-isolation --no-deps --no-index -e . ||
      { echo "gpu_check: pip install -e failed; falling back to setup.py build_ext --inplace";
        "$0" setup.py build_ext --inplace; } || exit
    "$0" -c "import torch; from c2c_kernels import _native as n
ok = n.has_cuda_kernels()
print(\"gpu_check: native extension\", n.unavailable() or \"built\", \"| CUDA kernels:\", ok)
raise SystemExit(torch.cuda.is_available() and not ok)"' "$PY"
  how="pip install -e"
  grep -q "^gpu_check: pip install -e failed" "$LOG" && how="setup.py build_ext --inplace (pip -e failed)"
  record build "$LOG" "$how, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default} MAX_JOBS=$MAX_JOBS; $(grep '^gpu_check: native' "$LOG" | tail -n 1 | cut -c12-)"
fi

# 2. The kernel tests: the answers the GPU is rented for.
LOG=$OUT/tests-kernel.log
words ARGS "${C2C_TESTS:-$KERNEL_TESTS}"
run_stage kernel-tests "$CAP_KERNEL" "$LOG" "${TEST_ENV[@]}" "$PY" -m pytest "${PYTEST[@]}" ${ARGS[@]+"${ARGS[@]}"}
COUNTS=$(test_counts "$LOG")
record kernel-tests "$LOG" "$(head -n 1 <<< "$COUNTS")"
tail -n +2 <<< "$COUNTS" | while IFS= read -r line; do say "$line"; done

# 3. c2c-bench: its JSON is rewritten as soon as each row is timed, so a killed run keeps every
# finished row. The autotuner's picks go to the log.
LOG=$OUT/bench.log
if [ -n "${WARM_PID:-}" ]; then  # done or not: the bench needs the machine to itself
  kill -TERM "$WARM_PID" 2>/dev/null
  wait "$WARM_PID" 2>/dev/null
fi
if [ -s "$WARM_LOG" ]; then
  { echo "# the Triton warm-up during the build:"; cat "$WARM_LOG"; echo "# end of the warm-up"; } >> "$LOG"
fi
rm -f "$WARM_LOG"
words ARGS "${C2C_BENCH_ARGS:---device cuda --tokens 64 1024 16384 --dtype bf16}"
run_stage bench "$CAP_BENCH" "$LOG" env TRITON_PRINT_AUTOTUNING=1 "$PY" -m c2c_kernels.bench \
  ${ARGS[@]+"${ARGS[@]}"} --json "$OUT/bench.json" --plot "$OUT/bench.png"
rm -f "$OUT/bench.json.partial"  # a write cut short; bench.json is the last whole one
record bench "$LOG" "$($PY - "$OUT/bench.json" <<'PY'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except (OSError, ValueError, KeyError):
    print("no bench.json"); sys.exit()
bad = [r for r in rows if r.get("error") or r.get("correct") is False]
tokens = ", ".join(str(t) for t in dict.fromkeys(r["total_tokens"] for r in rows))
print(f"{len(rows)} rows (tokens {tokens or '-'}), {len(bad)} failed their check or raised")
PY
)"

# 4. The merge alone against the copy bandwidth (target: ratio >= 0.85).
LOG=$OUT/merge.log
words ARGS "${C2C_MERGE_ARGS:-}"
run_stage merge "$CAP_MERGE" "$LOG" "$PY" benchmarks/bench_cuda_merge.py ${ARGS[@]+"${ARGS[@]}"}
line=$(grep -E '^(merge|skipped):' "$LOG" | tail -n 1)
[[ $RC != 0 && $line == skipped:* ]] && STATUS=skipped
record merge "$LOG" "${line:-no result}"

# 5. Every other test, with the time left.
LOG=$OUT/tests-rest.log
if [ "${C2C_REST_TESTS:-}" = none ]; then
  RC=skip USED=0 LIMIT=0 BEGAN=$((SECONDS - START))
  record rest-tests "$LOG" "C2C_REST_TESTS=none"
else
  IGNORE="tests/test_gpu_check.py"  # this script's own dry run
  for f in $KERNEL_TESTS; do IGNORE+=" $f"; done
  words ARGS "${C2C_REST_TESTS:-tests $(printf -- '--ignore=%s ' $IGNORE)}"
  run_stage rest-tests "$BUDGET" "$LOG" "${TEST_ENV[@]}" "$PY" -m pytest "${PYTEST[@]}" ${ARGS[@]+"${ARGS[@]}"}
  COUNTS=$(test_counts "$LOG")
  record rest-tests "$LOG" "$(head -n 1 <<< "$COUNTS")"
  tail -n +2 <<< "$COUNTS" | while IFS= read -r line; do say "$line"; done
fi

say ""
say "c2c-bench rows (median, roofline fraction, speedup over eager, check):"
$PY - "$OUT/bench.json" <<'PY' | tee -a "$SUMMARY"
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    print(f"  no bench.json ({e.__class__.__name__})"); sys.exit()
peaks = data["peaks"]
print("  peaks: " + ", ".join(f"{d} matmul {v:.3g} TFLOP/s" for d, v in peaks["matmul_tflops"].items())
      + f", copy {peaks['copy_gbs']:.0f} GB/s")
for r in data["rows"]:
    if r["error"]:
        status = "ERROR " + r["error"].splitlines()[0][:70]
    else:
        status = "ok" if r["correct"] else ("unchecked" if r["correct"] is None else "MISMATCH")
        if r.get("median_ms"):
            status += f"  {r['median_ms']:9.3f} ms  {r['tflops']:7.2f} TFLOP/s"
            if r.get("peak_fraction"):
                status += f"  {100 * r['peak_fraction']:5.1f}% roofline"
            if r.get("speedup"):
                status += f"  {r['speedup']:6.2f}x eager"
    print(f"  {r['dtype']:8s} {r['total_tokens']:6d} tok  {r['backend']:8s} {status}")
PY
say ""
FILES=$(find "$OUT" -mindepth 1 -maxdepth 1 | wc -l)
say "total $((SECONDS - START))s of ${BUDGET}s; $FILES files in $OUT;" \
    "$( ((${#FAILED[@]} == 0)) && echo 'every stage ok or skipped' || echo "NOT OK: ${FAILED[*]} (see the logs)")"
(( ${#FAILED[@]} == 0 ))
