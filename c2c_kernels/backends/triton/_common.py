"""Helpers every Triton stage shares: the program -> tile mapping, the slot -> row addressing of
a cache view, the entry table layout, exact GELU, the head padding, and the dtype choices made
on the host."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...reference import RMS_EPS as _RMS_EPS
from . import interpreting

# Set by the test suite on machines without a GPU; read once, before any kernel is defined.
INTERPRET = interpreting()

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Row layout of the per-call entry table (int64, one row per fused cache entry, see tables.py):
# the fuser index, then (base address, page stride, entry stride, head stride) of the receiver
# view and of the sharer view. Strides are in elements. (Kernels may only read constexpr globals.)
ENTRY_FUSER = tl.constexpr(0)
ENTRY_RECEIVER = tl.constexpr(1)
ENTRY_SHARER = tl.constexpr(5)
ENTRY_WIDTH = tl.constexpr(9)

RMS_EPS = tl.constexpr(_RMS_EPS)


def heads_pad(heads: int) -> int:
    """The HEADS_PAD constexpr of a ``[rows, heads]`` logit tile: a power of two, at least 16
    (the narrowest ``tl.dot`` operand)."""
    return max(16, triton.next_power_of_2(heads))


def dot_dtype(dtype: torch.dtype):
    """The dtype tiles are fed to ``tl.dot`` in. bf16 dots (and bf16 arithmetic) are broken in
    the interpreter (triton issue 11584), so there bf16 tiles are widened to fp32 after loading."""
    if INTERPRET and dtype == torch.bfloat16:
        return tl.float32
    return TL_DTYPES[dtype]


@triton.jit
def tile_coords(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(entry, m tile, n tile) of program ``pid``: entry-major, so one entry's weights stay in
    L2 while its tiles run, then groups of GROUP_M row tiles sweep the column tiles."""
    tiles = num_m * num_n
    entry = pid // tiles
    local = pid % tiles
    group = GROUP_M * num_n
    first_m = (local // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    tile_m = first_m + (local % group) % size_m
    tile_n = (local % group) // size_m
    return entry, tile_m, tile_n


@triton.jit
def load_view(table_ptr, at, DTYPE: tl.constexpr, VEC: tl.constexpr):
    """Base pointer and (page, entry, head) strides of the cache view stored at ``table_ptr[at]``."""
    base = tl.load(table_ptr + at).to(tl.pointer_type(DTYPE))
    if VEC > 1:
        base = tl.multiple_of(base, 16)
    return base, tl.load(table_ptr + at + 1), tl.load(table_ptr + at + 2), tl.load(table_ptr + at + 3)


def page_constexpr(page_size: int) -> int:
    """The PAGE_SIZE constexpr of a view with ``page_size`` entries per page: the size itself when
    it is a power of two (paged pools: a handful of values per deployment; the slot's page and
    entry become a shift and a mask), else 0, and the kernel divides by the runtime argument (a
    cache whose "page" is a whole sequence, as a growing Hugging Face cache, would otherwise
    compile a new kernel at every length)."""
    return page_size if page_size > 0 and page_size & (page_size - 1) == 0 else 0


@triton.jit
def token_rows(entry, tokens, tok):
    """Row ``entry * tokens + tok`` of an ``[entries, tokens, ...]`` activation, in int64 before
    anything is multiplied (the row times a width passes 2^31 at a few million tokens)."""
    return entry.to(tl.int64) * tokens + tok.to(tl.int64)


@triton.jit
def slot_rows(slots, page_size, stride_page, stride_entry, PAGE_SIZE: tl.constexpr, VEC: tl.constexpr):
    """Element offset of each slot's row: page ``slot // page_size``, entry ``slot % page_size``,
    with the compile-time PAGE_SIZE when it is set (see page_constexpr). VEC > 1 promises every
    offset is a multiple of VEC (checked on the host) so loads vectorize."""
    if PAGE_SIZE > 0:
        rows = (slots // PAGE_SIZE) * stride_page + (slots % PAGE_SIZE) * stride_entry
    else:
        rows = (slots // page_size) * stride_page + (slots % page_size) * stride_entry
    if VEC > 1:
        rows = tl.multiple_of(rows, VEC)
    return rows


@triton.jit
def head_columns(cols, stride_head, HEAD_DIM: tl.constexpr, VEC: tl.constexpr):
    """Element offset of flattened column ``head * HEAD_DIM + dim`` inside one token's row. The
    head dim is a compile-time constant (a few values per deployment): no integer division per
    column on every K step."""
    offsets = (cols // HEAD_DIM) * stride_head + cols % HEAD_DIM
    if VEC > 1:
        offsets = tl.max_contiguous(tl.multiple_of(offsets, VEC), VEC)
    return offsets


# Columns per partial sum of squares (see store_sum_sq): the smallest column tile, so that
# every tile of every config covers whole chunks.
SUMSQ_CHUNK = tl.constexpr(32)


def sum_sq_chunks(width: int) -> int:
    """Partial sums of squares per row of a ``width``-wide activation."""
    return -(-width // SUMSQ_CHUNK.value)


@triton.jit
def store_sum_sq(sumsq_ptr, row, tile_n, stored, tok_mask, col_mask, chunks, BM: tl.constexpr,
                 BN: tl.constexpr):
    """The epilogue half of the next FFN-up's RMSNorm: per row, the sums of squares of the
    ``stored`` tile (the values as written, in fp32) over each SUMSQ_CHUNK columns, at
    ``sumsq[row, chunk]``. The FFN-up kernel adds a row's ``chunks`` partials instead of
    reducing its A tiles across threads on every K step."""
    v = tl.where(tok_mask[:, None] & col_mask[None, :], stored, 0.0)
    parts = tl.sum(tl.reshape(v * v, (BM, BN // SUMSQ_CHUNK, SUMSQ_CHUNK)), axis=2)
    chunk = tile_n * (BN // SUMSQ_CHUNK) + tl.arange(0, BN // SUMSQ_CHUNK)
    tl.store(sumsq_ptr + row[:, None] * chunks + chunk[None, :], parts,
             mask=tok_mask[:, None] & (chunk < chunks)[None, :])


@triton.jit
def gelu_erf(x):
    """Exact GELU, ``x * Phi(x)``, in fp32."""
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


# fp32 tiles: three tf32 products (fp32-accurate to ~1e-6, on tensor cores) on a GPU, plain
# fp32 in the interpreter. Single tf32 would miss the fp32 tolerance of the tests.
FP32_DOT = tl.constexpr("ieee" if INTERPRET else "tf32x3")


@triton.jit
def mma(a, b, acc, DOT_DTYPE: tl.constexpr):
    """``acc + a @ b`` with both tiles in DOT_DTYPE, accumulated in fp32."""
    if DOT_DTYPE == tl.float32:
        out = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=FP32_DOT)
    else:
        out = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)
    return out


@triton.jit
def dense_gemm(a_rows, w, stride_w_k, k_in, tok_mask, col_mask, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``A @ W`` for one tile, fp32: ``a_rows`` points at each token's contiguous activation row,
    ``w`` at each output column's weights (its K stride ``stride_w_k``)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, k_in, BK):
        k = k0 + tl.arange(0, BK)
        k_mask = k < k_in
        a = tl.load(a_rows + k[None, :], mask=tok_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w + k[:, None] * stride_w_k, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = mma(a, b, acc, DOT_DTYPE)
    return acc
