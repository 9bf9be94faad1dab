"""FFN second half: ``z' = z + W_2 h``, the residual added in the epilogue.

On the weight branch the FFN's output ``w`` is only ever multiplied by ``W_head`` (one logit per
receiver head), so that variant (HEAD_LOGITS) never stores ``w``: each program multiplies its
finished ``[BM, BN]`` tile by the matching ``BN`` columns of ``W_head`` and stores the partial
logits ``[BM, heads]`` of its column tile. The output stage adds the ``hidden / BN`` partials
(fixed order: deterministic, no atomics) and the bias. For that the column tile of this variant
is fixed (``configs.LOGIT_BN``), the other tile sizes are tuned.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import configs
from ._common import (ENTRY_FUSER, ENTRY_WIDTH, dense_gemm, mma, store_sum_sq, sum_sq_chunks, tile_coords,
                      token_rows)


@triton.jit(do_not_specialize=["tokens", "entries", "m_bucket"])  # one binary for every token count
def ffn_down_kernel(
    table_ptr, h_ptr, w_ptr, residual_ptr, out_ptr, head_w_ptr, logits_ptr, sumsq_ptr,
    tokens, entries, width, k_in, heads, sumsq_chunks, stride_w_f, stride_w_n, stride_w_k,
    stride_hw_f, stride_hw_h, stride_hw_k,
    m_bucket,  # autotuning key only
    DOT_DTYPE: tl.constexpr, HEAD_LOGITS: tl.constexpr, SUM_SQ: tl.constexpr, HEADS_PAD: tl.constexpr,
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
        h_rows = h_ptr + row[:, None] * k_in
        w = w_ptr + fuser * stride_w_f + cols[None, :] * stride_w_n

        acc = dense_gemm(h_rows, w, stride_w_k, k_in, tok_mask, col_mask, BM, BN, BK, DOT_DTYPE)

        tile_mask = tok_mask[:, None] & col_mask[None, :]
        offsets = row[:, None] * width + cols[None, :]
        acc += tl.load(residual_ptr + offsets, mask=tile_mask, other=0.0).to(tl.float32)
        if HEAD_LOGITS:
            head = tl.arange(0, HEADS_PAD)
            head_mask = head < heads
            w_head = head_w_ptr + fuser * stride_hw_f + head[None, :] * stride_hw_h + cols[:, None] * stride_hw_k
            w_head = tl.load(w_head, mask=col_mask[:, None] & head_mask[None, :], other=0.0)
            # Round w to the activation dtype first, as every other stage input is.
            w_tile = acc.to(out_ptr.dtype.element_ty)
            partial = mma(w_tile, w_head, tl.zeros((BM, HEADS_PAD), dtype=tl.float32), DOT_DTYPE)
            logit_rows = logits_ptr + token_rows(entry.to(tl.int64) * num_n + tile_n, tokens, tok) * heads
            tl.store(logit_rows[:, None] + head[None, :], partial, mask=tok_mask[:, None] & head_mask[None, :])
        else:
            stored = acc.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + offsets, stored, mask=tile_mask)
            if SUM_SQ:  # the next FFN-up normalises this output
                store_sum_sq(sumsq_ptr, row, tile_n, stored.to(tl.float32), tok_mask, col_mask, sumsq_chunks, BM, BN)


# Grid: persistent (configs.programs), each program looping over the (entry, token tile, output
# tile) tiles entry-major with a stride of the grid; tiles from the autotuner (the logits variant
# with its column tile pinned to LOGIT_BN).
_key = ["m_bucket", "width", "k_in"]
_prune = {"early_config_prune": configs.prune}
_tuned = triton.autotune(configs.configs(), key=_key, prune_configs_by=_prune)(ffn_down_kernel)
_tuned_logits = triton.autotune(configs.configs(configs.LOGIT_BN), key=_key,
                                prune_configs_by=_prune)(ffn_down_kernel)


def heads_pad(heads: int) -> int:
    return max(16, triton.next_power_of_2(heads))  # tl.dot needs 16 columns


def launch(table, h, w, residual, out, sumsq=None, *, dot_dtype):
    """``out[e] = residual[e] + h[e] @ w[f]^T``; ``h [R, T, K]``, ``residual``/``out [R, T, N]``;
    with ``sumsq [R, T, sum_sq_chunks(N)]`` (fp32) also the partial sums of squares of ``out``."""
    entries, tokens, width = out.shape

    def grid(meta):
        return (configs.programs(entries * triton.cdiv(tokens, meta["BM"]) * triton.cdiv(width, meta["BN"]), meta,
                                 out.device),)

    _tuned[grid](table, h, w, residual, out, w, out, out if sumsq is None else sumsq, tokens, entries, width,
                 h.shape[2], 0,
                 sum_sq_chunks(width), *w.stride(), 0, 0, 0, configs.token_bucket(tokens), DOT_DTYPE=dot_dtype,
                 HEAD_LOGITS=False, SUM_SQ=sumsq is not None, HEADS_PAD=16)


def launch_head_logits(table, h, w, residual, w_head, logits, *, dot_dtype):
    """``logits[e, c] = (residual[e] + h[e] @ w[f]^T)[:, tile c] @ w_head[f][:, tile c]^T`` per
    column tile ``c`` of LOGIT_BN; ``logits [R, hidden / LOGIT_BN, T, heads]`` fp32."""
    entries, chunks, tokens, heads = logits.shape
    width = residual.shape[2]

    def grid(meta):
        return (configs.programs(entries * triton.cdiv(tokens, meta["BM"]) * chunks, meta, logits.device),)

    _tuned_logits[grid](table, h, w, residual, residual, w_head, logits, logits, tokens, entries, width,
                        h.shape[2], heads,
                        0, *w.stride(), *w_head.stride(), configs.token_bucket(tokens), DOT_DTYPE=dot_dtype,
                        HEAD_LOGITS=True, SUM_SQ=False, HEADS_PAD=heads_pad(heads))
