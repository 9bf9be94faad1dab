"""Compile every Triton kernel of the package for a GPU that is not there.

:func:`stand_in_h200` installs a stand-in Triton driver that reports an H200 (capability 9.0,
232448 B of shared memory per block, 132 SMs) and records launches instead of running them, and
makes ``device="cuda"`` tensors of the package's host code meta tensors that look like CUDA
tensors. The package's own host code then picks its real specialisations, constexprs and
autotune configs; Triton compiles each one for sm_90a (with the ptxas of the triton wheel) and
the driver records what was compiled. The autotuner does not measure: every config it would
try is compiled and recorded, and the first one is taken.

It must run in a process where ``TRITON_INTERPRET`` is not set (the test suite's conftest sets
it, so tests run it in a subprocess: ``python -m c2c_kernels.compile_check``).
"""
from .driver import A100, GPUS, H200, Launch, StandInDriver, as_stand_in, stand_in_gpu, stand_in_h200, stand_in_tensor

__all__ = ["A100", "GPUS", "H200", "Launch", "StandInDriver", "as_stand_in", "stand_in_gpu", "stand_in_h200",
           "stand_in_tensor"]
