"""RMSNorm with a learned scale: the forward, and the backward fused with the residual's gradient
and the scale's gradient (accumulated in fp32 per program, then summed)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import RMS_EPS, check_launchable, reduction_programs, row_tile


@triton.jit
def _rms_norm_kernel(z_ptr, scale_ptr, out_ptr, rows, width, eps,
                     BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    r = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_H)
    mask = (r[:, None] < rows) & (c[None, :] < width)
    offsets = r[:, None] * width + c[None, :]
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + c, mask=c < width, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(z * z, axis=1) / width + eps)
    out = z * rstd[:, None] * scale[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``z * rsqrt(mean(z^2) + eps) * scale`` per row of ``z [T, H]``, in ``z``'s dtype."""
    check_launchable(z, scale)
    rows, width = z.shape
    out = torch.empty_like(z)
    block_t, block_h = row_tile(width)
    _rms_norm_kernel[(triton.cdiv(rows, block_t),)](
        z, scale, out, rows, width, RMS_EPS, BLOCK_T=block_t, BLOCK_H=block_h,
        num_warps=4 if block_h <= 1024 else 8)
    return out


@triton.jit
def _rms_norm_backward_kernel(dn_ptr, z_ptr, scale_ptr, dz_ptr, dscale_ptr, rows, width, eps,
                              BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    # dz = rstd * (v - normed * mean(v * normed)) + residual grad, v = dn * scale; dz_ptr holds
    # the residual grad on entry (each element is read before it is overwritten, by one program).
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    c = tl.arange(0, BLOCK_H)
    cmask = c < width
    scale = tl.load(scale_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    dscale = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for start in range(pid * BLOCK_T, rows, programs * BLOCK_T):
        r = start + tl.arange(0, BLOCK_T)
        mask = (r[:, None] < rows) & cmask[None, :]
        offsets = r[:, None] * width + c[None, :]
        z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dn = tl.load(dn_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(z * z, axis=1) / width + eps)
        normed = z * rstd[:, None]
        v = dn * scale[None, :]
        mean_vn = tl.sum(v * normed, axis=1) / width
        residual = tl.load(dz_ptr + offsets, mask=mask, other=0.0)
        dz = (v - normed * mean_vn[:, None]) * rstd[:, None] + residual
        tl.store(dz_ptr + offsets, dz, mask=mask)
        dscale += tl.sum(dn * normed, axis=0)
    tl.store(dscale_ptr + pid * width + c, dscale, mask=cmask)


def rms_norm_backward(dn, z, scale, residual_grad):
    """``(dz, dscale)`` in fp32. ``residual_grad`` (fp32, the block output's gradient) is
    overwritten with ``dz``: the residual stream's gradient flows through in place."""
    check_launchable(dn, z, scale, residual_grad)
    if residual_grad.dtype != torch.float32:
        raise ValueError(f"residual_grad: expected float32, got {residual_grad.dtype}")
    rows, width = z.shape
    block_t, block_h = row_tile(width)
    programs = reduction_programs(triton.cdiv(rows, block_t), z.device)
    partial = torch.empty(programs, width, dtype=torch.float32, device=z.device)
    _rms_norm_backward_kernel[(programs,)](
        dn, z, scale, residual_grad, partial, rows, width, RMS_EPS, BLOCK_T=block_t, BLOCK_H=block_h,
        num_warps=4 if block_h <= 1024 else 8)
    return residual_grad, partial.sum(0)
