"""The native CPU backend (``csrc/cpu``): fused gather, norms, activations and merge around
ATen GEMMs, multi-threaded. Needs the compiled extension ``c2c_kernels._C``.

How it computes (see ``config(dtype)``): fp32 caches run ATen's fp32 GEMM (MKL) split by
columns over the intra-op threads. 16-bit caches run ATen's 16-bit GEMM (oneDNN) where the
CPU has AMX or AVX512-BF16/FP16; elsewhere their weights are widened to fp32 one block at a
time and the fp32 GEMM is used (ATen's 16-bit GEMM is many times slower than fp32 there).
Environment knobs, for tests and benchmarks: ``C2C_CPU_GEMM=fp32|native`` (16-bit engine),
``C2C_CPU_VEC=scalar`` (portable row kernels, read once), ``C2C_CPU_WBLOCK`` (weight rows
widened per block), ``C2C_CPU_SPLIT=0`` (leave fp32 GEMM threading to BLAS).
"""
from __future__ import annotations

import torch

from .. import _native

DEVICES = ("cpu",)
AUTO = {"cpu": 0}  # auto's first choice on the CPU


def unavailable():
    return _native.unavailable()


def config(dtype: torch.dtype = torch.bfloat16) -> str:
    """How caches of ``dtype`` are computed on this machine (GEMM engine, row kernels, threads)."""
    return torch.ops.c2c_native.cpu_config(dtype)


def fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers):
    torch.ops.c2c_native.fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, list(weights), fusers)


def project(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers):
    return torch.ops.c2c_native.project(receiver_caches, sharer_caches, receiver_slots, sharer_slots,
                                        list(weights), fusers)


def merge(receiver_caches, receiver_slots, projections, head_scales):
    torch.ops.c2c_native.merge(receiver_caches, receiver_slots, projections, head_scales)
