"""Last stage: ``y = W_out p + b_out``, and in its epilogue the merge into the receiver cache.

With WRITE_CACHE each ``[BM tokens, BN columns]`` tile of ``y``, once finished, sums the
head logits of its tokens (the bias plus the weight branch's per-column-tile partials, see
ffn_up.py) for the head of each column, and stores ``x + G * sigmoid(a[head]) * y`` over the
receiver rows ``x`` at the tokens' slots, in place, in the cache dtype. A closed gate stores
nothing, so its cache stays bit-identical; padding tokens are neither read nor written. Every
row is read before it is written by the same tile, and no other tile touches it, so all
entries see the receiver rows as they were when the call began (stage 1 read them anyway).

Without WRITE_CACHE (``c2c::project``) the tile of ``y`` goes to the fp32 projection output,
and the first column tile of each token block also stores ``head_scale = G * sigmoid(a)``;
both are zero rows for a skipped token (negative prepared receiver slot: padding, or an
out-of-range slot), as the reference's.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import configs
from ._common import (ENTRY_FUSER, ENTRY_RECEIVER, ENTRY_WIDTH, dense_gemm, head_columns, heads_pad, load_view,
                      page_constexpr, slot_rows, tile_coords, token_rows)


@triton.jit
def _head_logits(logits_ptr, head_bias, entry, tok, head, mask, tokens, heads, logit_chunks):
    """``b_head[head] + sum_c partial[entry, c, tok, head]``: ``tok`` and ``head`` hold one index
    per element of the result (the same shape as ``mask``)."""
    logit = tl.load(head_bias, mask=mask, other=0.0).to(tl.float32)
    for c in range(logit_chunks):
        at = token_rows(entry.to(tl.int64) * logit_chunks + c, tokens, tok) * heads + head
        logit += tl.load(logits_ptr + at, mask=mask, other=0.0)
    return logit


@triton.jit(do_not_specialize=["tokens", "entries", "m_bucket"])  # one binary for every token count
def output_gemm_kernel(
    table_ptr, receiver_slots_ptr, p_ptr, w_ptr, bias_ptr, logits_ptr, head_bias_ptr, gate_ptr,
    projection_ptr, head_scale_ptr,
    tokens, entries, width, k_in, heads, page_size, logit_chunks,
    stride_w_f, stride_w_n, stride_w_k, stride_bias_f, stride_bias_n, stride_hb_f, stride_hb_h,
    m_bucket,  # autotuning key only
    WRITE_CACHE: tl.constexpr, ONE_HEAD: tl.constexpr, CACHE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    VEC: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, CTAS_PER_SM: tl.constexpr,
):
    num_m, num_n = tl.cdiv(tokens, BM), tl.cdiv(width, BN)
    # Persistent: tiles with a stride of the grid (configs.programs). Nothing is hoisted out of
    # this loop: hoisted tile-invariant vectors would stay live across the K loop (registers).
    for tile in tl.range(tl.program_id(0), entries * num_m * num_n, tl.num_programs(0), disable_licm=True):
        entry, tile_m, tile_n = tile_coords(tile, num_m, num_n, GROUP_M)
        entry_row = table_ptr + entry * ENTRY_WIDTH
        fuser = tl.load(entry_row + ENTRY_FUSER)
        tok = tile_m * BM + tl.arange(0, BM)
        cols = tile_n * BN + tl.arange(0, BN)
        tok_mask, col_mask = tok < tokens, cols < width
        row = token_rows(entry, tokens, tok)
        p_rows = p_ptr + row[:, None] * k_in
        w = w_ptr + fuser * stride_w_f + cols[None, :] * stride_w_n

        acc = dense_gemm(p_rows, w, stride_w_k, k_in, tok_mask, col_mask, BM, BN, BK, DOT_DTYPE)
        bias = tl.load(bias_ptr + fuser * stride_bias_f + cols * stride_bias_n, mask=col_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]

        # One copy of the gate per token row (the interpreter cannot AND a scalar into a block mask).
        gate_open = tl.load(gate_ptr + fuser + tl.zeros((BM,), dtype=tl.int64)) > 0
        head_bias = head_bias_ptr + fuser * stride_hb_f
        if WRITE_CACHE:
            if ONE_HEAD:  # the tile lies inside one head: one logit per token
                tile_head = tl.zeros((BM,), dtype=tl.int32) + (tile_n * BN) // HEAD_DIM
                logit = _head_logits(logits_ptr, head_bias + tile_head * stride_hb_h, entry, tok, tile_head,
                                     tok_mask, tokens, heads, logit_chunks)[:, None]
            else:  # the head of every column, gathered
                col_head = tl.broadcast_to((cols // HEAD_DIM)[None, :], (BM, BN))
                logit = _head_logits(logits_ptr, head_bias + col_head * stride_hb_h, entry,
                                     tl.broadcast_to(tok[:, None], (BM, BN)), col_head,
                                     tok_mask[:, None] & col_mask[None, :], tokens, heads, logit_chunks)
            slot = tl.load(receiver_slots_ptr + tok, mask=tok_mask, other=-1).to(tl.int64)
            base, r_page, r_entry, r_head = load_view(entry_row, ENTRY_RECEIVER, CACHE_DTYPE, VEC)
            rows = slot_rows(slot, page_size, r_page, r_entry, PAGE_SIZE, VEC)
            x_ptrs = base + rows[:, None] + head_columns(cols, r_head, HEAD_DIM, VEC)[None, :]
            write = ((slot >= 0) & gate_open)[:, None] & col_mask[None, :]
            x = tl.load(x_ptrs, mask=write, other=0.0).to(tl.float32)
            tl.store(x_ptrs, (x + tl.sigmoid(logit) * acc).to(CACHE_DTYPE), mask=write)
        else:
            # Skipped tokens' rows hold the bias and whatever the stages made of it: store zeros there.
            used = tl.load(receiver_slots_ptr + tok, mask=tok_mask, other=-1) >= 0
            out = projection_ptr + row[:, None] * width + cols[None, :]
            tl.store(out, tl.where(used[:, None], acc, 0.0), mask=tok_mask[:, None] & col_mask[None, :])
            if tile_n == 0:
                head = tl.broadcast_to(tl.arange(0, HEADS_PAD)[None, :], (BM, HEADS_PAD))
                mask = tok_mask[:, None] & (head < heads)
                logit = _head_logits(logits_ptr, head_bias + head * stride_hb_h, entry,
                                     tl.broadcast_to(tok[:, None], (BM, HEADS_PAD)), head, mask, tokens, heads,
                                     logit_chunks)
                scale = tl.where((gate_open & used)[:, None], tl.sigmoid(logit), 0.0)
                scale_rows = head_scale_ptr + row[:, None] * heads
                tl.store(scale_rows + head, scale, mask=mask)


# Grid: persistent (configs.programs), each program looping over the (entry, token tile,
# output-column tile) tiles entry-major with a stride of the grid. The projection
# variant is autotuned; the in-place variant takes configs.fixed (benchmarking it would apply
# the update once per timed run).
_tuned = triton.autotune(configs.configs(), key=["m_bucket", "width", "k_in"],
                         prune_configs_by={"early_config_prune": configs.prune})(output_gemm_kernel)


def launch(table, receiver_slots, receiver_view, p, weights, logits, *, cache_dtype, dot_dtype, vec,
           projection=None, head_scale=None):
    """Merge into the receiver views (``projection is None``) or fill ``projection [R, T, Kt]``
    and ``head_scale [R, T, Ht]``. ``p [R, T, H]``; ``logits [R, chunks, T, Ht]`` partials."""
    entries, tokens, k_in = p.shape
    w, bias, head_bias = weights.w_out, weights.b_out, weights.b_head
    width, heads = w.shape[1], head_bias.shape[1]
    write_cache = projection is None
    args = (table, receiver_slots, p, w, bias, logits, head_bias, weights.gate_logit,
            p if write_cache else projection, p if write_cache else head_scale,
            tokens, entries, width, k_in, heads, receiver_view.shape[1], logits.shape[1],
            *w.stride(), *bias.stride(), *head_bias.stride(), configs.token_bucket(tokens))
    meta = dict(WRITE_CACHE=write_cache, ONE_HEAD=False, CACHE_DTYPE=cache_dtype, DOT_DTYPE=dot_dtype,
                VEC=vec, HEADS_PAD=heads_pad(heads), HEAD_DIM=receiver_view.shape[3],
                PAGE_SIZE=page_constexpr(receiver_view.shape[1]))

    def grid(m):
        return (configs.programs(entries * triton.cdiv(tokens, m["BM"]) * triton.cdiv(width, m["BN"]), m, p.device),)

    if write_cache:
        fixed = configs.fixed(tokens, receiver_view.shape[3], p.device, p.element_size(), vec)
        meta["ONE_HEAD"] = receiver_view.shape[3] % fixed["BN"] == 0
        output_gemm_kernel[grid(fixed)](*args, **meta, **fixed)
    else:
        _tuned[grid](*args, **meta)
