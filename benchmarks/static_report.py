"""The static performance report (no GPU): registers, spills, shared memory, warpgroup MMA,
CTAs per SM and waves of every Triton configuration the autotuner may pick and of every CUDA
kernel, for sm_90a and sm_80. See c2c_kernels/compile_check/static_report.py and
docs/benchmarks.md.

    python benchmarks/static_report.py --json OUT.json [--subset] [--arch sm_90a sm_80]

Exit status 1 when a row breaks the gate (a spill or a GEMM without wgmma on sm_90a, shared
memory above the limit) or something failed to compile."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from c2c_kernels.compile_check.static_report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
