"""Stage 1: ``u = W_in_sharer s + W_in_receiver x + b_in``, gathered straight from the caches.

Each program computes a ``[BM tokens, BN hidden]`` tile of one entry. It reads the entry's
sharer and receiver views from the entry table, turns each token's slot into a row offset once,
and streams both halves of the input Linear over their own K loops: no gathered copy of the
rows and no concat. Padding tokens (negative receiver slot) read nothing, not even their sharer
slot's row; their hidden rows hold just the bias and are never written back.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import configs
from ._common import (ENTRY_FUSER, ENTRY_RECEIVER, ENTRY_SHARER, ENTRY_WIDTH, head_columns, load_view, mma,
                      page_constexpr, slot_rows, store_sum_sq, sum_sq_chunks, tile_coords, token_rows)


@triton.jit
def _gathered_times_weight(acc, base, rows, valid, stride_head, width, w_ptr, cols, col_mask,
                           stride_w_n, stride_w_k, HEAD_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr,
                           VEC: tl.constexpr, BK: tl.constexpr):
    """``acc + rows_of(view)[:, :width] @ W[cols, :width]^T``, the rows gathered from one view."""
    for k0 in range(0, width, BK):
        k = k0 + tl.arange(0, BK)
        k_mask = k < width
        a = tl.load(base + rows[:, None] + head_columns(k, stride_head, HEAD_DIM, VEC)[None, :],
                    mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_w_n + k[:, None] * stride_w_k,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = mma(a, w, acc, DOT_DTYPE)
    return acc


@triton.jit(do_not_specialize=["tokens", "m_bucket"])  # one binary for every token count
def input_gemm_kernel(
    table_ptr, receiver_slots_ptr, sharer_slots_ptr, w_sharer_ptr, w_ptr, bias_ptr, out_ptr, sumsq_ptr,
    tokens, hidden, sumsq_chunks, sharer_width, receiver_width, sharer_page_size, receiver_page_size,
    stride_ws_f, stride_ws_n, stride_ws_k, stride_w_f, stride_w_n, stride_w_k, stride_bias_f, stride_bias_n,
    m_bucket,  # autotuning key only
    CACHE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, SHARER_VEC: tl.constexpr,
    RECEIVER_VEC: tl.constexpr, SHARER_HEAD_DIM: tl.constexpr, RECEIVER_HEAD_DIM: tl.constexpr,
    SHARER_PAGE_SIZE: tl.constexpr, RECEIVER_PAGE_SIZE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    entry, tile_m, tile_n = tile_coords(tl.program_id(0), tl.cdiv(tokens, BM), tl.cdiv(hidden, BN), GROUP_M)
    entry_row = table_ptr + entry * ENTRY_WIDTH
    fuser = tl.load(entry_row + ENTRY_FUSER)

    tok = tile_m * BM + tl.arange(0, BM)
    cols = tile_n * BN + tl.arange(0, BN)
    col_mask = cols < hidden
    receiver_slot = tl.load(receiver_slots_ptr + tok, mask=tok < tokens, other=-1).to(tl.int64)
    valid = receiver_slot >= 0
    sharer_slot = tl.load(sharer_slots_ptr + tok, mask=valid, other=0).to(tl.int64)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    base, s_page, s_entry, s_head = load_view(entry_row, ENTRY_SHARER, CACHE_DTYPE, SHARER_VEC)
    rows = slot_rows(sharer_slot, sharer_page_size, s_page, s_entry, SHARER_PAGE_SIZE, SHARER_VEC)
    acc = _gathered_times_weight(acc, base, rows, valid, s_head, sharer_width,
                                 w_sharer_ptr + fuser * stride_ws_f, cols, col_mask, stride_ws_n,
                                 stride_ws_k, SHARER_HEAD_DIM, DOT_DTYPE, SHARER_VEC, BK)
    base, r_page, r_entry, r_head = load_view(entry_row, ENTRY_RECEIVER, CACHE_DTYPE, RECEIVER_VEC)
    rows = slot_rows(receiver_slot, receiver_page_size, r_page, r_entry, RECEIVER_PAGE_SIZE, RECEIVER_VEC)
    acc = _gathered_times_weight(acc, base, rows, valid, r_head, receiver_width,
                                 w_ptr + fuser * stride_w_f, cols, col_mask, stride_w_n, stride_w_k,
                                 RECEIVER_HEAD_DIM, DOT_DTYPE, RECEIVER_VEC, BK)

    bias = tl.load(bias_ptr + fuser * stride_bias_f + cols * stride_bias_n, mask=col_mask, other=0.0)
    acc += bias.to(tl.float32)[None, :]
    row = token_rows(entry, tokens, tok)
    stored = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row[:, None] * hidden + cols[None, :], stored, mask=(tok < tokens)[:, None] & col_mask[None, :])
    store_sum_sq(sumsq_ptr, row, tile_n, stored.to(tl.float32), tok < tokens, col_mask, sumsq_chunks, BM, BN)


# Grid: one program per (entry, token tile, hidden tile), flattened entry-major (tile_coords);
# tiles come from the autotuner (configs.py), keyed by token bucket, widths and dtype.
_tuned = triton.autotune(configs.configs(), key=["m_bucket", "hidden", "sharer_width", "receiver_width",
                                                    "SHARER_VEC", "RECEIVER_VEC"],
                         prune_configs_by={"early_config_prune": configs.prune})(input_gemm_kernel)


def launch(table, receiver_slots, sharer_slots, receiver_view, sharer_view, weights, out, sumsq, *,
           cache_dtype, dot_dtype, receiver_vec, sharer_vec):
    """Fill ``out [R, T, H]`` (activation dtype) with the input Linear of every entry, and
    ``sumsq [R, T, sum_sq_chunks(H)]`` (fp32) with its partial sums of squares."""
    entries, tokens, hidden = out.shape
    w_s, w_r, bias = weights.w_in_sharer, weights.w_in_receiver, weights.b_in

    def grid(meta):
        return (entries * triton.cdiv(tokens, meta["BM"]) * triton.cdiv(hidden, meta["BN"]),)

    _tuned[grid](
        table, receiver_slots, sharer_slots, w_s, w_r, bias, out, sumsq,
        tokens, hidden, sum_sq_chunks(hidden), w_s.shape[2], w_r.shape[2], sharer_view.shape[1], receiver_view.shape[1],
        *w_s.stride(), *w_r.stride(), *bias.stride(),
        configs.token_bucket(tokens),
        CACHE_DTYPE=cache_dtype, DOT_DTYPE=dot_dtype, SHARER_VEC=sharer_vec, RECEIVER_VEC=receiver_vec,
        SHARER_HEAD_DIM=sharer_view.shape[3], RECEIVER_HEAD_DIM=receiver_view.shape[3],
        SHARER_PAGE_SIZE=page_constexpr(sharer_view.shape[1]),
        RECEIVER_PAGE_SIZE=page_constexpr(receiver_view.shape[1]),
    )
