"""Launch choices the training kernels share: block sizes and program counts for a GPU and for
the Triton interpreter (where every program costs Python time, so blocks are large and few)."""
from __future__ import annotations

import torch
import triton

from ...backends.triton import interpreting  # noqa: F401  (the one reader of TRITON_INTERPRET)
from ...reference import RMS_EPS  # noqa: F401

GRADIENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_launchable(*tensors: torch.Tensor) -> None:
    """What memory safety needs: contiguous rows of a dtype the kernels read and write."""
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError(f"training kernels need contiguous tensors, got strides {t.stride()}")
        if t.dtype not in GRADIENT_DTYPES and t.dtype != torch.uint8:
            raise ValueError(f"training kernels support fp32/fp16/bf16, got {t.dtype} "
                             f"(use backend='torch' for float64)")
        if t.device.type != "cuda" and not interpreting():
            raise RuntimeError("Triton training kernels need a CUDA tensor (or TRITON_INTERPRET=1 on the CPU)")


def elementwise_block() -> int:
    """Elements per program of the 1-D kernels: 1024 (8 per thread at 4 warps) on a GPU."""
    return 1 << 16 if interpreting() else 1024


def row_tile(width: int) -> tuple[int, int]:
    """(rows per tile, padded width) of the row kernels: a whole row per tile, about 4K
    elements per tile so that a tile of fp32 stays in registers."""
    padded = triton.next_power_of_2(width)
    return max(1, min(64, 4096 // padded)), padded


def reduction_programs(tiles: int, device: torch.device) -> int:
    """Programs of a kernel that also reduces over rows: a few per SM, each looping over
    row tiles, so the partial sums to add up afterwards stay few."""
    if interpreting() or device.type != "cuda":
        return max(1, min(tiles, 2))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, 4 * sms))
