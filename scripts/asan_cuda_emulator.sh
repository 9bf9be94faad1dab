#!/usr/bin/env bash
# The CUDA backend's tests on its CPU emulator (csrc/cuda/emulator) built with
# AddressSanitizer: a kernel or host-side read or write outside the memory of the tensors it
# was given fails the run with the source line. Needs gcc's libasan; skipped without it.
# tests/test_cuda_safety.py adds the slot fuzz cases: out-of-range slots up to 2**40 on both
# sides, duplicates, strided and stride-0 slot tensors, empty pools, in guard arenas.
# Usage: bash scripts/asan_cuda_emulator.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/asan_env.sh asan_cuda_emulator
reports=build/asan_reports
rm -rf "$reports" && mkdir -p "$reports"
# libstdc++ is preloaded too: python does not link it, and ASan's exception interceptor needs it.
status=0
C2C_CUDA_EMULATOR=1 C2C_CUDA_EMULATOR_ASAN=1 \
  ASAN_OPTIONS="detect_leaks=0:log_path=$reports/asan" LD_PRELOAD="$asan $stdcxx" \
  "$py" -m pytest tests/test_cuda_backend.py tests/test_ops.py tests/test_cuda_emulator.py tests/test_cuda_safety.py \
  tests/test_safety.py \
  -q -k emulator \
  -p no:cacheprovider "$@" || status=$?
if [[ $status -ne 0 ]]; then
  for report in "$reports"/asan.*; do [[ -e "$report" ]] && grep -v "^    #[1-9][0-9]" "$report"; done  # deep frames cut
  echo "asan_cuda_emulator: FAILED (pytest status $status)"
  exit "$status"
fi
echo "asan_cuda_emulator: no memory error"
