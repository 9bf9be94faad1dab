"""FFN second half: ``z' = z + W_2 h``, the residual added in the epilogue, which also leaves
the partial sums of squares of ``z'`` for the next FFN-up's RMSNorm (SUM_SQ).

Used for FFN_1 and the projection blocks. The weight branch has no FFN-down launch: its
``W_2h`` is folded into the head weights (folded.py) and ffn_up.py's head-logit variant
produces the logits from its GELU tile.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import configs
from ._common import ENTRY_FUSER, ENTRY_WIDTH, dense_gemm, store_sum_sq, sum_sq_chunks, tile_coords, token_rows


@triton.jit(do_not_specialize=["tokens", "entries", "m_bucket"])  # one binary for every token count
def ffn_down_kernel(
    table_ptr, h_ptr, w_ptr, residual_ptr, out_ptr, sumsq_ptr,
    tokens, entries, width, k_in, sumsq_chunks, stride_w_f, stride_w_n, stride_w_k,
    m_bucket,  # autotuning key only
    DOT_DTYPE: tl.constexpr, SUM_SQ: tl.constexpr,
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
        stored = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offsets, stored, mask=tile_mask)
        if SUM_SQ:  # the next FFN-up normalises this output
            store_sum_sq(sumsq_ptr, row, tile_n, stored.to(tl.float32), tok_mask, col_mask, sumsq_chunks, BM, BN)


# Grid: persistent (configs.programs), each program looping over the (entry, token tile, output
# tile) tiles entry-major with a stride of the grid; tiles from the autotuner.
_tuned = triton.autotune(configs.configs(), key=["m_bucket", "width", "k_in"],
                         prune_configs_by={"early_config_prune": configs.prune})(ffn_down_kernel)


def launch(table, h, w, residual, out, sumsq=None, *, dot_dtype):
    """``out[e] = residual[e] + h[e] @ w[f]^T``; ``h [R, T, K]``, ``residual``/``out [R, T, N]``;
    with ``sumsq [R, T, sum_sq_chunks(N)]`` (fp32) also the partial sums of squares of ``out``."""
    entries, tokens, width = out.shape

    def grid(meta):
        return (configs.programs(entries * triton.cdiv(tokens, meta["BM"]) * triton.cdiv(width, meta["BN"]), meta,
                                 out.device),)

    _tuned[grid](table, h, w, residual, out, out if sumsq is None else sumsq, tokens, entries, width, h.shape[2],
                 sum_sq_chunks(width), *w.stride(), configs.token_bucket(tokens), DOT_DTYPE=dot_dtype,
                 SUM_SQ=sumsq is not None)
