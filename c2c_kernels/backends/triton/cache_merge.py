"""``c2c::merge``: ``x += sum_j head_scale_j * projection_j`` per head, at the receiver slots.

Elementwise: each program reads a ``[BM tokens, BN columns]`` tile of one entry's receiver rows
once, adds the ``S`` contributions in order in fp32, and stores the tile once in the cache dtype
(one rounding, as the reference). The receiver views and the ``R * S`` projection and head-scale
tensors are reached through device tables (tables.py); padding tokens are skipped.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import configs
from ._common import head_columns, load_view, page_constexpr, slot_rows


@triton.jit(do_not_specialize=["tokens"])
def merge_kernel(
    receiver_table_ptr, contribution_table_ptr, receiver_slots_ptr,
    tokens, width, page_size, sharers,
    CACHE_DTYPE: tl.constexpr, VEC: tl.constexpr, UNIT_COLUMNS: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    # Tokens on grid axis x (up to 2^31 - 1 programs); axes y and z stop at 65535.
    entry = tl.program_id(2)
    tok = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_mask = cols < width
    slot = tl.load(receiver_slots_ptr + tok, mask=tok < tokens, other=-1).to(tl.int64)
    mask = (slot >= 0)[:, None] & col_mask[None, :]
    base, r_page, r_entry, r_head = load_view(receiver_table_ptr, entry * 4, CACHE_DTYPE, VEC)
    rows = slot_rows(slot, page_size, r_page, r_entry, PAGE_SIZE, VEC)
    x_ptrs = base + rows[:, None] + head_columns(cols, r_head, HEAD_DIM, VEC)[None, :]
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    col_head = cols // HEAD_DIM
    tok64 = tok.to(tl.int64)
    for j in range(sharers):
        part = contribution_table_ptr + (entry.to(tl.int64) * sharers + j) * 6
        projection = tl.load(part).to(tl.pointer_type(tl.float32))
        scale = tl.load(part + 3).to(tl.pointer_type(tl.float32))
        if UNIT_COLUMNS:  # the usual case: lets the projection rows load in 16-byte vectors
            y_cols = cols
        else:
            y_cols = cols * tl.load(part + 2)
        y = tl.load(projection + tok64[:, None] * tl.load(part + 1) + y_cols[None, :], mask=mask, other=0.0)
        scale_at = tok64[:, None] * tl.load(part + 4) + col_head[None, :] * tl.load(part + 5)
        a = tl.load(scale + scale_at, mask=mask, other=0.0)
        x += a * y
    tl.store(x_ptrs, x.to(CACHE_DTYPE), mask=mask)


def launch(receiver_table, contribution_table, receiver_slots, receiver_view, sharers, *, cache_dtype, vec,
           unit_columns):
    # Grid: (token tiles, column tiles, entries) of MERGE_BLOCK; memory-bound, nothing to tune.
    entries = receiver_table.shape[0]
    tokens, width = receiver_slots.shape[0], receiver_view.shape[2] * receiver_view.shape[3]
    bm, bn = configs.MERGE_BLOCK
    grid = (triton.cdiv(tokens, bm), triton.cdiv(width, bn), entries)
    page_size = receiver_view.shape[1]
    merge_kernel[grid](receiver_table, contribution_table, receiver_slots, tokens, width, page_size, sharers,
                       CACHE_DTYPE=cache_dtype, VEC=vec, UNIT_COLUMNS=unit_columns, HEAD_DIM=receiver_view.shape[3],
                       PAGE_SIZE=page_constexpr(page_size), BM=bm, BN=bn, num_warps=4)
