"""The stage order of one call, and the activation buffers between stages.

``2B + 4`` launches per call (``B = num_blocks`` FFN blocks on the projection path, 2 for the
published 3-layer fusers: 8 launches), each covering every entry of the call at once:

    0          prepare slots     user slots -> int64 slots, in range, deduped  slot_prep.py
    1          input GEMM        caches --(slots)--> u                          input_gemm.py
    2, 3       FFN_1             u -> h -> z                                    ffn_up/ffn_down
    4          weight branch     z -> per-tile head logits (h, w never stored)  ffn_up (head logits)
    5 .. 2B+2  projection blocks z -> h -> z' (ping-pong)                       ffn_up/ffn_down
    2B+3       output GEMM       p -> x + G sigmoid(a) y into the caches        output_gemm.py
                                 (or -> projection, head_scale for c2c::project)

The weight branch is one launch: its second GEMM is folded into the head weights
(``V = W_head W_2h``, folded.py), so its FFN-up multiplies each fp32 GELU tile by ``V`` and the
matching columns of ``z`` by ``W_head`` and stores per-column-tile partial logits.

Launch 0 turns the user's slots (int32/int64, any stride) into contiguous int64 slots that lie
inside the pools (duplicates dropped for fuse and merge, not for project; c2c_kernels.slots),
recording an out-of-range slot in the status buffer; the later stages read only those.

Activations between stages are stored in the weight dtype (the next GEMM consumes them in that
dtype anyway); every accumulation, norm, GELU, residual and the merge run in fp32. Buffers come
from torch's caching allocator through c2c_kernels.workspace (NaN-poisoned in the debug mode,
so a read of an unwritten element shows), and a captured CUDA graph keeps them in its private
pool.
"""
from __future__ import annotations

import torch
import triton

from ... import slots, workspace
from . import cache_merge, configs, ffn_down, ffn_up, folded, input_gemm, output_gemm, slot_prep, tables
from ._common import TL_DTYPES, dot_dtype, sum_sq_chunks


def run(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, *,
        projection=None, head_scale=None) -> None:
    """Fuse in place, or (with ``projection``/``head_scale``) fill the c2c::project outputs."""
    dtype, device = weights.dtype, weights.device
    entries, tokens = len(fusers), receiver_slots.shape[0]
    hidden, inter, heads = weights.hidden_dim, weights.intermediate_dim, weights.receiver_heads
    cache_dtype, mma_dtype = TL_DTYPES[dtype], dot_dtype(dtype)
    entry = tables.entry_table(receiver_caches, sharer_caches, fusers)
    fold = folded.folded(weights)  # W_1 diag(norm gain) and W_head W_2h, cached per checkpoint
    table = entry.rows
    # Kernel arguments, not table rows: the tables are cached by address, the slots change per call.
    receiver_slots, sharer_slots = slot_prep.prepare(
        receiver_slots, sharer_slots, slots.rows(receiver_caches[0]), slots.rows(sharer_caches[0]),
        dedupe=projection is None)

    u = workspace.empty(entries, tokens, hidden, dtype=dtype, device=device)
    z = workspace.empty(entries, tokens, hidden, dtype=dtype, device=device)
    h_ffn = workspace.empty(entries, tokens, inter, dtype=dtype, device=device)
    # Per-32-column partial sums of squares of u and z, written by the stage that writes them
    # (the input GEMM, FFN-down), read by the FFN-up that normalises them.
    u_sq = workspace.empty(entries, tokens, sum_sq_chunks(hidden), dtype=torch.float32, device=device)
    z_sq = workspace.empty(entries, tokens, sum_sq_chunks(hidden), dtype=torch.float32, device=device)
    logits = workspace.empty(entries, triton.cdiv(hidden, configs.LOGIT_BN), tokens, heads,
                             dtype=torch.float32, device=device)

    input_gemm.launch(table, receiver_slots, sharer_slots, receiver_caches[0], sharer_caches[0], weights, u, u_sq,
                      cache_dtype=cache_dtype, dot_dtype=mma_dtype, receiver_vec=entry.receiver_vec,
                      sharer_vec=entry.sharer_vec)

    def ffn_block(block, source, target):
        # The last projection block's output only feeds the output GEMM: no norm follows it.
        norm_follows = block == 0 or block < weights.num_blocks - 1
        ffn_up.launch(table, source[0], source[1], fold.ffn_w1[:, block], h_ffn, dot_dtype=mma_dtype)
        ffn_down.launch(table, h_ffn, weights.ffn_w2[:, block], source[0], target[0],
                        target[1] if norm_follows else None, dot_dtype=mma_dtype)

    ffn_block(0, (u, u_sq), (z, z_sq))
    ffn_up.launch_head_logits(table, z, z_sq, fold.head_w1, fold.head_v, weights.w_head, logits,
                              dot_dtype=mma_dtype)
    current, spare = (z, z_sq), (u, u_sq)
    for block in range(1, weights.num_blocks):
        ffn_block(block, current, spare)
        current, spare = spare, current

    output_gemm.launch(table, receiver_slots, receiver_caches[0], current[0], weights, logits,
                       cache_dtype=cache_dtype, dot_dtype=mma_dtype, vec=entry.receiver_vec,
                       projection=projection, head_scale=head_scale)


def merge(receiver_caches, receiver_slots, projections, head_scales) -> None:
    """``c2c::merge``: the slot preparation (receiver slots only: merge reads no sharer), then
    one launch of cache_merge.py."""
    receiver_table, contribution_table, vec = tables.merge_tables(receiver_caches, projections, head_scales)
    receiver_slots, _ = slot_prep.prepare(receiver_slots, None, slots.rows(receiver_caches[0]), 0, dedupe=True)
    cache_merge.launch(receiver_table, contribution_table, receiver_slots, receiver_caches[0],
                       len(projections) // len(receiver_caches),
                       cache_dtype=TL_DTYPES[receiver_caches[0].dtype], vec=vec,
                       unit_columns=all(p.stride(1) == 1 for p in projections))
