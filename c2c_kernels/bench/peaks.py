"""Peaks measured in the same run, so every fraction of peak is against this machine as it is now.

GPU: a square matmul per dtype (bf16 is the headline tensor-core peak) and a device-to-device
copy. CPU: an ATen matmul per dtype (``F.linear``, the GEMM the fusers run; fp32 also bounds
16-bit data) and a memory copy.
A copy moves each byte twice (read and write); both count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .timing import time_cpu, time_gpu

GPU_MATMUL = 8192
GPU_COPY_BYTES = 2**30
CPU_MATMUL = 1024
CPU_COPY_BYTES = 2**26


def _time(call, device: torch.device) -> float:
    """Best-case seconds per call: a peak is the best the machine did."""
    if device.type == "cuda":
        return time_gpu(call).min_ms / 1e3
    return time_cpu(call, min_time_s=0.2, min_samples=3, max_samples=20).min_ms / 1e3


def matmul_tflops(dtype: torch.dtype, device: torch.device) -> float:
    n = GPU_MATMUL if device.type == "cuda" else CPU_MATMUL
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    return 2 * n**3 / _time(lambda: F.linear(a, b), device) / 1e12


def copy_gbs(device: torch.device) -> float:
    nbytes = GPU_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _time(lambda: dst.copy_(src), device) / 1e9


def measure(dtypes, device: torch.device) -> dict:
    """``matmul_tflops`` (the compute peak per dtype name), ``matmul_measured_tflops`` (each
    dtype's own matmul) and ``copy_gbs``. On a GPU bf16 is always measured. On a CPU fp32 is
    always measured and also bounds 16-bit data: a kernel can widen bf16/fp16 to fp32 and use
    the fp32 GEMM, which beats ATen's 16-bit GEMM on CPUs without native bf16/fp16 units."""
    extra = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = list(dict.fromkeys([extra, *dtypes]))
    measured = {dtype_name(d): matmul_tflops(d, device) for d in names}
    peak = dict(measured)
    if device.type == "cpu":
        peak = {d: max(v, measured["float32"]) for d, v in measured.items()}
    return {"matmul_tflops": peak, "matmul_measured_tflops": measured, "copy_gbs": copy_gbs(device)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
