"""The CUDA C++ backend (``csrc/cuda``): gather, RMSNorm/GELU/residual epilogues and the gated
merge as hand-written kernels around strided-batched cuBLAS GEMMs (through ATen), every stage
batched over all fusers of a call. Current-stream, no host synchronisation (the hard gate is
read on the device), CUDA-graph capturable. Needs ``c2c_kernels._C`` built with CUDA.
"""
from __future__ import annotations

import torch

from .. import _native

DEVICES = ("cuda",)


def unavailable():
    reason = _native.unavailable()
    if reason is not None:
        return reason
    if not _native.has_cuda_kernels():
        return ("the native extension c2c_kernels._C was built without CUDA kernels (torch without CUDA, "
                "no CUDA toolkit found, or C2C_NO_CUDA=1); rebuild with `pip install --no-build-isolation -e .`")
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers):
    torch.ops.c2c_native.fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, list(weights),
                              list(fusers))


def project(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers):
    return torch.ops.c2c_native.project(receiver_caches, sharer_caches, receiver_slots, sharer_slots,
                                        list(weights), list(fusers))


def merge(receiver_caches, receiver_slots, projections, head_scales):
    torch.ops.c2c_native.merge(receiver_caches, receiver_slots, projections, head_scales)
