import os

import torch

# Triton kernels run in the interpreter on machines without a GPU; this must be set before any
# @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The CUDA backend's sources also run on the CPU emulator (built on first use, then cached).
os.environ.setdefault("C2C_CUDA_EMULATOR", "1")
# Every backend fills its workspaces with NaN before use: a read of unwritten memory fails the
# matrix on any machine, not only where the allocator hands back garbage.
os.environ.setdefault("C2C_POISON_WORKSPACES", "1")

import c2c_kernels  # noqa: E402,F401  (registers torch.ops.c2c)

# The backend x device matrix comes from the registry: c2c_kernels.testing.backend_params().
