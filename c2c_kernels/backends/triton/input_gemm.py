"""Stage 1: ``u = W_in_sharer s + W_in_receiver x + b_in``, gathered straight from the caches.

Each tile is a ``[BM tokens, BN hidden]`` block of one entry (a program loops over tiles). It
reads the entry's sharer and receiver views from the entry table, turns each token's slot into
a row offset once, and streams both halves of the input Linear through one K loop (sharer
steps, then receiver steps; two loops where a view is not 16-byte aligned): no gathered
copy of the rows and no concat. Padding tokens (negative receiver slot) read nothing, not even
their sharer slot's row; their hidden rows hold just the bias and are never written back.
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


@triton.jit
def _one_k_loop(acc, s_base, s_rows, s_head, s_width, ws, stride_ws_n, stride_ws_k,
                r_base, r_rows, r_head, r_width, wr, stride_w_n, stride_w_k,
                valid, cols, col_mask, S_HEAD_DIM: tl.constexpr, R_HEAD_DIM: tl.constexpr,
                DOT_DTYPE: tl.constexpr, VEC: tl.constexpr, BK: tl.constexpr):
    """``acc + [S X] @ [W_s W_r]^T`` in one pipelined K loop: the first ``cdiv(s_width, BK)``
    steps read the sharer view and its weight, the rest the receiver's. A step never mixes the
    two (the last sharer step is masked at ``s_width``), so the view, its row offsets and the
    weight are chosen per step by a scalar select, not per column, and the pipeline is filled
    once per tile instead of once per half."""
    s_steps = tl.cdiv(s_width, BK)
    for step in tl.range(0, s_steps + tl.cdiv(r_width, BK)):
        sharer = step < s_steps
        k = tl.where(sharer, step, step - s_steps) * BK + tl.arange(0, BK)
        k_mask = k < tl.where(sharer, s_width, r_width)
        base = tl.where(sharer, s_base, r_base)
        rows = tl.where(sharer, s_rows, r_rows)
        columns = tl.where(sharer, head_columns(k, s_head, S_HEAD_DIM, VEC),
                           head_columns(k, r_head, R_HEAD_DIM, VEC))
        if VEC > 1:
            rows = tl.multiple_of(rows, VEC)
            columns = tl.max_contiguous(tl.multiple_of(columns, VEC), VEC)
        a = tl.load(base + rows[:, None] + columns[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.where(sharer, ws, wr) + cols[None, :] * tl.where(sharer, stride_ws_n, stride_w_n) \
            + k[:, None] * tl.where(sharer, stride_ws_k, stride_w_k)
        w = tl.load(w, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = mma(a, w, acc, DOT_DTYPE)
    return acc


@triton.jit(do_not_specialize=["tokens", "entries", "m_bucket"])  # one binary for every token count
def input_gemm_kernel(
    table_ptr, receiver_slots_ptr, sharer_slots_ptr, w_sharer_ptr, w_ptr, bias_ptr, out_ptr, sumsq_ptr,
    tokens, entries, hidden, sumsq_chunks, sharer_width, receiver_width, sharer_page_size, receiver_page_size,
    stride_ws_f, stride_ws_n, stride_ws_k, stride_w_f, stride_w_n, stride_w_k, stride_bias_f, stride_bias_n,
    m_bucket,  # autotuning key only
    CACHE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, SHARER_VEC: tl.constexpr,
    RECEIVER_VEC: tl.constexpr, SHARER_HEAD_DIM: tl.constexpr, RECEIVER_HEAD_DIM: tl.constexpr,
    SHARER_PAGE_SIZE: tl.constexpr, RECEIVER_PAGE_SIZE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, GROUP_M: tl.constexpr, CTAS_PER_SM: tl.constexpr,
):
    num_m, num_n = tl.cdiv(tokens, BM), tl.cdiv(hidden, BN)
    # Persistent: tiles with a stride of the grid (configs.programs). Nothing is hoisted out of
    # this loop: hoisted tile-invariant vectors would stay live across the K loop (registers).
    for tile in tl.range(tl.program_id(0), entries * num_m * num_n, tl.num_programs(0), disable_licm=True):
        entry, tile_m, tile_n = tile_coords(tile, num_m, num_n, GROUP_M)
        entry_row = table_ptr + entry * ENTRY_WIDTH
        fuser = tl.load(entry_row + ENTRY_FUSER)

        tok = tile_m * BM + tl.arange(0, BM)
        cols = tile_n * BN + tl.arange(0, BN)
        col_mask = cols < hidden
        receiver_slot = tl.load(receiver_slots_ptr + tok, mask=tok < tokens, other=-1).to(tl.int64)
        valid = receiver_slot >= 0
        sharer_slot = tl.load(sharer_slots_ptr + tok, mask=valid, other=0).to(tl.int64)

        acc = tl.zeros((BM, BN), dtype=tl.float32)
        s_base, s_page, s_entry, s_head = load_view(entry_row, ENTRY_SHARER, CACHE_DTYPE, SHARER_VEC)
        s_rows = slot_rows(sharer_slot, sharer_page_size, s_page, s_entry, SHARER_PAGE_SIZE, SHARER_VEC)
        r_base, r_page, r_entry, r_head = load_view(entry_row, ENTRY_RECEIVER, CACHE_DTYPE, RECEIVER_VEC)
        r_rows = slot_rows(receiver_slot, receiver_page_size, r_page, r_entry, RECEIVER_PAGE_SIZE, RECEIVER_VEC)
        ws = w_sharer_ptr + fuser * stride_ws_f
        wr = w_ptr + fuser * stride_w_f
        if SHARER_VEC == RECEIVER_VEC and SHARER_VEC > 1:
            acc = _one_k_loop(acc, s_base, s_rows, s_head, sharer_width, ws, stride_ws_n, stride_ws_k,
                              r_base, r_rows, r_head, receiver_width, wr, stride_w_n, stride_w_k,
                              valid, cols, col_mask, SHARER_HEAD_DIM, RECEIVER_HEAD_DIM, DOT_DTYPE,
                              SHARER_VEC, BK)
        else:  # loads vectorised on one side only, or per element on both (the selects would
            # then cost ~70 registers): one loop per side
            acc = _gathered_times_weight(acc, s_base, s_rows, valid, s_head, sharer_width, ws, cols, col_mask,
                                         stride_ws_n, stride_ws_k, SHARER_HEAD_DIM, DOT_DTYPE, SHARER_VEC, BK)
            acc = _gathered_times_weight(acc, r_base, r_rows, valid, r_head, receiver_width, wr, cols, col_mask,
                                         stride_w_n, stride_w_k, RECEIVER_HEAD_DIM, DOT_DTYPE, RECEIVER_VEC, BK)

        bias = tl.load(bias_ptr + fuser * stride_bias_f + cols * stride_bias_n, mask=col_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
        row = token_rows(entry, tokens, tok)
        stored = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row[:, None] * hidden + cols[None, :], stored,
                 mask=(tok < tokens)[:, None] & col_mask[None, :])
        store_sum_sq(sumsq_ptr, row, tile_n, stored.to(tl.float32), tok < tokens, col_mask, sumsq_chunks, BM, BN)


# Grid: persistent (configs.programs), each program looping over the (entry, token tile, hidden
# tile) tiles entry-major (tile_coords) with a stride of the grid;
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
        return (configs.programs(entries * triton.cdiv(tokens, meta["BM"]) * triton.cdiv(hidden, meta["BN"]), meta,
                                 out.device),)

    _tuned[grid](
        table, receiver_slots, sharer_slots, w_s, w_r, bias, out, sumsq,
        tokens, entries, hidden, sum_sq_chunks(hidden), w_s.shape[2], w_r.shape[2], sharer_view.shape[1],
        receiver_view.shape[1],
        *w_s.stride(), *w_r.stride(), *bias.stride(),
        configs.token_bucket(tokens),
        CACHE_DTYPE=cache_dtype, DOT_DTYPE=dot_dtype, SHARER_VEC=sharer_vec, RECEIVER_VEC=receiver_vec,
        SHARER_HEAD_DIM=sharer_view.shape[3], RECEIVER_HEAD_DIM=receiver_view.shape[3],
        SHARER_PAGE_SIZE=page_constexpr(sharer_view.shape[1]),
        RECEIVER_PAGE_SIZE=page_constexpr(receiver_view.shape[1]),
    )
