"""Dropout fused with the residual add (forward) and with the rounding to the GEMM dtype
(backward). The keep mask comes from the caller (uint8, drawn as the reference draws it)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_launchable, elementwise_block


@triton.jit
def _dropout_add_kernel(z_ptr, y_ptr, keep_ptr, n, keep_prob, HAS_KEEP: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + offsets, mask=mask, other=0).to(tl.float32)
        y = y * keep / keep_prob
    tl.store(y_ptr + offsets, (z + y).to(y_ptr.dtype.element_ty), mask=mask)


def dropout_add(z, y, keep, p: float):
    """``z + y * keep / (1 - p)``, written into ``y`` (the W2 GEMM's temporary)."""
    check_launchable(z, y, *(() if keep is None else (keep,)))
    block = elementwise_block()
    _dropout_add_kernel[(triton.cdiv(y.numel(), block),)](
        z, y, y if keep is None else keep, y.numel(), 1.0 - p, HAS_KEEP=keep is not None, BLOCK=block)
    return y


@triton.jit
def _dropout_grad_kernel(dout_ptr, keep_ptr, dy_ptr, n, keep_prob, HAS_KEEP: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    d = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + offsets, mask=mask, other=0).to(tl.float32)
        d = d * keep / keep_prob
    tl.store(dy_ptr + offsets, d.to(dy_ptr.dtype.element_ty), mask=mask)


def dropout_grad(dout, keep, p: float, dtype):
    """The gradient of ``y`` in :func:`dropout_add`, rounded to the GEMM dtype ``dtype``."""
    check_launchable(dout, *(() if keep is None else (keep,)))
    dy = torch.empty(dout.shape, dtype=dtype, device=dout.device)
    block = elementwise_block()
    _dropout_grad_kernel[(triton.cdiv(dout.numel(), block),)](
        dout, dout if keep is None else keep, dy, dout.numel(), 1.0 - p, HAS_KEEP=keep is not None, BLOCK=block)
    return dy
