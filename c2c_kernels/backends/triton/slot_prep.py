"""Stage 0: the user's slots -> the prepared slots every other stage reads (c2c_kernels.slots).

One launch per call computes exactly :func:`c2c_kernels.slots.prepare`'s ``(receiver, sharer)``
int64 ``[T]`` arrays on the device, with no host sync: it reads the user's slot tensors with
their own dtype (int32 or int64) and stride (any, 0 for an expanded tensor included), marks
every skipped token (padding, out of range, or, with ``DEDUPE``, a receiver slot that a later
valid token writes) with receiver slot -1 and sharer slot 0, and records an out-of-range slot
in the device's status buffer (c2c_kernels.status). The later stages then only skip negative
receiver slots: every slot they use lies inside its pool, and no two of their writes meet.

The outputs are fresh workspaces (c2c_kernels.workspace) handed to the later launches as kernel
arguments, never stored in the address tables that tables.py caches: a CUDA graph captures the
prepare launch with them, so a replay recomputes them from the (static) user slot tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import status, workspace
from ._common import INTERPRET

# Tokens per program, and later tokens per step of the duplicate scan (a [BLOCK, SCAN] compare
# tile: 32 elements per thread at 4 warps). Small in the interpreter so that the tests' few dozen
# tokens span several programs and scan steps.
BLOCK, SCAN = (16, 8) if INTERPRET else (128, 32)


@triton.jit
def _load_tile(receiver_ptr, sharer_ptr, tok, tokens, stride_r, stride_s, receiver_rows, sharer_rows,
               HAS_SHARER: tl.constexpr):
    """Slots of tokens ``tok`` as int64, and which of them are valid; also the two error masks."""
    in_call = tok < tokens
    r = tl.load(receiver_ptr + tok.to(tl.int64) * stride_r, mask=in_call, other=-1).to(tl.int64)
    used = r >= 0
    bad_r = used & (r >= receiver_rows)
    if HAS_SHARER:
        s = tl.load(sharer_ptr + tok.to(tl.int64) * stride_s, mask=used, other=0).to(tl.int64)
        bad_s = used & (r < receiver_rows) & ((s < 0) | (s >= sharer_rows))
    else:
        s = tl.zeros_like(r)
        bad_s = used & (r < 0)  # all False, with the right shape
    return r, s, used & ~bad_r & ~bad_s, bad_r, bad_s


@triton.jit(do_not_specialize=["tokens", "stride_r", "stride_s", "receiver_rows", "sharer_rows"])
def prepare_slots_kernel(
    receiver_ptr, sharer_ptr, out_r_ptr, out_s_ptr, status_ptr,
    tokens, stride_r, stride_s, receiver_rows, sharer_rows,
    HAS_SHARER: tl.constexpr, DEDUPE: tl.constexpr, BLOCK: tl.constexpr, SCAN: tl.constexpr,
):
    pid = tl.program_id(0)
    tok = pid * BLOCK + tl.arange(0, BLOCK)
    r, s, valid, bad_r, bad_s = _load_tile(receiver_ptr, sharer_ptr, tok, tokens, stride_r, stride_s,
                                           receiver_rows, sharer_rows, HAS_SHARER)

    # The first out-of-range token of this tile goes to the status buffer if no error is there
    # yet: flag 0 -> 1 by compare-and-swap, and only the program that set it writes the fields.
    bad = bad_r | bad_s
    first = tl.min(tl.where(bad, tok, tokens), axis=0)
    if first < tokens:
        # Typed operands: atomic_cas does not cast them to the int64 element type on a GPU.
        prev = tl.atomic_cas(status_ptr, tl.full([], 0, tl.int64), tl.full([], 1, tl.int64))
        if prev == 0:
            at = tok == first
            first_r = tl.max(tl.where(at & bad_r, 1, 0), axis=0) > 0
            value = tl.sum(tl.where(at, tl.where(bad_r, r, s), 0), axis=0)
            tl.store(status_ptr + 1, tl.where(first_r, 1, 2).to(tl.int64))  # status.RECEIVER/SHARER_SLOTS
            tl.store(status_ptr + 2, first.to(tl.int64))
            tl.store(status_ptr + 3, value)
            tl.store(status_ptr + 4, tl.where(first_r, receiver_rows, sharer_rows).to(tl.int64))

    if DEDUPE:
        # A valid token is dropped when a later valid token has the same receiver slot (the last
        # one writes). A plain tiled scan of this tile's tokens against every later token:
        # O(T^2 / 2) compares, 1.3e8 at T = 16384 over 128 programs; the longest (program 0)
        # runs 512 steps of [128, 32], an estimated few tens of microseconds on a GPU next to
        # tens of milliseconds for the GEMMs of such a call. No pool-sized scratch, no sort.
        dropped = tl.zeros((BLOCK,), dtype=tl.int32)
        for start in range(pid * BLOCK, tokens, SCAN):
            other = start + tl.arange(0, SCAN)
            r_o, s_o, valid_o, bad_r_o, bad_s_o = _load_tile(receiver_ptr, sharer_ptr, other, tokens, stride_r,
                                                            stride_s, receiver_rows, sharer_rows, HAS_SHARER)
            same = (r[:, None] == r_o[None, :]) & valid_o[None, :] & (other[None, :] > tok[:, None])
            dropped = tl.maximum(dropped, tl.max(same.to(tl.int32), axis=1))
        valid = valid & (dropped == 0)

    in_call = tok < tokens
    tl.store(out_r_ptr + tok, tl.where(valid, r, -1), mask=in_call)
    tl.store(out_s_ptr + tok, tl.where(valid, s, 0), mask=in_call)


def prepare(receiver_slots: torch.Tensor, sharer_slots: torch.Tensor | None, receiver_rows: int,
            sharer_rows: int, *, dedupe: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(receiver, sharer)`` int64 ``[T]`` contiguous, as ``slots.prepare`` (errors go to the
    device's status buffer instead of a list). ``sharer_slots=None`` for merge: no sharer read."""
    tokens = receiver_slots.shape[0]
    device = receiver_slots.device
    out_r = workspace.empty(tokens, dtype=torch.int64, device=device)
    out_s = workspace.empty(tokens, dtype=torch.int64, device=device)
    if tokens:
        has_sharer = sharer_slots is not None
        sharer = sharer_slots if has_sharer else receiver_slots  # never read without a sharer
        prepare_slots_kernel[(triton.cdiv(tokens, BLOCK),)](
            receiver_slots, sharer, out_r, out_s, status.buffer(device),
            tokens, receiver_slots.stride(0), sharer.stride(0), receiver_rows, sharer_rows,
            HAS_SHARER=has_sharer, DEDUPE=dedupe, BLOCK=BLOCK, SCAN=SCAN, num_warps=4)
    return out_r, out_s
