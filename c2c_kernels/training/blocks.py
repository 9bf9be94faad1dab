"""The pieces of one fuser's forward and backward, on ``[T, width]`` rows: Linears (torch GEMMs,
fp32-accumulated weight gradients) and the pre-norm FFN block, whose backward recomputes its
hidden activations from the block input instead of keeping them.

``ops`` is :mod:`.torch_ops` (CPU path) or :mod:`.kernels` (Triton); both have one interface.
"""
from __future__ import annotations

import torch

from .torch_ops import accumulation_dtype


def linear(x, weight, bias=None):
    """``x @ weight.T (+ bias)`` in ``x``'s dtype (``weight`` is ``[out, in]``)."""
    return x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())


_mm_out_dtype_works: bool | None = None


def weight_grad(dy: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``dy.T @ x`` summed over tokens in fp32 (fp64 for fp64 inputs), whatever the GEMM dtype;
    into ``out`` (an fp32 scratch) when given and the result is formed in fp32 by torch."""
    global _mm_out_dtype_works
    acc = accumulation_dtype(dy.dtype)
    if dy.dtype == acc:
        return dy.t() @ x if out is None else torch.mm(dy.t(), x, out=out)
    if dy.is_cuda and _mm_out_dtype_works is not False:
        try:  # 16-bit inputs, fp32 output straight from the GEMM (torch >= 2.9 on CUDA)
            out = torch.mm(dy.t(), x, out_dtype=acc)
            _mm_out_dtype_works = True
            return out
        except (TypeError, RuntimeError):
            _mm_out_dtype_works = False
    if dy.is_cuda:
        return (dy.t() @ x).to(acc)  # fp32 accumulation inside the GEMM, one rounding of the result
    a, b = dy.t().to(acc), x.to(acc)  # CPUs without 16-bit matrix units: widen, then multiply
    return a @ b if out is None else torch.mm(a, b, out=out)


def bias_grad(dy: torch.Tensor) -> torch.Tensor:
    return dy.sum(0, dtype=accumulation_dtype(dy.dtype))


def block_forward(ops, z, norm, w1, w2, keep, p: float, keep_hidden: bool = False):
    """``(z + dropout(W2 gelu(W1 rmsnorm(z))), hidden)``: ``hidden = W1 rmsnorm(z)`` when
    ``keep_hidden`` (saved to skip the backward's recompute GEMM), else None."""
    hidden = linear(ops.rms_norm(z, norm), w1)
    activated = ops.gelu(hidden, inplace=not keep_hidden)
    return ops.dropout_add(z, linear(activated, w2), keep, p), (hidden if keep_hidden else None)


def block_backward(ops, z, dout, norm, w1, w2, keep, p: float, grads, hidden=None):
    """The input gradient of one block from its input ``z`` and its output's gradient ``dout``
    (fp32); the weight gradients go to ``grads.add(k, value)`` / ``grads.gemm(k, dy, x)``
    (``+= dy.T @ x``) with ``k`` 0, 1, 2 for the norm scale, W1, W2.

    Recomputes ``rmsnorm(z)`` and, unless the forward kept it as ``hidden``, ``W1 rmsnorm(z)``
    (one GEMM). Returns ``dz`` (fp32); ``dout`` may be overwritten (the Triton path reuses it
    for ``dz``); a kept ``hidden`` is not.
    """
    normed = ops.rms_norm(z, norm)
    recomputed = hidden is None
    if recomputed:
        hidden = linear(normed, w1)
    dy = ops.dropout_grad(dout, keep, p, z.dtype)
    activated, d_hidden = ops.gelu_backward(hidden, dy @ w2, inplace=recomputed)
    grads.gemm(2, dy, activated)
    del dy, activated, hidden
    grads.gemm(1, d_hidden, normed)
    dnormed = d_hidden @ w1
    del d_hidden
    dz, dnorm = ops.rms_norm_backward(dnormed, z, norm, dout)
    grads.add(0, dnorm)
    return dz
