"""Exact (erf) GELU and its backward, elementwise; the backward works in place."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_launchable, elementwise_block

# constexpr: a @triton.jit body may only read module globals that are compile-time constants
# (the interpreter reads any global, so only a GPU compile catches a plain float here).
SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu_kernel(h_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = 0.5 * h * (1.0 + tl.erf(h * SQRT_HALF))
    tl.store(out_ptr + offsets, g.to(out_ptr.dtype.element_ty), mask=mask)


def gelu(h: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``gelu(h)``, written over ``h`` when ``inplace`` (the caller's temporary)."""
    check_launchable(h)
    out = h if inplace else torch.empty_like(h)
    block = elementwise_block()
    _gelu_kernel[(triton.cdiv(h.numel(), block),)](h, out, h.numel(), BLOCK=block)
    return out


@triton.jit
def _gelu_backward_kernel(h_ptr, g_ptr, dg_ptr, n, BLOCK: tl.constexpr):
    # gelu'(h) = Phi(h) + h * phi(h); g = gelu(h) (for the W2 gradient); dg becomes dh.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dg = tl.load(dg_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(h * SQRT_HALF))
    pdf = tl.exp(-0.5 * h * h) * INV_SQRT_2PI
    tl.store(g_ptr + offsets, (h * cdf).to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offsets, (dg * (cdf + h * pdf)).to(dg_ptr.dtype.element_ty), mask=mask)


def gelu_backward(h, dg, inplace: bool = False):
    """``(gelu(h), dg * gelu'(h))``; ``dg`` is overwritten, and ``h`` too when ``inplace``."""
    check_launchable(h, dg)
    g = h if inplace else torch.empty_like(h)
    block = elementwise_block()
    _gelu_backward_kernel[(triton.cdiv(h.numel(), block),)](h, g, dg, h.numel(), BLOCK=block)
    return g, dg
