"""The CPU path: the fused steps of training in plain PyTorch ops.

Same interface as :mod:`c2c_kernels.training.kernels` (the Triton path). Where the reference
has an op sequence (RMSNorm, dropout, the merge) the same arithmetic is used, in the same
order. Temporaries are updated in place where that is safe: on a CPU every fresh large buffer
costs page faults, which cost more than the arithmetic of these ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import RMS_EPS


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16/32-bit compute, fp64 for fp64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _rstd(zf: torch.Tensor) -> torch.Tensor:
    return torch.rsqrt(zf.pow(2).mean(-1, keepdim=True) + RMS_EPS)


def rms_norm(z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    acc = accumulation_dtype(z.dtype)
    zf = z.to(acc)
    return (zf * _rstd(zf)).mul_(scale.to(acc)).to(z.dtype)


def rms_norm_backward(dn, z, scale, residual_grad):
    """``(dz, dscale)`` in the accumulation dtype; ``dz`` includes the residual's gradient.
    ``dn`` (a temporary) may be overwritten."""
    acc = accumulation_dtype(z.dtype)
    zf = z.to(acc)
    rstd = _rstd(zf)
    normed = zf * rstd
    v = dn.to(acc)
    product = v * normed
    dscale = product.sum(0)
    v.mul_(scale.to(acc))  # dn * scale
    mean_vn = torch.mul(v, normed, out=product).mean(-1, keepdim=True)
    dz = v.sub_(normed.mul_(mean_vn)).mul_(rstd)  # (v - normed * mean(v * normed)) * rstd
    return dz.add_(residual_grad), dscale


def gelu(h: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return F.gelu(h)


def gelu_backward(h, dg, inplace: bool = False):
    """``(gelu(h), dg * gelu'(h))`` (``h`` is left as it is)."""
    return F.gelu(h), torch.ops.aten.gelu_backward(dg, h)


def dropout_add(z, y, keep, p: float):
    """``z + y * keep / (1 - p)``, written into ``y`` (a temporary)."""
    if keep is not None:
        y.mul_(keep).div_(1.0 - p)
    return y.add_(z)


def dropout_grad(dout, keep, p: float, dtype):
    """The gradient of ``y`` in ``dropout_add`` (rounded to the GEMM dtype)."""
    if keep is None:
        return dout.to(dtype)
    return (dout * keep).div_(1.0 - p).to(dtype)


def gated_merge(x, y, head_logits, gate, out) -> None:
    """``out[h] = x[h] + gate * sigmoid(a[h]) * y[h]`` per receiver head, into ``out``."""
    t, heads = head_logits.shape
    acc = accumulation_dtype(y.dtype)
    scale = (gate * torch.sigmoid(head_logits)).reshape(t, heads, 1)
    fused = x.to(acc).reshape(t, heads, -1) + scale * y.to(acc).reshape(t, heads, -1)
    out.copy_(fused.reshape(t, -1))


def gated_merge_backward(dout, y, head_logits, gate, dtype):
    """``(dy, d_head_logits, d_gate)``: ``dy`` in ``dtype``, the per-head grads in fp32."""
    t, heads = head_logits.shape
    acc = accumulation_dtype(y.dtype)
    d3 = dout.to(acc).reshape(t, heads, -1)
    sig = torch.sigmoid(head_logits)
    d_scale = (d3 * y.to(acc).reshape(t, heads, -1)).sum(-1)
    dy = (d3 * (gate * sig).unsqueeze(-1)).reshape(t, -1).to(dtype)
    return dy, d_scale * gate * sig * (1 - sig), d_scale * sig
