"""FFN first half: ``h = gelu(W_1 RMSNorm(z))``, the norm folded in, GELU in the epilogue.

RMSNorm is a per-row scale times a per-column scale: ``rmsnorm(z) = rstd(z) * z * g``. The
column scale ``g`` is folded into the weight once per checkpoint (folded.py: ``W_1 diag(g)``),
so the A tiles go to the tensor cores as loaded; the row scale commutes with the GEMM, so it is
applied to the accumulator after the K loop, from the row's sum of squares, which the stage that
wrote ``z`` left as per-32-column partial sums in its epilogue (_common.store_sum_sq): no
reduction across threads in the K loop. The normalised rows never exist in memory and no
separate pass reads ``z``. Used for every FFN of the fuser (FFN_1, the weight branch, the
projection blocks): the weights are sliced per block on the host, zero-copy.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import configs
from ._common import ENTRY_FUSER, ENTRY_WIDTH, RMS_EPS, gelu_erf, mma, sum_sq_chunks, tile_coords, token_rows


@triton.jit(do_not_specialize=["tokens", "entries", "m_bucket"])  # one binary for every token count
def ffn_up_kernel(
    table_ptr, z_ptr, sumsq_ptr, w_ptr, out_ptr,
    tokens, entries, width, k_in, sumsq_chunks, stride_w_f, stride_w_n, stride_w_k,
    m_bucket,  # autotuning key only
    DOT_DTYPE: tl.constexpr, CHUNKS_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GROUP_M: tl.constexpr, CTAS_PER_SM: tl.constexpr,
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

        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, k_in, BK):
            k = k0 + tl.arange(0, BK)
            k_mask = k < k_in
            a = tl.load(z_rows + k[None, :], mask=tok_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w + k[:, None] * stride_w_k, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = mma(a, b, acc, DOT_DTYPE)

        chunk = tl.arange(0, CHUNKS_PAD)
        parts = tl.load(sumsq_ptr + row[:, None] * sumsq_chunks + chunk[None, :],
                        mask=tok_mask[:, None] & (chunk < sumsq_chunks)[None, :], other=0.0)
        acc = gelu_erf(acc * tl.rsqrt(tl.sum(parts, axis=1) / k_in + RMS_EPS)[:, None])
        out = out_ptr + row[:, None] * width + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tok_mask[:, None] & col_mask[None, :])


# Grid: persistent (configs.programs), each program looping over the (entry, token tile, output
# tile) tiles entry-major with a stride of the grid; tiles from the autotuner.
_tuned = triton.autotune(configs.configs(), key=["m_bucket", "width", "k_in"],
                         prune_configs_by={"early_config_prune": configs.prune})(ffn_up_kernel)


def launch(table, z, sumsq, w, out, *, dot_dtype):
    """``out[e] = gelu(rmsnorm(z[e]) @ w[f]^T)`` for every entry ``e`` with fuser ``f``, ``w``
    holding the norm's gain already (folded.py).

    ``z [R, T, K]``, ``out [R, T, N]`` (activation dtype, contiguous); ``sumsq [R, T,
    sum_sq_chunks(K)]`` fp32, the partial sums of squares of ``z``; ``w [P, N, K]`` stacked
    over fusers (views into the folded weight stacks).
    """
    entries, tokens, width = out.shape

    def grid(meta):
        return (configs.programs(entries * triton.cdiv(tokens, meta["BM"]) * triton.cdiv(width, meta["BN"]), meta,
                                 out.device),)

    chunks = sum_sq_chunks(z.shape[2])
    _tuned[grid](table, z, sumsq, w, out, tokens, entries, width, z.shape[2], chunks, *w.stride(),
                 configs.token_bucket(tokens), DOT_DTYPE=dot_dtype, CHUNKS_PAD=triton.next_power_of_2(chunks))
