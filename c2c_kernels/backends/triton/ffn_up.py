"""FFN first half: ``h = gelu(W_1 RMSNorm(z))``, the norm folded in, GELU in the epilogue; on
the weight branch, the head logits straight from the GELU tile.

RMSNorm is a per-row scale times a per-column scale: ``rmsnorm(z) = rstd(z) * z * g``. The
column scale ``g`` is folded into the weight once per checkpoint (folded.py: ``W_1 diag(g)``),
so the A tiles go to the tensor cores as loaded; the row scale commutes with the GEMM, so it is
applied to the accumulator after the K loop, from the row's sum of squares, which the stage that
wrote ``z`` left as per-32-column partial sums in its epilogue (_common.store_sum_sq): no
reduction across threads in the K loop. The normalised rows never exist in memory and no
separate pass reads ``z``. Used for every FFN of the fuser (FFN_1, the weight branch, the
projection blocks): the weights are sliced per block on the host, zero-copy.

The weight branch (HEAD_LOGITS) stores no activation at all. Its output ``w = z + W_2h h`` is
only used through ``a = W_head w + b_head``, so with ``V = W_head W_2h`` (folded.py, fp32)
``a = W_head z + V h + b_head`` and the branch's second GEMM disappears. Each program
multiplies its finished fp32 GELU tile ``h[:, cols]`` by ``V[:, cols]`` and the matching raw
columns of ``z`` by ``W_head[:, cols]``, and stores the partial logits ``[BM, heads]`` of its
column tile. The output stage adds the ``hidden / LOGIT_BN`` partials (fixed order:
deterministic, no atomics) and the bias; for that this variant's column tile is fixed
(``configs.LOGIT_BN``), the other tile sizes are tuned.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import configs
from ._common import (ENTRY_FUSER, ENTRY_WIDTH, RMS_EPS, dense_gemm, gelu_erf, heads_pad, mma, sum_sq_chunks,
                      tile_coords, token_rows)


@triton.jit(do_not_specialize=["tokens", "entries", "m_bucket"])  # one binary for every token count
def ffn_up_kernel(
    table_ptr, z_ptr, sumsq_ptr, w_ptr, out_ptr, v_ptr, head_w_ptr,
    tokens, entries, width, k_in, heads, sumsq_chunks, stride_w_f, stride_w_n, stride_w_k,
    stride_v_f, stride_v_h, stride_v_k, stride_hw_f, stride_hw_h, stride_hw_k,
    m_bucket,  # autotuning key only
    DOT_DTYPE: tl.constexpr, HEAD_LOGITS: tl.constexpr, HEADS_PAD: tl.constexpr, CHUNKS_PAD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, CTAS_PER_SM: tl.constexpr,
):
    num_m, num_n = tl.cdiv(tokens, BM), tl.cdiv(width, BN)
    # Persistent: tiles with a stride of the grid (configs.programs). Nothing is hoisted out of
    # this loop: hoisted tile-invariant vectors would stay live across the K loop (registers).
    for tile in tl.range(tl.program_id(0), entries * num_m * num_n, tl.num_programs(0), disable_licm=True):
        entry, tile_m, tile_n = tile_coords(tile, num_m, num_n, GROUP_M)
        fuser = tl.load(table_ptr + entry * ENTRY_WIDTH + ENTRY_FUSER)
        tok = tile_m * BM + tl.arange(0, BM)
        cols = tile_n * BN + tl.arange(0, BN)
        tok_mask, col_mask = tok < tokens, cols < width
        row = token_rows(entry, tokens, tok)
        z_rows = z_ptr + row[:, None] * k_in
        w = w_ptr + fuser * stride_w_f + cols[None, :] * stride_w_n

        acc = dense_gemm(z_rows, w, stride_w_k, k_in, tok_mask, col_mask, BM, BN, BK, DOT_DTYPE)

        chunk = tl.arange(0, CHUNKS_PAD)
        parts = tl.load(sumsq_ptr + row[:, None] * sumsq_chunks + chunk[None, :],
                        mask=tok_mask[:, None] & (chunk < sumsq_chunks)[None, :], other=0.0)
        acc = gelu_erf(acc * tl.rsqrt(tl.sum(parts, axis=1) / k_in + RMS_EPS)[:, None])
        if HEAD_LOGITS:  # width == k_in: output column c pairs with z's column c
            head = tl.arange(0, HEADS_PAD)
            head_mask = head < heads
            weight_mask = col_mask[:, None] & head_mask[None, :]
            # The fp32 GELU tile times the fp32 V, one head at a time: fp32 multiply-adds and a
            # row sum, nothing rounded to 16 bits and no TF32. (A tf32x3 tl.dot took up to 255
            # registers with 128x128 tiles, an IEEE fp32 tl.dot spilled; this takes <= 238.)
            partial = tl.zeros((BM, HEADS_PAD), dtype=tl.float32)
            for h in range(0, heads):
                v = tl.load(v_ptr + fuser * stride_v_f + h * stride_v_h + cols * stride_v_k, mask=col_mask, other=0.0)
                s = tl.sum(acc * v[None, :], axis=1)
                partial = tl.where(head[None, :] == h, s[:, None], partial)
            # The residual's share: the stored z columns of this tile (raw, not normalised) times
            # W_head, both 16-bit as stored: one narrow tensor-core dot, exact products.
            u = tl.load(z_rows + cols[None, :], mask=tok_mask[:, None] & col_mask[None, :], other=0.0)
            w_head = tl.load(head_w_ptr + fuser * stride_hw_f + head[None, :] * stride_hw_h
                             + cols[:, None] * stride_hw_k, mask=weight_mask, other=0.0)
            partial = mma(u, w_head, partial, DOT_DTYPE)
            logit_rows = out_ptr + token_rows(entry.to(tl.int64) * num_n + tile_n, tokens, tok) * heads
            tl.store(logit_rows[:, None] + head[None, :], partial, mask=tok_mask[:, None] & head_mask[None, :])
        else:
            out = out_ptr + row[:, None] * width + cols[None, :]
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tok_mask[:, None] & col_mask[None, :])


# Grid: persistent (configs.programs), each program looping over the (entry, token tile, output
# tile) tiles entry-major with a stride of the grid; tiles from the autotuner (the logits variant
# with its column tile pinned to LOGIT_BN).
_key = ["m_bucket", "width", "k_in"]
_prune = {"early_config_prune": configs.prune}
_tuned = triton.autotune(configs.configs(), key=_key, prune_configs_by=_prune)(ffn_up_kernel)
_tuned_logits = triton.autotune(configs.configs(configs.LOGIT_BN), key=_key, prune_configs_by=_prune)(ffn_up_kernel)


def _grid(entries, tokens, width, device):
    def grid(meta):
        return (configs.programs(entries * triton.cdiv(tokens, meta["BM"]) * triton.cdiv(width, meta["BN"]), meta,
                                 device),)
    return grid


def launch(table, z, sumsq, w, out, *, dot_dtype):
    """``out[e] = gelu(rmsnorm(z[e]) @ w[f]^T)`` for every entry ``e`` with fuser ``f``, ``w``
    holding the norm's gain already (folded.py).

    ``z [R, T, K]``, ``out [R, T, N]`` (activation dtype, contiguous); ``sumsq [R, T,
    sum_sq_chunks(K)]`` fp32, the partial sums of squares of ``z``; ``w [P, N, K]`` stacked
    over fusers (views into the folded weight stacks).
    """
    entries, tokens, width = out.shape
    chunks = sum_sq_chunks(z.shape[2])
    _tuned[_grid(entries, tokens, width, out.device)](
        table, z, sumsq, w, out, w, w, tokens, entries, width, z.shape[2], 0, chunks, *w.stride(), 0, 0, 0, 0, 0, 0,
        configs.token_bucket(tokens), DOT_DTYPE=dot_dtype, HEAD_LOGITS=False, HEADS_PAD=16,
        CHUNKS_PAD=triton.next_power_of_2(chunks))


def launch_head_logits(table, z, sumsq, w, v, w_head, logits, *, dot_dtype):
    """The weight branch: per column tile ``c`` of LOGIT_BN, ``logits[e, c] = h[:, c] @ v[f][:, c]^T
    + z[e][:, c] @ w_head[f][:, c]^T`` with ``h = gelu(rmsnorm(z[e]) @ w[f]^T)`` (never stored).

    ``z [R, T, H]`` and ``sumsq`` as for ``launch``; ``w [P, H, H]`` the folded head-branch W_1;
    ``v [P, Ht, H]`` fp32 (``w_head @ head_w2``, folded.py); ``w_head [P, Ht, H]``;
    ``logits [R, cdiv(H, LOGIT_BN), T, Ht]`` fp32, every element written.
    """
    entries, _, tokens, heads = logits.shape
    width = w.shape[1]
    chunks = sum_sq_chunks(z.shape[2])
    _tuned_logits[_grid(entries, tokens, width, logits.device)](
        table, z, sumsq, w, logits, v, w_head, tokens, entries, width, z.shape[2], heads, chunks, *w.stride(),
        *v.stride(), *w_head.stride(), configs.token_bucket(tokens), DOT_DTYPE=dot_dtype, HEAD_LOGITS=True,
        HEADS_PAD=heads_pad(heads), CHUNKS_PAD=triton.next_power_of_2(chunks))
