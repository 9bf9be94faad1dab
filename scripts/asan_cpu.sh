#!/usr/bin/env bash
# The CPU backend's kernels (csrc/cpu) built with AddressSanitizer and run under the CPU
# safety tests: a read or write outside the memory of the tensors they were given (a slot
# past a pool, a workspace row read past its end) fails the run with the source line.
# The instrumented extension is built into build/asan_cpu (torch.utils.cpp_extension, a few
# minutes the first time) and stands in for c2c_kernels._C in the test process; the in-place
# extension is left alone. Needs gcc's libasan; skipped without it.
# Usage: bash scripts/asan_cpu.sh [pytest arguments; default: tests/test_cpu_safety.py, the head-fold tests and the
# cpu and reference cases of tests/test_safety.py]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/asan_env.sh asan_cpu
reports=build/asan_cpu_reports
rm -rf "$reports" && mkdir -p "$reports" build/asan_cpu
status=0
# libstdc++ is preloaded too: python does not link it, and ASan's exception interceptor needs it.
ASAN_OPTIONS="detect_leaks=0:log_path=$reports/asan" LD_PRELOAD="$asan $stdcxx" "$py" - "$@" <<'EOF' || status=$?
import glob
import sys

from torch.utils import cpp_extension

sources = ["python/bindings.cpp", "python/cpu_ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
sanitizer = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
# Named _C (bindings.cpp defines PyInit__C) and registered as c2c_kernels._C before the
# package is imported, so every test runs these kernels instead of the in-place build.
module = cpp_extension.load(name="_C", sources=sources, extra_include_paths=["csrc"],
                            extra_cflags=["-O1"] + sanitizer, extra_ldflags=sanitizer,
                            build_directory="build/asan_cpu", verbose=False)
sys.modules["c2c_kernels._C"] = module

import pytest  # noqa: E402

args = sys.argv[1:] or ["tests/test_cpu_safety.py", "tests/test_safety.py", "tests/test_cpu_head_fold.py", "-k", "not triton and not emulator"]
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *args]))
EOF
if [[ $status -ne 0 ]]; then
  for report in "$reports"/asan.*; do [[ -e "$report" ]] && grep -v "^    #[1-9][0-9]" "$report"; done  # deep frames cut
  echo "asan_cpu: FAILED (pytest status $status)"
  exit "$status"
fi
echo "asan_cpu: no memory error"
