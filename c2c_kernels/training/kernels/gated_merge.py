"""The merge ``x'[h] = x[h] + G * sigmoid(a[h]) * y[h]`` and its backward, which also gives the
gradients of the head logits ``a`` and of the (Gumbel-sigmoid) gate ``G`` per (token, head).

Tiles are 3-D ``[tokens, heads, head_dim]`` so the backward's sum over ``head_dim`` is a
reduction inside one tile."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_launchable


@triton.jit
def _tile(t0, rows, heads, head_dim, BLOCK_T: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets and masks of one tile: rows of ``heads * head_dim`` and rows of ``heads``."""
    t = t0 + tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_HEADS)
    d = tl.arange(0, BLOCK_D)
    head_mask = (t[:, None] < rows) & (h[None, :] < heads)
    head_offsets = t[:, None] * heads + h[None, :]
    row_mask = head_mask[:, :, None] & (d[None, None, :] < head_dim)
    row_offsets = t[:, None, None] * (heads * head_dim) + h[None, :, None] * head_dim + d[None, None, :]
    return row_offsets, row_mask, head_offsets, head_mask


@triton.jit
def _gated_merge_kernel(x_ptr, y_ptr, a_ptr, gate_ptr, out_ptr, rows, heads, head_dim,
                        BLOCK_T: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr):
    row_offsets, row_mask, head_offsets, head_mask = _tile(
        tl.program_id(0) * BLOCK_T, rows, heads, head_dim, BLOCK_T, BLOCK_HEADS, BLOCK_D)
    a = tl.load(a_ptr + head_offsets, mask=head_mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + head_offsets, mask=head_mask, other=0.0).to(tl.float32)
    scale = gate * tl.sigmoid(a)
    x = tl.load(x_ptr + row_offsets, mask=row_mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row_offsets, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row_offsets, (x + scale[:, :, None] * y).to(out_ptr.dtype.element_ty), mask=row_mask)


def _tiles(head_logits: torch.Tensor, width: int):
    rows, heads = head_logits.shape
    block_heads, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(width // heads)
    block_t = max(1, min(triton.next_power_of_2(rows), 4096 // (block_heads * block_d)))
    return rows, heads, width // heads, (triton.cdiv(rows, block_t),), dict(
        BLOCK_T=block_t, BLOCK_HEADS=block_heads, BLOCK_D=block_d)


def gated_merge(x, y, head_logits, gate, out) -> None:
    """Fused rows into ``out`` ([T, Ht*Dt], any float dtype); ``gate`` is [T, Ht] fp32."""
    check_launchable(x, y, head_logits, gate, out)
    rows, heads, head_dim, grid, blocks = _tiles(head_logits, y.shape[1])
    _gated_merge_kernel[grid](x, y, head_logits, gate, out, rows, heads, head_dim, **blocks)


@triton.jit
def _gated_merge_backward_kernel(dout_ptr, y_ptr, a_ptr, gate_ptr, dy_ptr, da_ptr, dgate_ptr,
                                 rows, heads, head_dim,
                                 BLOCK_T: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr):
    row_offsets, row_mask, head_offsets, head_mask = _tile(
        tl.program_id(0) * BLOCK_T, rows, heads, head_dim, BLOCK_T, BLOCK_HEADS, BLOCK_D)
    a = tl.load(a_ptr + head_offsets, mask=head_mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + head_offsets, mask=head_mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    dout = tl.load(dout_ptr + row_offsets, mask=row_mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row_offsets, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(dy_ptr + row_offsets, (dout * (gate * sig)[:, :, None]).to(dy_ptr.dtype.element_ty), mask=row_mask)
    d_scale = tl.sum(dout * y, axis=2)
    tl.store(da_ptr + head_offsets, d_scale * gate * sig * (1.0 - sig), mask=head_mask)
    tl.store(dgate_ptr + head_offsets, d_scale * sig, mask=head_mask)


def gated_merge_backward(dout, y, head_logits, gate, dtype):
    """``(dy [T, Kt] in dtype, d_head_logits [T, Ht] fp32, d_gate [T, Ht] fp32)``."""
    check_launchable(dout, y, head_logits, gate)
    rows, heads, head_dim, grid, blocks = _tiles(head_logits, y.shape[1])
    dy = torch.empty(y.shape, dtype=dtype, device=y.device)
    d_logits = torch.empty(rows, heads, dtype=torch.float32, device=y.device)
    d_gate = torch.empty_like(d_logits)
    _gated_merge_backward_kernel[grid](dout, y, head_logits, gate, dy, d_logits, d_gate,
                                       rows, heads, head_dim, **blocks)
    return dy, d_logits, d_gate
